"""Backup while ingest writes, restore into a new data dir, and the restored server serves the same data."""

from __future__ import annotations

import io
import sqlite3
import tarfile
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_agent.protocol import decode
from fleet_server.backup import BackupError, create_backup, read_backup_info, restore_backup
from fleet_server.cli import server as server_cli
from fleet_server.desired import publish_desired
from fleet_server.registry import desired_state, trust_key, upload_bundle
from fleet_server.service import FleetServer
from tests.server_fixtures import *  # noqa: F403
from tests.server_fixtures import (
    DeviceClient,
    ServerHandle,
    make_bundle,
    make_config,
    profile_edges,
    shifted_window,
)

pytestmark = [pytest.mark.broker]

DEVICES = ("pump-1", "pump-2", "pump-3")


def stored_windows(db_path: Path) -> int:
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute("SELECT count(*) FROM windows").fetchone()[0]
    finally:
        conn.close()


def snapshot_is_consistent(db_path: Path) -> tuple[int, int, int]:
    """(windows, their predictions, the bucket sums' predictions): one moment has them agree."""
    conn = sqlite3.connect(db_path)
    try:
        windows, preds = conn.execute("SELECT count(*), coalesce(sum(predictions), 0) FROM windows").fetchone()
        bucket_preds = conn.execute("SELECT coalesce(sum(predictions), 0) FROM buckets").fetchone()[0]
        bucket_windows = conn.execute("SELECT coalesce(sum(windows), 0) FROM buckets").fetchone()[0]
    finally:
        conn.close()
    assert bucket_windows == windows
    return windows, preds, bucket_preds


@pytest.fixture
def populated(fleet: ServerHandle, signing_key):
    """A running server with a trusted key, a model, tagged devices and stored windows."""
    private, pub_path = signing_key
    trust_key(fleet.svc, pub_path.read_bytes(), "test signer")
    bundle = make_bundle(private)
    upload_bundle(fleet.svc, bundle)
    passwords = {d: fleet.provision(d, {"site": "berlin" if d != "pump-3" else "paris"}) for d in DEVICES}
    clients = {d: DeviceClient(fleet.config, d, pw).wait_connected() for d, pw in passwords.items()}
    edges = profile_edges(fleet.api("get", "/api/v1/models/pump/1.0.0").json()["model"]["manifest"])
    seqs = dict.fromkeys(DEVICES, 0)

    def send(device: str, shift: float = 0.0) -> None:
        seqs[device] += 1
        clients[device].publish("telemetry", shifted_window(device, seqs[device], edges, shift=shift))

    for _ in range(5):
        for d in DEVICES:
            send(d, shift=1.5 if d == "pump-3" else 0.0)
    wait_until(lambda: stored_windows(fleet.config.db_path) == 15, 10, message="windows stored")  # noqa: F405
    yield fleet, bundle, seqs, send, passwords
    for c in clients.values():
        c.close()


def test_backup_while_ingest_writes_and_restore_serves_the_same_data(populated, tmp_path):
    fleet, bundle, seqs, send, passwords = populated
    stop = threading.Event()

    def publish_until_stopped() -> None:
        while not stop.is_set():
            for d in DEVICES:
                send(d)

    writer = threading.Thread(target=publish_until_stopped)
    writer.start()
    backups = []
    try:
        wait_until(lambda: stored_windows(fleet.config.db_path) > 60, 20, message="ingest busy")  # noqa: F405
        before = stored_windows(fleet.config.db_path)
        for i in range(3):
            backups.append(create_backup(fleet.config.data_dir, tmp_path / f"busy-{i}.tar.gz"))
        after = stored_windows(fleet.config.db_path)
    finally:
        stop.set()
        writer.join()
    counts = [b.counts["windows"] for b in backups]
    assert before <= counts[0] <= counts[1] <= counts[2] <= after and before < after, "ingest kept writing"
    assert backups[0].counts["devices"] == 3 and backups[0].counts["models"] == 1
    assert backups[0].path.stat().st_mode & 0o777 == 0o600

    # Each busy backup restores to one consistent moment: windows and bucket sums agree.
    for i, b in enumerate(backups):
        restore_backup(b.path, tmp_path / f"busy-{i}")
        windows, preds, bucket_preds = snapshot_is_consistent(tmp_path / f"busy-{i}" / "fleet.db")
        assert windows == b.counts["windows"] and preds == bucket_preds

    # A quiet backup, restored and served by a second server, answers like the original.
    total = sum(seqs.values())  # every window the devices were sent a PUBACK for
    wait_until(lambda: stored_windows(fleet.config.db_path) == total, 20, message="all stored")  # noqa: F405
    fleet.token("viewer")  # made before the backup, so the restored server knows it too
    assert publish_desired(fleet.svc, "pump-1", desired_state(fleet.svc, "pump", "1.0.0"))
    quiet = create_backup(fleet.config.data_dir, tmp_path / "quiet.tar.gz")
    assert "broker/mosquitto.db" in quiet.files and "server.toml" not in quiet.files
    restored_dir = tmp_path / "restored"
    restore_backup(tmp_path / "quiet.tar.gz", restored_dir)
    assert (restored_dir / "secrets").stat().st_mode & 0o777 == 0o700
    assert (restored_dir / "secrets" / "mqtt-server-password").read_text() == \
        (fleet.config.secrets_dir / "mqtt-server-password").read_text()

    second = ServerHandle(FleetServer(make_config(restored_dir)).start())
    try:
        second.tokens = dict(fleet.tokens)  # API tokens live in the database: the old ones still work
        for path in ("/api/v1/models", "/api/v1/keys"):
            a, b = fleet.api("get", path, "viewer").json(), second.api("get", path, "viewer").json()
            assert without_urls(b) == without_urls(a), path
        ours = {d["id"]: d for d in fleet.api("get", "/api/v1/devices", "viewer").json()["devices"]}
        theirs = {d["id"]: d for d in second.api("get", "/api/v1/devices", "viewer").json()["devices"]}
        assert {k: v["tags"] for k, v in theirs.items()} == {k: v["tags"] for k, v in ours.items()}
        assert stored_windows(restored_dir / "fleet.db") == total
        for scope in ("fleet", "tag:site=paris", "device:pump-1"):
            path = f"/api/v1/models/pump/1.0.0/drift?scope={scope}&start=0"
            a, b = fleet.api("get", path, "viewer").json(), second.api("get", path, "viewer").json()
            assert b["predictions"] == a["predictions"] > 0, scope
            assert [f["psi"] for f in b["features"]] == [f["psi"] for f in a["features"]], scope
        got = second.api("get", "/api/v1/models/pump/1.0.0/bundle", "viewer")
        assert got.status_code == 200 and got.content == bundle
        # A device logs in to the restored broker with the credentials it has, and finds the
        # desired state published before the backup still retained there.
        client = DeviceClient(second.config, "pump-1", passwords["pump-1"]).wait_connected()
        assert client.connected.is_set() and not client.refused
        client.client.subscribe(client.topic("desired"), qos=1)
        wait_until(lambda: client.received, 5, message="retained desired")  # noqa: F405
        assert decode("desired", client.received[0].payload).version == "1.0.0"
        client.close()
    finally:
        second.server.stop()


def without_urls(doc):
    """A document without its absolute URLs (they name the server's own address)."""
    if isinstance(doc, dict):
        return {k: without_urls(v) for k, v in doc.items() if not k.endswith("url")}
    if isinstance(doc, list):
        return [without_urls(v) for v in doc]
    return doc


def test_restore_refuses_a_non_empty_dir_and_a_damaged_archive(populated, tmp_path):
    fleet = populated[0]
    archive = create_backup(fleet.config.data_dir, tmp_path / "b.tar.gz").path
    with pytest.raises(BackupError, match="already exists"):
        create_backup(fleet.config.data_dir, archive)
    with pytest.raises(BackupError, match="not empty"):
        restore_backup(archive, fleet.config.data_dir)
    with pytest.raises(BackupError, match="no fleet.db"):
        create_backup(tmp_path / "nothing", tmp_path / "x.tar.gz")

    # A member changed after the backup was written: refused, and nothing is left behind.
    damaged = tmp_path / "damaged.tar.gz"
    with tarfile.open(archive) as src, tarfile.open(damaged, "w:gz") as out:
        for member in src:
            data = src.extractfile(member).read()
            if member.name.startswith("bundles/"):
                data = data[:-1] + bytes([data[-1] ^ 1])
            out.addfile(member, io.BytesIO(data))
    with pytest.raises(BackupError, match="damaged"):
        restore_backup(damaged, tmp_path / "new")
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new.restore-*"))

    # A path that escapes the data dir is refused before anything is written.
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(archive) as src, tarfile.open(evil, "w:gz") as out:
        for member in src:
            out.addfile(member, src.extractfile(member))
        entry = tarfile.TarInfo("../escaped")
        entry.size = 1
        out.addfile(entry, io.BytesIO(b"x"))
    with pytest.raises(BackupError, match="never has"):
        restore_backup(evil, tmp_path / "new2")
    assert not (tmp_path / "escaped").exists()

    with pytest.raises(BackupError, match="not an edgefleet server backup"):
        read_backup_info(tmp_path / "b.tar.gz.missing")


def test_cli_backup_and_restore(populated, tmp_path):
    fleet = populated[0]
    runner = CliRunner()
    out = tmp_path / "cli.tar.gz"
    r = runner.invoke(server_cli, ["backup", "--data-dir", str(fleet.config.data_dir), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "3 devices" in r.output and out.exists()
    r = runner.invoke(server_cli, ["backup", "--data-dir", str(fleet.config.data_dir), "-o", str(out)])
    assert r.exit_code == 1 and "--force" in r.output
    r = runner.invoke(server_cli, ["backup", "--data-dir", str(fleet.config.data_dir), "-o", str(out), "--force"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(server_cli, ["restore", "--data-dir", str(tmp_path / "r"), str(out)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(server_cli, ["list-devices", "--data-dir", str(tmp_path / "r")])
    assert r.exit_code == 0 and all(d in r.output for d in DEVICES)
    r = runner.invoke(server_cli, ["restore", "--data-dir", str(tmp_path / "r"), str(out)])
    assert r.exit_code == 1 and "not empty" in r.output
