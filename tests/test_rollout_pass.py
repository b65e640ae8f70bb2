"""The controller's pass at fleet scale, on every backend: a pass with nothing to change asks the
database the same questions whatever the fleet's size, reads no device row whole and publishes
nothing; one that has something to change does it (the devices a stage takes are told once)."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from typing import Any

import pytest

from edge_agent.protocol import ReportedState
from fleet_server import rollouts
from fleet_server.config import ServerConfig
from fleet_server.registry import trust_key, upload_bundle
from fleet_server.storage import IngestBatch
from model_tools.signing import generate_keypair, save_public_key
from tests.postgres_fixtures import BACKENDS, backend_url
from tests.server_fixtures import make_bundle

# Reads that walk the fleet row by row: a steady pass must not need them.
PER_DEVICE_READS = {"list_devices", "get_device", "device_desired", "rollout_events", "device_tag_map",
                    "device_reports", "rollout_devices"}


class RecordingPublisher:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def publish_desired(self, device_id: str, desired: Any) -> bool:
        self.sent.append(device_id)
        return True

    def clear_desired(self, device_id: str) -> bool:
        return True

    def publish_alert(self, payload: Any) -> bool:
        return True


class CountingStorage:
    """The real storage, with a count of the methods called on it."""

    def __init__(self, storage: Any) -> None:
        self._storage = storage
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._storage, name)
        if not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return attr(*args, **kwargs)

        return counted


def _fleet(url: str, tmp_path, devices: int):
    from fleet_server.service import bootstrap

    svc = bootstrap(ServerConfig(data_dir=tmp_path / "data", storage_url=url))
    private, public = generate_keypair()
    trust_key(svc, save_public_key(public, tmp_path / "signer.pub").read_text())
    for version in ("1.0.0", "2.0.0"):
        upload_bundle(svc, make_bundle(private, "pump", version))
    now = time.time()
    for i in range(devices):
        svc.storage.insert_device(f"dev-{i:04d}", "default", {"site": f"s{i % 3}"}, "x", "x", now)
    svc.storage.store_batch(IngestBatch(reported=[
        (ReportedState(device=f"dev-{i:04d}", ts=now, model="pump", active_version="1.0.0"), now)
        for i in range(devices)]), 60.0, now)
    svc.publisher = RecordingPublisher()  # type: ignore[assignment]
    return svc


def _steady_calls(svc) -> Counter[str]:
    counting = CountingStorage(svc.storage)
    real, svc.storage = svc.storage, counting
    try:
        assert rollouts.reconcile(svc)["published"] == 0
    finally:
        svc.storage = real
    return counting.calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pass_with_nothing_to_change_asks_the_same_whatever_the_fleet_size(request, backend, tmp_path):
    seen = {}
    for devices in (20, 200):
        database = None
        if backend == "sqlite":
            url = backend_url(request, backend, tmp_path / str(devices))
        else:  # a database of its own for each fleet
            database = f"t_pass_{devices}_{uuid.uuid4().hex[:8]}"
            url = request.getfixturevalue("pg_cluster").create_database(database)
        svc = _fleet(url, tmp_path / str(devices), devices)
        try:
            rid = rollouts.create_rollout(svc, {"model": "pump", "version": "2.0.0", "target": {"all": True},
                                                "stages": [{"percent": 10, "min_soak_s": 3600},
                                                           {"percent": 100, "min_soak_s": 3600}]})["id"]
            assert rollouts.reconcile(svc)["published"] == devices // 10  # the first stage's cohort, told once
            stage_one = _steady_calls(svc)
            rollouts.advance(svc, rid, actor="test")
            assert rollouts.reconcile(svc)["published"] == devices - devices // 10  # the rest, told once
            last_stage = _steady_calls(svc)
            members = svc.storage.rollout_devices(rid)
            assert len(members) == devices and {m["status"] for m in members} == {"pending"}
            assert len(svc.publisher.sent) == len(set(svc.publisher.sent)) == devices  # type: ignore[union-attr]
        finally:
            svc.close()
            if database is not None:
                request.getfixturevalue("pg_cluster").drop_database(database)
        assert not PER_DEVICE_READS & set(stage_one) and not PER_DEVICE_READS & set(last_stage)
        seen[devices] = (stage_one, last_stage)
    assert seen[20] == seen[200]
    assert seen[20][0] == seen[20][1]
