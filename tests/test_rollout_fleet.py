"""Rollouts on a simulated fleet of 150 devices: real agents, real broker, real server and controller.

The server runs on the simulation's hand-driven clock; the test moves it one controller interval
at a time, waits until the server stored everything the devices sent, then runs one reconcile
pass — the same loop the server runs by itself, in lockstep, so every run sees the same sequence.
"""

from __future__ import annotations

from typing import Any

import pytest

from edge_agent.update.states import MAX_ATTEMPTS
from fleet_server import rollouts

pytest_plugins = ["tests.sim_fixtures"]
# 150 devices through up to 40 simulated minutes: several minutes of CPU on a loaded 2-core machine.
pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(900)]

DEVICES = 150
INTERVAL_S = 10.0  # simulated seconds between two controller passes


def drive(sim_server, fleet, rid: str, states: set[str], limit_s: float) -> dict[str, Any]:
    """Pass, advance, settle until the rollout is in one of `states` (at most `limit_s` simulated)."""
    start = sim_server.clock()
    while True:
        rollouts.reconcile(sim_server.svc)
        row = sim_server.svc.storage.get_rollout(rid)
        if row["state"] in states:
            return rollouts.rollout_status(sim_server.svc, rid)
        if sim_server.clock() - start > limit_s:
            status = rollouts.rollout_status(sim_server.svc, rid)
            raise AssertionError(f"rollout {row['state']} at stage {row['stage']} after {limit_s:.0f} s: "
                                 f"{status['waiting_for']} {[(g['name'], g['status'], g['value']) for g in status['gates']]}")
        fleet.advance(INTERVAL_S)
        sim_server.settle(fleet, judge=False)


def start(sim_server, scenario: dict[str, Any], devices: int = DEVICES):
    from tests.sim_fixtures import trained

    v1, v2 = trained("1.0.0"), trained("2.0.0")  # the same model under a new version
    sim_server.add_model(v1)
    sim_server.add_model(v2)
    fleet = sim_server.fleet({"rate_per_s": 2.0, "window_s": 30.0, **scenario}, devices, step_s=5.0)
    fleet.preinstall(v1.bundle_bytes).start(wait_online=60)
    fleet.advance(30)
    sim_server.settle(fleet, judge=False)
    return fleet


def test_happy_path_to_every_device(sim_server):
    fleet = start(sim_server, {})
    try:
        plan = {"model": "tumour", "version": "2.0.0", "target": {"all": True}, "stages": [
            {"percent": 5, "mode": "shadow", "min_soak_s": 60}, {"percent": 10, "min_soak_s": 60},
            {"percent": 50, "min_soak_s": 60}, {"percent": 100, "min_soak_s": 60}]}
        rid = rollouts.create_rollout(sim_server.svc, plan, actor="alice")["id"]
        done = drive(sim_server, fleet, rid, {"completed", "paused"}, 3600)
        assert done["state"] == "completed", done["reason"]
        assert [s["verdict"] for s in done["stages"]] == ["pass"] * 4
        # Every stage soaked at least its minimum.
        assert all(s["ended_at"] - s["started_at"] >= 60 for s in done["stages"])
        assert [a["action"] for a in done["audit"]] == ["create", "stage_passed", "stage_passed", "stage_passed",
                                                         "complete"]
        assert done["audit"][0]["actor"] == "alice"
        # Every device runs the new version, as it says (simulator) and as the server stored.
        fleet.advance(30)
        sim_server.settle(fleet, judge=False)
        assert {s.active_version for s in fleet.states().values()} == {"2.0.0"}
        assert {sim_server.svc.storage.get_device(d)["active_version"] for d in fleet.ids} == {"2.0.0"}
        assert len(done["devices"]) == DEVICES and {m["status"] for m in done["devices"]} == {"updated"}
        assert sim_server.svc.storage.fleet_targets()[0]["version"] == "2.0.0"
    finally:
        fleet.stop()


def test_offline_devices_time_out_then_converge(sim_server):
    # 10 of 150 devices lose their network a minute in, for 20 minutes.
    fleet = start(sim_server, {"fault": [{"kind": "offline", "share": 10 / DEVICES, "start_min": 0.5,
                                          "duration_min": 20}]})
    try:
        fleet.advance(30)
        sim_server.settle(fleet, judge=False)
        away = sorted(d for d, s in fleet.states().items() if s.network_down)
        assert len(away) == 10
        plan = {"model": "tumour", "version": "2.0.0", "target": {"all": True}, "device_timeout_s": 120,
                "stages": [{"percent": 50, "min_soak_s": 60}, {"percent": 100, "min_soak_s": 60}]}
        rid = rollouts.create_rollout(sim_server.svc, plan)["id"]
        done = drive(sim_server, fleet, rid, {"completed", "paused"}, 15 * 60)
        assert done["state"] == "completed", done["reason"]
        assert sorted(done["timeouts"]["devices"]) == away  # the bucket: exactly the devices away
        share = {g["name"]: g for g in done["stages"][1]["gates"]}["timeout_share"]
        assert share["value"] == pytest.approx(10 / DEVICES)
        # They come back at minute 20.5 and read their retained desired state.
        while any(fleet.states()[d].active_version != "2.0.0" for d in away):
            assert fleet.clock() - fleet.started_at < 40 * 60, {d: fleet.states()[d] for d in away}
            fleet.advance(INTERVAL_S)
            sim_server.settle(fleet, judge=False)
        assert {s.active_version for s in fleet.states().values()} == {"2.0.0"}
    finally:
        fleet.stop()


def test_device_that_rolls_back_after_counting_as_updated_is_failed(sim_server):
    # Found by the chaos suite: a device lost power on probation after the controller had counted
    # it updated, rolled back to 1.0.0 when it booted, and the rollout completed saying `updated`.
    # Here one device loses power on probation at every attempt until it gives up.
    devices = 20
    fleet = start(sim_server, {}, devices=devices)
    try:
        plan = {"model": "tumour", "version": "2.0.0", "target": {"all": True},
                "stages": [{"percent": 100, "min_soak_s": 60}]}
        rid = rollouts.create_rollout(sim_server.svc, plan)["id"]
        victim = fleet.ids[0]
        cuts, waited_for_probation = 0, False
        start_s = sim_server.clock()
        while True:
            rollouts.reconcile(sim_server.svc)
            status = rollouts.rollout_status(sim_server.svc, rid)
            if status["state"] != "running":
                break
            waited_for_probation |= any(w.startswith("probation:") for w in status["waiting_for"])
            counted = {m["device"]: m["status"] for m in status["devices"]}.get(victim)
            # Cut only once the controller counts it updated and it really is on probation.
            if counted == "updated" and fleet.states()[victim].update_state == "Probation" \
                    and cuts < MAX_ATTEMPTS and fleet.power_cut(victim):
                cuts += 1
            assert sim_server.clock() - start_s < 1800, (status["waiting_for"], fleet.states()[victim])
            fleet.advance(INTERVAL_S)
            sim_server.settle(fleet, judge=False)
        assert cuts == MAX_ATTEMPTS
        assert waited_for_probation  # the stage did not end while devices could still roll back
        # The rollout completes, but says which device is not on the version and why.
        assert status["state"] == "completed", status["reason"]
        members = {m["device"]: m for m in status["devices"]}
        assert members[victim]["status"] == "failed"
        assert "interrupted in Probation" in members[victim]["reason"]
        assert status["failures"]["devices"] == [{"device": victim, "reason": members[victim]["reason"]}]
        assert {m["status"] for d, m in members.items() if d != victim} == {"updated"}
        gate = {g["name"]: g for g in status["stages"][0]["gates"]}["update_failure_rate"]
        assert gate["value"] == pytest.approx(1 / devices) and gate["sample"] == devices
        fleet.advance(30)
        sim_server.settle(fleet, judge=False)
        versions = {d: s.active_version for d, s in fleet.states().items()}
        assert versions.pop(victim) == "1.0.0" and set(versions.values()) == {"2.0.0"}
    finally:
        fleet.stop()
