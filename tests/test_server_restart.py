"""A server killed with SIGKILL mid-stream and restarted loses no message the broker acknowledged."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests

from fleet_server.config import load_config
from fleet_server.devices import provision_device
from fleet_server.service import bootstrap
from tests.brokers import free_port, wait_until
from tests.postgres_fixtures import db_rows, every_backend, server_storage_url  # noqa: F401 - every backend
from tests.server_fixtures import DeviceClient, shifted_window

pytestmark = [pytest.mark.broker, pytest.mark.slow]

EDGES = [[-1.0, 0.0, 1.0]] * 3
ROOT = Path(__file__).resolve().parent.parent


def start_server(data_dir: Path, http_port: int, broker_port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", "from edge_agent.entry import main; main()", "server", "run", "--data-dir", str(data_dir),
         "--listen", f"127.0.0.1:{http_port}", "--broker-port", str(broker_port)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def up(proc: subprocess.Popen, port: int) -> bool:
    if proc.poll() is not None:
        pytest.fail(f"server exited: {proc.stderr.read().decode()[-2000:]}")
    try:
        return requests.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=1).ok
    except requests.ConnectionError:
        return False


def test_kill_9_and_restart_loses_no_acknowledged_message(request, tmp_path, backend):
    data_dir = tmp_path / "server"
    http_port, broker_port = free_port(), free_port()
    (data_dir).mkdir()
    storage_url = server_storage_url(request, backend)
    (data_dir / "server.toml").write_text(
        "bucket_s = 1.0\nalert_interval_s = 0.5\n" + (f'storage_url = "{storage_url}"\n' if storage_url else "")
    )
    svc = bootstrap(load_config(data_dir, broker_port=broker_port))
    password = provision_device(svc, "dev-k").password
    token_storage = svc.storage

    def stored() -> set[int]:
        return {r[0] for r in db_rows(token_storage, "SELECT seq FROM windows WHERE device = 'dev-k'")}

    def ingest_connected() -> bool:
        workers = token_storage.worker_stats()
        return bool(workers) and workers[0]["stats"].get("connected")

    proc = start_server(data_dir, http_port, broker_port)
    broker_pid = None
    try:
        wait_until(lambda: up(proc, http_port), 20, interval=0.1, message="server up")
        wait_until(ingest_connected, 10)
        device = DeviceClient(svc.config, "dev-k", password).wait_connected()
        acked: list[int] = []
        total = 600
        first_batch_stored = threading.Event()

        def publish_all() -> None:
            for seq in range(1, total + 1):
                info = device.publish("telemetry", shifted_window("dev-k", seq, EDGES, n=20))
                if info.is_published():
                    acked.append(seq)
                if seq == 150:
                    first_batch_stored.wait(10)

        publisher = threading.Thread(target=publish_all)
        publisher.start()
        wait_until(lambda: len(stored()) >= 100, 20, message="some windows stored")
        broker_pid = int((data_dir / "broker" / "mosquitto.pid").read_text())
        proc.send_signal(signal.SIGKILL)  # mid-stream: batches in flight, messages unacknowledged
        proc.wait()
        first_batch_stored.set()
        publisher.join(60)
        assert len(acked) == total  # the broker (still running) acknowledged every message
        proc = start_server(data_dir, http_port, broker_port)
        wait_until(lambda: stored() == set(acked), 30, message="every acknowledged window stored")
        device.close()
        # Ingest may catch up before the HTTP listener of the new process is bound.
        wait_until(lambda: up(proc, http_port), 20, interval=0.1, message="restarted server up")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            if broker_pid is not None:
                wait_until(lambda: not Path(f"/proc/{broker_pid}").exists(), 10, message="broker stopped")
                if Path(f"/proc/{broker_pid}").exists():
                    os.kill(broker_pid, signal.SIGKILL)
            svc.close()
