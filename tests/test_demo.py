"""Smoke test of `edgefleet demo`: it starts, the API answers, devices report, Ctrl-C stops
every process it started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.brokers import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


def test_demo_starts_reports_and_stops_cleanly(tmp_path):
    directory = tmp_path / "demo-dir"
    cmd = [sys.executable, "-c", "from edge_agent.entry import main; main()", "demo",
           "--dir", str(directory), "--devices", "10", "--speed", "60", "--duration", "300",
           "--summary-every", "2"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ready = directory / "demo.json"
        wait_until(lambda: ready.exists() or proc.poll() is not None, 180, interval=0.2, message="demo ready")
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        info = json.loads(ready.read_text())
        api = info["api_url"] + "/api/v1"
        headers = {"Authorization": f"Bearer {info['token']}"}

        def devices_report():
            devices = requests.get(f"{api}/devices", headers=headers, timeout=10).json()["devices"]
            summary = requests.get(f"{api}/telemetry/summary", headers=headers, timeout=10).json()["summary"]
            online = [d for d in devices if d["status"] == "online" and d["active_version"]]
            return len(online) == 10 and sum(s["predictions"] for s in summary) > 0

        wait_until(devices_report, 60, interval=0.5, message="ten devices online and reporting telemetry")
        assert info["mqtt"].startswith("mqtt://127.0.0.1:")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            raise
    assert proc.returncode == 0, out
    assert "edgefleet demo is ready" in out and "stopped." in out, out
    # Nothing left running: no broker, no server, nothing started from the demo's directory.
    assert _processes_mentioning(str(directory)) == []
    assert not (directory / "demo.json").exists()
