"""The fleet server and its managed broker as processes the chaos driver kills and restarts."""

from __future__ import annotations

import contextlib
import os
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
        self.broker_proc: subprocess.Popen | None = None  # a broker this driver restarted itself
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

    def kill_broker(self) -> None:
        pid = self.broker_pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGKILL)
        if self.broker_proc is not None and self.broker_proc.pid == pid:
            self.broker_proc.wait()
        wait_for(lambda: not _pid_alive(pid), 10, "the killed broker to go")

    def restart_broker(self) -> None:
        """Start Mosquitto again on the server's own configuration, as its supervisor would; a
        later server start adopts it through its pid file."""
        from fleet_server.broker import MOSQUITTO

        with open(self.broker_dir / "mosquitto.stderr", "ab") as err:
            self.broker_proc = subprocess.Popen([MOSQUITTO, "-c", str(self.broker_dir / "mosquitto.conf")],
                                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                                start_new_session=True)

        def listening() -> bool:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.broker_port), 0.2):
                return True
            return False

        wait_for(listening, 10, "the restarted broker to listen")

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
        if self.broker_proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.broker_proc.wait(5)
