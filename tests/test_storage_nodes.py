"""Two server nodes on one PostgreSQL database: what one node stores, the other serves.

Each node is a bootstrap with its own data dir (its own disk) and the same storage_url; the HTTP
side is each node's Flask app. No broker is needed for these.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fleet_server.app import create_app
from fleet_server.auth import SESSION_COOKIE, new_token, token_hash
from fleet_server.console.accounts import create_operator
from fleet_server.devices import provision_device
from fleet_server.registry import bundle_file, trust_key, upload_bundle
from fleet_server.service import FleetServer, bootstrap
from tests.agent_fixtures import bundle_bytes, public_pem
from tests.server_fixtures import DeviceClient, make_config, shifted_window, wait_until

PASSWORD = "a-long-enough-password"
EDGES = [[-1.0, 0.0, 1.0]] * 3
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def nodes(tmp_path, pg_url):
    """Two nodes: separate data dirs, one database."""
    built = [bootstrap(make_config(tmp_path / f"node-{n}", storage_url=pg_url)) for n in "ab"]
    yield built
    for svc in built:
        svc.close()


def test_a_bundle_uploaded_on_one_node_downloads_from_the_other_with_range(nodes):
    a, b = nodes
    trust_key(a, public_pem("trusted"))
    data = bundle_bytes("lr", "1.0.0")
    summary = upload_bundle(a, data)
    name, version = summary["name"], summary["version"]
    path, row = bundle_file(b, name, version)  # b's disk never saw it: fetched from the database
    assert path.is_relative_to(b.config.data_dir) and path.read_bytes() == data
    assert row["sha256"] == hashlib.sha256(data).hexdigest()
    token = new_token()
    a.storage.insert_token("ci", "viewer", token_hash(token), 0.0)  # a token made on node a
    client = create_app(b.config, services=b).test_client()
    headers = {"Authorization": f"Bearer {token}", "Range": "bytes=10-19"}
    response = client.get(f"/api/v1/models/{name}/{version}/bundle", headers=headers)
    assert response.status_code == 206 and response.data == data[10:20]


def test_a_console_session_from_one_node_works_on_the_other(nodes):
    a, b = nodes
    create_operator(a, "olga", "operator", PASSWORD)
    app_a, app_b = (create_app(svc.config, services=svc) for svc in nodes)
    on_a = app_a.test_client()
    page = on_a.get("/console/login")
    login_token = re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)
    response = on_a.post("/console/login", data={"name": "olga", "password": PASSWORD, "login_token": login_token,
                                                 "next": "/console/"})
    assert response.status_code == 303
    on_b = app_b.test_client()
    assert on_b.get("/console/api/overview").status_code == 401
    on_b.set_cookie(SESSION_COOKIE, on_a.get_cookie(SESSION_COOKIE).value)
    assert on_b.get("/console/api/overview").status_code == 200
    # Logging out on b ends the session on a too: it is one row in the shared database.
    csrf = b.storage.find_session(hashlib.sha256(on_a.get_cookie(SESSION_COOKIE).value.encode()).hexdigest(),
                                  a.clock())
    assert csrf is not None
    assert on_b.post("/console/logout", data={"csrf_token": csrf["csrf_token"]}).status_code == 303
    assert on_a.get("/console/api/overview").status_code == 401


@pytest.mark.broker
def test_two_ingest_processes_on_one_database_store_every_window_once(tmp_path, pg_url):
    """`server run` and a `server ingest` process share the telemetry subscription and the database:
    each window is stored once, by one of them, and the message accounting counts it once."""
    config = make_config(tmp_path / "server", storage_url=pg_url)
    server = FleetServer(config).start()
    proc = None
    device = None
    try:
        wait_until(lambda: server.ingest.connected.is_set(), 10, message="ingest connected")
        proc = subprocess.Popen(
            [sys.executable, "-c", "from edge_agent.entry import main; main()", "server", "ingest", "--data-dir",
             str(config.data_dir), "--worker-id", "1", "--storage-url", pg_url,
             "--mqtt-url", f"mqtt://127.0.0.1:{config.broker_port}"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )

        def worker(worker_id: str) -> dict:
            if proc.poll() is not None:
                pytest.fail(f"server ingest exited: {proc.stderr.read().decode()[-2000:]}")
            return next((w["stats"] for w in server.svc.storage.worker_stats() if w["worker_id"] == worker_id), {})

        wait_until(lambda: worker("1").get("connected"), 20, message="the second ingest process connected")
        device = DeviceClient(config, "dev-a", provision_device(server.svc, "dev-a").password).wait_connected()
        total = 200
        for seq in range(1, total + 1):
            device.publish("telemetry", shifted_window("dev-a", seq, EDGES))
        wait_until(lambda: (server.svc.storage.seq_stats("dev-a") or [{}])[0].get("received") == total, 20,
                   message="every window stored")

        # On PostgreSQL a node's ingest worker is named after the node (not "0").
        workers = (server.ingest.config.worker_id, "1")

        def stored_by() -> list[int]:
            return [worker(w).get("stored_windows", 0) for w in workers]

        wait_until(lambda: sum(stored_by()) == total, 20, message=lambda: f"stored by each worker: {stored_by()}")
        assert all(n > 0 for n in stored_by()), stored_by()  # both took a share
        assert sum(worker(w).get("duplicates", 0) for w in workers) == 0
        assert sum(r["windows"] for r in server.svc.storage.bucket_rows("pump", "1.0.0")) == total
        stats = server.svc.storage.seq_stats("dev-a")[0]
        assert (stats["first_seq"], stats["max_seq"], stats["received"]) == (1, total, total)
    finally:
        if device is not None:
            device.close()
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            finally:
                if proc.poll() is None:
                    proc.kill()
        server.stop()
