"""The controller's pass at fleet scale, on every backend: a pass with nothing to change asks the
database the same questions whatever the fleet's size, reads no device row whole, does not read
the rollout's assignments again and publishes nothing; one that has something to change does it
(the devices a stage takes are told once); a pass that looks only at the devices that changed
leaves nothing that a pass over every device would change."""

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
# Reads over every assigned or registered device: a steady pass remembers or skips them.
EVERY_DEVICE_READS = {"rollout_assignments", "rollout_status_changes", "rollout_devices_to_tell", "device_ids"}
# Reads that may ask about some devices only: counted apart when they do. A steady pass on
# PostgreSQL may ask about a device that changed just before the previous pass once more (while
# another transaction of the cluster ran, an autovacuum's ANALYZE say): never about all.
ASKS_ABOUT_SOME = {"rollout_status_changes", "rollout_devices_to_tell"}


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
            # A question about some devices (those that changed) is told apart from one about all.
            some = name in ASKS_ABOUT_SOME and kwargs.get("devices") is not None
            self.calls[f"{name}(some)" if some else name] += 1
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
    # The pass after one that told devices looks at those once more (what they were told changed).
    assert rollouts.reconcile(svc)["published"] == 0
    counting = CountingStorage(svc.storage)
    real, svc.storage = svc.storage, counting
    try:
        assert rollouts.reconcile(svc)["published"] == 0
    finally:
        svc.storage = real
    return Counter({k: v for k, v in counting.calls.items() if not k.endswith("(some)")})


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
        assert not EVERY_DEVICE_READS & set(stage_one) and not EVERY_DEVICE_READS & set(last_stage)
        seen[devices] = (stage_one, last_stage)
    assert seen[20] == seen[200]
    assert seen[20][0] == seen[20][1]


def _full_pass_would_change(svc, rid: str, timeout_s: float) -> tuple[list, list]:
    """What a pass over every device would still change: statuses (but for devices on probation,
    which it lists every time) and devices to tell. Asked of the database, nothing written."""
    from fleet_server.rollouts.records import FAILED_OUTCOMES, PROBATION_STATES

    statuses = svc.storage.rollout_status_changes(rid, "2.0.0", svc.clock(), timeout_s,
                                                  failed_outcomes=FAILED_OUTCOMES, probation_states=PROBATION_STATES)
    tell = svc.storage.rollout_devices_to_tell(rid, "pump", "2.0.0")
    return statuses, tell


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pass_over_the_devices_that_changed_leaves_nothing_a_full_pass_would_change(request, backend, tmp_path):
    """Reports, failure events, probation, going offline, revocation, another desired state and
    timeouts, each followed by a pass that looks only at what changed: afterwards a pass over
    every device has nothing left to change, and the devices on probation are the ones it knows."""
    from edge_agent.protocol import Status, UpdateEvent

    url = backend_url(request, backend, tmp_path)
    svc = _fleet(url, tmp_path, 40)
    clock = [time.time()]
    svc.clock = lambda: clock[0]
    try:
        rid = rollouts.create_rollout(svc, {"model": "pump", "version": "2.0.0", "target": {"all": True},
                                            "device_timeout_s": 30,
                                            "stages": [{"percent": 50, "min_soak_s": 3600},
                                                       {"percent": 100, "min_soak_s": 3600}]})["id"]
        assert rollouts.reconcile(svc)["published"] == 20  # a pass over every device: the first
        assigned = sorted(m["device"] for m in svc.storage.rollout_devices(rid))
        seq = iter(range(1, 1000))

        def report(device: str, **fields) -> tuple:
            clock[0] += 0.001
            return (ReportedState(device=device, ts=clock[0], model="pump", **fields), clock[0])

        def step(batch: IngestBatch | None = None, advance_s: float = 1.0) -> dict[str, str]:
            if batch is not None:
                svc.storage.store_batch(batch, 60.0, clock[0])
            clock[0] += advance_s
            calls = _steady_calls_any(svc)
            assert "rollout_assignments" not in calls  # it remembered the assignments
            statuses, tell = _full_pass_would_change(svc, rid, 30.0)
            assert tell == []
            assert all(trial for _, _, trial in statuses), statuses
            assert {d for d, _, _ in statuses} == svc.rollout_memory.probation[rid]
            return {m["device"]: m["status"] for m in svc.storage.rollout_devices(rid)}

        updated, failing, trial, revoked, silent = assigned[:5], assigned[5], assigned[6], assigned[7], assigned[8:]
        got = step(IngestBatch(reported=[report(d, active_version="2.0.0") for d in updated]))
        assert {got[d] for d in updated} == {"updated"} and got[failing] == "pending"
        got = step(IngestBatch(
            reported=[report(failing, active_version="1.0.0", update_state="Idle", rollout_id=rid,
                             update_outcome="failure")],
            events=[(UpdateEvent(device=failing, seq=next(seq), ts=clock[0], kind="outcome", version="2.0.0",
                                 rollout_id=rid, outcome="failure", reason="checksum"), clock[0])]))
        assert got[failing] == "failed"
        got = step(IngestBatch(reported=[report(trial, active_version="2.0.0", candidate_version="2.0.0",
                                                update_state="Probation", rollout_id=rid)]))
        assert got[trial] == "updated" and svc.rollout_memory.probation[rid] == {trial}
        got = step(IngestBatch(statuses=[(Status(device=trial, state="offline", ts=clock[0]), clock[0], False)]))
        assert got[trial] == "pending" and svc.rollout_memory.probation[rid] == set()
        got = step(IngestBatch(reported=[report(updated[0], active_version="1.0.0", update_state="Idle")]))
        assert got[updated[0]] == "pending"  # rolled back by itself: no longer counted as updated
        svc.storage.revoke_device(revoked, clock[0])
        got = step()
        assert got[revoked] == "pending"
        # Someone told a device something else: the pass tells it the rollout's version again.
        svc.storage.put_device_desired(updated[1], {"model": "pump", "version": "1.0.0", "mode": "live",
                                                    "rollout_id": None, "published_at": clock[0]})
        sent = len(svc.publisher.sent)  # type: ignore[union-attr]
        step()
        assert svc.publisher.sent[sent:] == [updated[1]]  # type: ignore[union-attr]
        got = step(advance_s=31.0)  # past the timeout, with nothing reported (and before a full pass)
        assert {got[d] for d in silent} == {"timed_out"} and got[revoked] == "timed_out"
        assert got[failing] == "failed" and got[updated[2]] == "updated"
    finally:
        svc.close()


def _steady_calls_any(svc) -> Counter[str]:
    counting = CountingStorage(svc.storage)
    real, svc.storage = svc.storage, counting
    try:
        rollouts.reconcile(svc)
    finally:
        svc.storage = real
    return counting.calls
