"""Sampled rows and telemetry bandwidth through the real managed Mosquitto: each window's reservoir
sample is kept (the newest K rows per device, privacy nulls intact) and its payload size counted."""

from __future__ import annotations

import time

import pytest

from edge_agent.protocol import SampleRow, TelemetryWindow, encode
from fleet_server.registry import trust_key, upload_bundle
from fleet_server.service import FleetServer
from fleet_server.storage import IngestBatch
from fleet_server.storage.open import open_storage
from tests.postgres_fixtures import backend_url, db_rows, every_backend, server_storage_url  # noqa: F401 - every backend
from tests.server_fixtures import (
    FEATURES,
    DeviceClient,
    ServerHandle,
    connected,
    make_bundle,
    make_config,
    profile_edges,
    shifted_window,
    wait_until,
)

pytest_plugins = ["tests.server_fixtures"]

EDGES = [[-1.0, 0.0, 1.0]] * 3
KEEP = 20  # samples_per_device of the small fleet


@pytest.fixture
def small_fleet(request, tmp_path, backend):
    """The whole server keeping only KEEP sampled rows per device."""
    storage_url = server_storage_url(request, backend)
    server = connected(FleetServer(make_config(tmp_path / "server", samples_per_device=KEEP, storage_url=storage_url)).start())
    yield ServerHandle(server)
    server.stop()


def sampled_window(
    device: str, seq: int, rows: int, *, private: int | None = None, edges: list[list[float]] = EDGES
) -> TelemetryWindow:
    """A window whose sample rows are (seq, row, seq * 10 + row); feature `private` is null, as an
    agent sends a feature listed in `sample_exclude`."""
    w = shifted_window(device, seq, edges, n=50)
    w.sample = [
        SampleRow(x=[None if j == private else float(v) for j, v in enumerate((seq, r, seq * 10 + r))], y=r % 2)
        for r in range(rows)
    ]
    return w


def stored_rows(fleet: ServerHandle, device: str) -> int:
    return len(fleet.svc.storage.recent_samples(device, 10_000))


@pytest.mark.broker
def test_samples_are_stored_newest_first_with_privacy_nulls_and_the_models_column_names(fleet, signing_key):
    private, pub_path = signing_key
    trust_key(fleet.svc, pub_path.read_bytes())
    upload_bundle(fleet.svc, make_bundle(private))  # pump 1.0.0, inputs FEATURES
    edges = profile_edges(fleet.svc.storage.get_model("pump", "1.0.0")["manifest"])
    dev = DeviceClient(fleet.config, "dev-a", fleet.provision("dev-a")).wait_connected()
    try:
        sent = [sampled_window("dev-a", seq, 4, private=1, edges=edges) for seq in (1, 2, 3)]
        for w in sent:
            dev.publish("telemetry", w)
        dev.publish("telemetry", sent[1])  # a replay adds no rows
        wait_until(lambda: stored_rows(fleet, "dev-a") == 12, 10, message="sampled rows stored")
        time.sleep(0.3)
        r = fleet.api("get", "/api/v1/devices/dev-a/samples?limit=10", "viewer")
        assert r.status_code == 200
        body = r.json()
        rows = body["samples"]
        assert len(rows) == 10
        assert [row["seq"] for row in rows] == [3] * 4 + [2] * 4 + [1] * 2
        assert rows[0] == {
            "seq": 3, "model": "pump", "model_version": "1.0.0", "window_end": sent[2].window_end,
            "x": [3.0, None, 30.0], "y": 0,
        }
        assert all(row["x"][1] is None for row in rows)  # excluded on the device, kept as null
        assert body["columns"] == [
            {"model": "pump", "model_version": "1.0.0", "registered": True, "features": list(FEATURES),
             "output": "label"}
        ]
        assert body["kept_per_device"] == 200
        assert stored_rows(fleet, "dev-a") == 12
        assert fleet.api("get", "/api/v1/devices/nobody/samples", "viewer").status_code == 404
        assert fleet.api("get", "/api/v1/devices/dev-a/samples?limit=0", "viewer").status_code == 400
        assert fleet.api("get", "/api/v1/devices/dev-a/samples", role="").status_code == 401
    finally:
        dev.close()


@pytest.mark.broker
def test_only_the_newest_rows_are_kept_per_device(small_fleet):
    fleet = small_fleet
    a = DeviceClient(fleet.config, "dev-a", fleet.provision("dev-a")).wait_connected()
    b = DeviceClient(fleet.config, "dev-b", fleet.provision("dev-b")).wait_connected()
    try:
        b.publish("telemetry", sampled_window("dev-b", 1, 3))
        for seq in range(1, 11):
            a.publish("telemetry", sampled_window("dev-a", seq, 6))
        wait_until(lambda: fleet.svc.storage.seq_stats("dev-a") and fleet.svc.storage.seq_stats("dev-a")[0]["received"] == 10,
                   10, message="windows stored")
        rows = fleet.svc.storage.recent_samples("dev-a", KEEP)
        # The newest 20 of 60 rows: windows 10, 9, 8 whole and two rows of window 7.
        assert len(rows) == KEEP
        assert [r["seq"] for r in rows] == [10] * 6 + [9] * 6 + [8] * 6 + [7] * 2
        assert [r["x"][0] for r in rows] == [r["seq"] for r in rows]
        # Storage itself is bounded: what is left beyond K is at most one window's rows.
        kept = db_rows(fleet.svc.storage, "SELECT seq FROM samples WHERE device = 'dev-a' ORDER BY seq")
        assert [s for (s,) in kept] == [7, 8, 9, 10]
        assert stored_rows(fleet, "dev-b") == 3  # another device's bound is its own
        r = fleet.api("get", "/api/v1/devices/dev-a/samples?limit=1000", "viewer").json()
        assert len(r["samples"]) == KEEP and r["kept_per_device"] == KEEP
        assert r["columns"][0]["registered"] is False and r["columns"][0]["features"] == ["x0", "x1", "x2"]
    finally:
        a.close()
        b.close()


@pytest.mark.broker
def test_bandwidth_counts_the_payload_bytes_sent(fleet):
    dev = DeviceClient(fleet.config, "dev-a", fleet.provision("dev-a")).wait_connected()
    try:
        payloads = [encode(sampled_window("dev-a", seq, seq % 5)) for seq in range(1, 9)]
        for p in payloads:
            dev.publish("telemetry", p)
        dev.publish("telemetry", payloads[0])  # a duplicate is not stored again, nor counted
        dev.publish("telemetry", b"{not json")  # rejected: no window, no bytes
        wait_until(lambda: fleet.svc.storage.seq_stats("dev-a") and fleet.svc.storage.seq_stats("dev-a")[0]["received"] == 8,
                   10, message="windows stored")
        time.sleep(0.3)
        r = fleet.api("get", "/api/v1/devices/dev-a/bandwidth?step_s=60", "viewer")
        assert r.status_code == 200
        bw = r.json()
        assert bw["messages"] == 8
        assert bw["bytes"] == sum(len(p) for p in payloads)
        assert sum(p["bytes"] for p in bw["points"]) == bw["bytes"]
        assert sum(p["messages"] for p in bw["points"]) == 8
        assert bw["bytes_per_message"] == pytest.approx(bw["bytes"] / 8)
        assert bw["bytes_per_hour"] > 0 and bw["messages_per_hour"] > 0
        assert all(p["bytes_per_hour"] >= p["bytes"] * 60 for p in bw["points"])  # 60 s steps
        assert fleet.api("get", "/api/v1/devices/dev-a/bandwidth?step_s=0.5", "viewer").status_code == 400
        assert fleet.api("get", "/api/v1/devices/nobody/bandwidth", "viewer").status_code == 404
    finally:
        dev.close()


def test_no_rows_are_kept_when_samples_per_device_is_zero(request, tmp_path, backend):
    storage = open_storage(backend_url(request, backend, tmp_path))
    try:
        storage.store_batch(IngestBatch(windows=[(sampled_window("a", 1, 4), 1.0, 900)]), 60.0, 2.0,
                            samples_per_device=0)
        assert storage.recent_samples("a") == []
        assert storage.device_bandwidth("a", None, 3600.0)[0]["bytes"] == 900
    finally:
        storage.close()
