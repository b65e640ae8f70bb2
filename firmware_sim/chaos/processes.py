"""The fleet server and its managed broker as processes the chaos driver kills. The driver
restarts a killed server; a killed broker is the server's own supervisor's to restart."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import requests

from firmware_sim.chaos.plan import ChaosError
from firmware_sim.local import wait_until


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll until `predicate` holds; ChaosError naming `what` after `timeout` s."""
    wait_until(predicate, timeout, what, error=ChaosError, interval=interval)


def _pid_alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # a zombie is dead, only not yet reaped



class ServerProcess:
    """`edgefleet server run` in its own process, and the managed broker it starts or adopts."""

    def __init__(self, data_dir: Path, http_port: int, broker_port: int) -> None:
        self.data_dir = data_dir
        self.http_port = http_port
        self.broker_port = broker_port
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    def start(self, timeout: float = 60.0) -> None:
        self.starts += 1
        log_file = open(self.data_dir / f"server-{self.starts}.log", "wb")  # noqa: SIM115 - the child owns it
        with log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from edge_agent.entry import main; main()", "server", "run",
                 "--data-dir", str(self.data_dir)],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            )
        wait_for(self.up, timeout, f"the fleet server to answer on 127.0.0.1:{self.http_port}")

    def up(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            tail = (self.data_dir / f"server-{self.starts}.log").read_text(errors="replace")[-1500:]
            raise ChaosError(f"the fleet server exited: {tail}")
        try:
            return requests.get(f"http://127.0.0.1:{self.http_port}/api/v1/health", timeout=1).ok
        except requests.RequestException:
            return False

    def kill(self) -> None:
        """kill -9: no clean shutdown, no batch finished, no session closed."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def broker_pid(self) -> int | None:
        try:
            pid = int((self.broker_dir / "mosquitto.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _pid_alive(pid) else None

    def save_broker_state(self, dest: Path, timeout: float = 20.0) -> None:
        """Have the broker write its persistence file now (SIGUSR1) and keep a copy at `dest`."""
        pid = self.broker_pid()
        if pid is None:
            raise ChaosError("no broker runs to save the state of")
        db = self.broker_dir / "mosquitto.db"
        before = db.stat().st_mtime_ns if db.exists() else 0
        os.kill(pid, signal.SIGUSR1)
        wait_for(lambda: db.exists() and db.stat().st_mtime_ns > before, timeout, "the broker to save its state")
        shutil.copyfile(db, dest)

    def kill_broker(self, rewind_to: Path | None = None) -> int | None:
        """kill -9 of the broker; returns its pid. With `rewind_to`, its persistence file is put
        back to that saved copy before anything starts it again: the broker comes back with what it
        held then (retained messages, sessions), as one whose last autosave is that old would."""
        pid = self.broker_pid()
        if pid is None:
            return None
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not _pid_alive(pid), 10, "the killed broker to go")
        if rewind_to is not None:
            # Well within the supervisor's backoff (seconds), and never under a running broker.
            shutil.copyfile(rewind_to, self.broker_dir / ".mosquitto.db.rewind")
            os.replace(self.broker_dir / ".mosquitto.db.rewind", self.broker_dir / "mosquitto.db")
        return pid

    def wait_broker_restarted(self, killed_pid: int, timeout: float = 120.0) -> None:
        """Wait for the server's supervisor to start the broker again (the driver never starts it:
        two starters would race for the port) and for it to listen."""

        def listening() -> bool:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.broker_port), 0.2):
                return True
            return False

        wait_for(lambda: self.broker_pid() not in (None, killed_pid) and listening(), timeout,
                 "the server's supervisor to start the killed broker again", 0.2)

    def stop(self) -> None:
        """A clean stop of the server, then of whatever broker is left."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        pid = self.broker_pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            with contextlib.suppress(ChaosError):
                wait_for(lambda: not _pid_alive(pid), 10, "the broker to stop")
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)

