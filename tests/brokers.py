"""A real Mosquitto broker on a free loopback port, for tests and benchmarks.

Stoppable and restartable on the same port (outage tests), with persistence so that
retained messages and persistent sessions survive a restart like they do in production.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from firmware_sim.local import free_port  # noqa: F401 - tests import it from here

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


# Every wait's timeout is multiplied by this: the timeouts are sized for an idle machine, and a
# loaded 2-core one (parallel workers, the emulated arm64 device) can be several times slower.
# Only a failing wait takes longer; a passing one returns as soon as its condition holds.
TIMEOUT_SCALE = float(os.environ.get("EDGEFLEET_TEST_TIMEOUT_SCALE", "3"))


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, message=""):
    """Poll `predicate` until it returns a truthy value; return it, or fail after `timeout`
    (times TIMEOUT_SCALE).

    `message` may be a callable, evaluated only on failure (to show the state it ended in)."""
    timeout *= TIMEOUT_SCALE
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            what = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


class Broker:
    """A Mosquitto process with an anonymous loopback listener (or a given extra config)."""

    def __init__(self, workdir: Path, extra_config: str = "", port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.extra_config = extra_config
        self.proc: subprocess.Popen | None = None
        self.config_path = self.workdir / "mosquitto.conf"

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def write_config(self) -> None:
        anonymous = "" if "allow_anonymous" in self.extra_config else "allow_anonymous true\n"
        self.config_path.write_text(
            f"listener {self.port} {self.host}\n"
            f"{anonymous}"
            "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            "autosave_interval 1\n"
            "max_queued_messages 100000\n"
            "max_inflight_messages 100\n"
            "log_dest none\n"
            f"{self.extra_config}\n"
        )

    def start(self) -> Broker:
        self.write_config()
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            wait_for_port(self.host, self.port)
        except TimeoutError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()
