"""A guard against tests that leave things running: a thread or a child process a test started
and did not stop outlives it, takes a core from the tests after it and, when it is a thread the
interpreter joins at exit, keeps the whole run from ever finishing.

After each test module (once its fixtures are torn down, module-scoped ones too) the threads and child processes it started get a
few seconds to end; what is still alive then fails the test with its name, and child processes
are killed so one leak does not load every test after it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import pytest

GRACE_S = 5.0


def _children(pid: int) -> set[int]:
    """Every live descendant of `pid` (read from /proc; zombies are not counted)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if fields[0] == "Z":
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] != "Z"


def _leftovers(threads_before: set[int], children_before: set[int]) -> tuple[list[threading.Thread], set[int]]:
    threads = [t for t in threading.enumerate() if t.ident not in threads_before and t.is_alive()]
    children = {p for p in _children(os.getpid()) - children_before if _alive(p)}
    return threads, children


@pytest.fixture(scope="module", autouse=True)
def no_leftovers(request):
    """Fails a test module that leaves a thread or a child process running (see the module docstring)."""
    threads_before = {t.ident for t in threading.enumerate()}
    children_before = _children(os.getpid())
    yield
    deadline = time.monotonic() + GRACE_S
    threads, children = _leftovers(threads_before, children_before)
    while (threads or children) and time.monotonic() < deadline:
        time.sleep(0.05)  # poll interval while waiting for them to end
        threads, children = _leftovers(threads_before, children_before)
    # Threads of session-scoped fixtures started during this module are not its leak.
    threads = [t for t in threads if not t.name.startswith(_SESSION_THREADS)]
    children = {p for p in children if not _session_process(p)}
    if not threads and not children:
        return
    described = [f"thread {t.name!r} (daemon={t.daemon})" for t in threads]
    described += [f"process {p}: {_cmdline(p)[:200]}" for p in sorted(children)]
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    pytest.fail(f"{request.node.nodeid} left running after its tests: " + "; ".join(described), pytrace=False)


# The PostgreSQL cluster is shared by the session; its admin pool's threads and its postgres
# processes live until the session ends.
_SESSION_THREADS = ("pool-", "edgefleet-test-admin")


def _session_process(pid: int) -> bool:
    cmd = _cmdline(pid)
    return "postgres" in cmd.split(" ", 1)[0] or cmd.startswith("postgres:")


_exit_status: list[int] = []


def remember_exit_status(status: int) -> None:
    _exit_status.append(int(status))


def exit_if_threads_would_hang() -> None:
    """At the very end of the run: a non-daemon thread still alive would keep the interpreter
    from exiting (it joins them), and a CI job would wait on it until its own limit. Name the
    threads and end the process with the run's status instead."""
    stuck = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if not stuck:
        return
    deadline = time.monotonic() + GRACE_S
    while stuck and time.monotonic() < deadline:
        time.sleep(0.05)  # poll interval while they may still end
        stuck = [t for t in stuck if t.is_alive()]
    if stuck:
        import sys

        names = ", ".join(repr(t.name) for t in stuck)
        print(f"\nthreads still running at exit (a test did not stop them): {names}", file=sys.stderr, flush=True)
        status = _exit_status[-1] if _exit_status else 1
        os._exit(status or 1)
