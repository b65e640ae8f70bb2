"""The agent as a long-running process: tick thread, HTTP API, signals, systemd notify.

Process concerns only; the logic lives in `Agent`. `edgefleet agent run` and
`python -m edge_agent run` call `run_service`.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable

from edge_agent.agent import Agent
from edge_agent.config import AgentConfig
from edge_agent.http import HttpApi

log = logging.getLogger("edge_agent.service")

TICK_S = 0.25  # the longest the tick thread sleeps when nothing wakes it
TRIM_S = 60.0  # how often freed heap goes back to the kernel


def trim_heap() -> None:
    """Give freed heap pages back to the kernel. glibc keeps them for reuse; start-up, model
    loads and self-tests free memory the long-lived process does not need again (~0.4 MiB
    measured after start). No-op where libc has no malloc_trim (musl, macOS)."""
    try:
        import ctypes  # numpy has imported it already

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about readiness; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(address)
            s.sendall(message.encode())
    except OSError as exc:
        log.debug("sd_notify failed: %s", exc)


class AgentService:
    """An Agent plus its HTTP API and the background thread that calls `tick`."""

    def __init__(self, config: AgentConfig, agent_factory: Callable[[AgentConfig], Agent] = Agent) -> None:
        self.config = config
        self.agent = agent_factory(config)
        self.http = HttpApi(self.agent)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> AgentService:
        self.agent.start()
        self.http.start()
        self._thread = threading.Thread(target=self._ticker, name="tick", daemon=True)
        self._thread.start()
        sd_notify("READY=1")
        return self

    def _ticker(self) -> None:
        wake = self.agent.wakeup_event
        trimmed = 0.0
        while not self._stop.is_set():
            try:
                self.agent.tick()
            except Exception:  # the ticker must outlive one bad tick
                log.exception("tick failed")
            now = time.monotonic()
            if now - trimmed >= TRIM_S:
                trim_heap()
                trimmed = now
            wake.wait(TICK_S)
            wake.clear()

    def stop(self) -> None:
        sd_notify("STOPPING=1")
        self._stop.set()
        self.agent.wakeup_event.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.http.stop()
        self.agent.close()

    def wait(self) -> None:
        self._stop.wait()


def run_service(config: AgentConfig) -> None:
    """Run until SIGTERM or SIGINT."""
    service = AgentService(config)
    stop = threading.Event()

    def on_signal(signum, frame) -> None:
        log.info("signal %s: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    service.start()
    address = service.http.address
    log.info(
        "edgefleet agent %s serving %s on %s",
        config.device_id,
        service.agent.active_version() or "no model yet",
        f"http://{address[0]}:{address[1]}" if address else config.http.unix_socket or "no HTTP",
    )
    while not stop.wait(1.0):
        pass
    service.stop()
