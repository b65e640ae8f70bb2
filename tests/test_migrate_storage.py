"""`edgefleet server migrate-storage`: a SQLite deployment made by a real server run (simulated
devices, two model versions, a rollout under way, an operator, a token) moves into an empty
PostgreSQL database, table by table and bundle by bundle, and a node on that database carries on."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fleet_server import rollouts
from fleet_server.auth import new_token, token_hash
from fleet_server.console.accounts import create_operator
from fleet_server.registry import bundle_file
from fleet_server.service import bootstrap
from fleet_server.storage.open import open_storage
from tests.server_fixtures import make_config

pytest_plugins = ["tests.sim_fixtures"]
pytestmark = [pytest.mark.broker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from edge_agent.entry import main; main()", "server", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture
def deployment(sim_server):
    """A data dir a real server wrote: 12 devices on 1.0.0 with telemetry, 2.0.0 rolling out."""
    from tests.sim_fixtures import trained

    v1, v2 = trained("1.0.0"), trained("2.0.0")
    sim_server.add_model(v1)
    sim_server.add_model(v2)
    fleet = sim_server.fleet({"rate_per_s": 2.0, "window_s": 30.0}, 12, step_s=5.0)
    try:
        fleet.preinstall(v1.bundle_bytes).start(wait_online=60)
        fleet.advance(60)
        sim_server.settle(fleet, judge=False)
        plan = {"model": "tumour", "version": "2.0.0", "target": {"all": True}, "stages": [
            {"percent": 50, "min_soak_s": 600}, {"percent": 100, "min_soak_s": 60}]}
        rid = rollouts.create_rollout(sim_server.svc, plan, actor="alice")["id"]
        for _ in range(3):
            rollouts.reconcile(sim_server.svc)
            fleet.advance(10)
            sim_server.settle(fleet, judge=False)
    finally:
        fleet.stop()
    svc = sim_server.svc
    create_operator(svc, "olga", "operator", "a-long-enough-password")
    svc.storage.insert_token("ci", "viewer", token_hash(new_token()), svc.clock())
    assert svc.storage.get_rollout(rid)["state"] == "running"
    assert len(svc.storage.rollout_devices(rid)) == 6
    sim_server.server.stop()  # migrate a stopped deployment, as the docs say
    return sim_server.server.config.data_dir, rid


def table_counts(url: str) -> dict[str, int]:
    storage = open_storage(url)
    try:
        if hasattr(storage, "db"):
            conn = storage.db.conn
            names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                     if not r[0].startswith(("sqlite_", "_sqlite"))]
            return {n: conn.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0] for n in names}
        with storage.pool.connection() as conn:
            names = [r["table_name"] for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")]
            return {n: conn.execute(f'SELECT count(*) AS n FROM "{n}"').fetchone()["n"] for n in names
                    if n != "schema_migrations"}
    finally:
        storage.close()


def test_a_real_deployment_moves_to_postgresql_and_a_node_carries_on(deployment, pg_url, tmp_path):
    data_dir, rid = deployment
    sqlite_counts = table_counts(f"sqlite:///{data_dir / 'fleet.db'}")
    assert sqlite_counts["windows"] > 0 and sqlite_counts["rollout_devices"] == 6 and sqlite_counts["models"] == 2

    # A bundle that no longer matches the registry: refused, and nothing is left in the target.
    broken = tmp_path / "broken"
    shutil.copytree(data_dir, broken)
    victim = next((broken / "bundles").rglob("*.efb"))
    data = victim.read_bytes()
    victim.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])
    failed = cli("migrate-storage", "--data-dir", str(broken), "--to", pg_url)
    assert failed.returncode != 0 and "does not match its sha256" in failed.stderr
    assert not any(n for t, n in table_counts(pg_url).items() if t != "meta")

    done = cli("migrate-storage", "--data-dir", str(data_dir), "--to", pg_url)
    assert done.returncode == 0, done.stderr
    assert "counts and checksums match the source" in done.stdout
    assert "edgefleet-test" not in done.stdout  # the password is never printed
    for table in ("devices", "windows", "rollouts", "rollout_devices", "operators", "tokens", "models"):
        assert any(line.split()[:2] == [table, str(sqlite_counts[table])] for line in done.stdout.splitlines())
    pg_counts = table_counts(pg_url)
    assert {t: pg_counts[t] for t in sqlite_counts} == sqlite_counts
    assert pg_counts["bundle_blobs"] == 2

    # Again: the target holds data now, and is refused.
    again = cli("migrate-storage", "--data-dir", str(data_dir), "--to", pg_url)
    assert again.returncode != 0 and "is not empty" in again.stderr

    # A node on the new database (a data dir of its own, with the deployment's secrets) serves it.
    node_dir = tmp_path / "node"
    node_dir.mkdir()
    shutil.copytree(data_dir / "secrets", node_dir / "secrets")
    node = bootstrap(make_config(node_dir, storage_url=pg_url))
    try:
        row = node.storage.get_rollout(rid)
        assert row["state"] == "running" and row["stage"] == 0
        assert len(node.storage.rollout_devices(rid)) == 6
        status = rollouts.rollout_status(node, rid)
        assert status["audit"][0]["actor"] == "alice"
        path, model = bundle_file(node, "tumour", "2.0.0")  # from bundle_blobs: not on this node's disk
        assert path.is_relative_to(node_dir) and model["sha256"]
        assert node.storage.get_operator("olga")["role"] == "operator"
        # Identity columns go on after the copied rows.
        before = len(node.storage.rollout_audit(rid))
        node.storage.add_rollout_audit(rid, "bob", "note", {}, node.clock())  # a copied id would collide
        assert len(node.storage.rollout_audit(rid)) == before + 1
        assert node.storage.insert_token("after", "viewer", token_hash(new_token()), 0.0) > 1
    finally:
        node.close()
