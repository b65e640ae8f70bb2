"""Helpers for the local processes a simulation runs: a free loopback port, waiting on a condition."""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

# Ports to listen on are taken below the kernel's ephemeral range: a port picked from inside it
# can be taken, between the pick and the bind, as the source port of any outgoing connection
# on the machine ("Address already in use"). Parallel test workers take disjoint slices.
_LISTEN_LOW, _LISTEN_HIGH = 20000, 32767
_handed_out: set[int] = set()
_lock = threading.Lock()


def _ephemeral_low(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _slice() -> tuple[int, int]:
    high = min(_LISTEN_HIGH, _ephemeral_low() - 1)
    if high - _LISTEN_LOW < 1000:  # an unusual ephemeral range: fall back to the whole span above 1024
        return 1024, 65535
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    count = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1))
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    span = (high - _LISTEN_LOW) // count
    low = _LISTEN_LOW + (index % count) * span
    return low, low + span


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, not handed out before by this
    process, and outside the ephemeral range (see above)."""
    low, high = _slice()
    with _lock:
        start = random.randrange(low, high)
        for offset in range(high - low):
            port = low + (start - low + offset) % (high - low)
            if port not in _handed_out and _bindable(port):
                _handed_out.add(port)
                return port
    raise OSError(f"no free loopback port in {low}-{high}")


def wait_until(predicate: Callable[[], object], timeout: float, what: str, *,
               error: Callable[[str], Exception] = TimeoutError, interval: float = 0.1) -> None:
    """Poll `predicate` until it is true; after `timeout` s raise `error` naming `what` was awaited."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
