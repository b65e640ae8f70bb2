"""Scenario tests: real agents, real broker, real fleet server, simulated data and clock.

The server judges drift in one-minute buckets on the simulation's clock; the tests assert what
an operator would see: alerts on the drifted devices and features, silence on the clean ones.
"""

from __future__ import annotations

import pytest

from firmware_sim.scenario import assign, load_scenario, parse_scenario

pytest_plugins = ["tests.sim_fixtures"]
pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_sudden_shift_alerts_on_shifted_devices_only(sim_server):
    from tests.sim_fixtures import trained

    scenario = parse_scenario(
        {
            "rate_per_s": 2.0,
            "window_s": 60,
            "drift": [{"kind": "shift", "share": 0.2, "features": ["mean radius", "mean texture"],
                       "start_min": 5, "magnitude": 1.5}],
        },
        "sudden-shift-test",
    )
    model = sim_server.add_model(trained())
    fleet = sim_server.fleet(scenario, 50, step_s=10.0).start(wait_online=30)
    try:
        sim_server.assign(fleet, model)
        fleet.wait(lambda: all(s.active_version == "1.0.0" for s in fleet.states().values()), 60,
                   "every device running 1.0.0")
        shift_at = fleet.started_at + 5 * 60
        sim_server.run(fleet, 60 * 60, judge_every=10)

        shifted = {d for d, (drifts, _) in assign(scenario, fleet.ids).items() if drifts}
        assert len(shifted) == 10
        alerts = [a for a in sim_server.device_alerts() if a["severity"] == "alert"]
        by_device: dict[str, list[dict]] = {}
        for a in alerts:
            by_device.setdefault(a["scope"].removeprefix("device:"), []).append(a)
        # No alert on any clean device over the whole hour.
        assert set(by_device) - shifted == set(), {d: [a["target"] for a in by_device[d]] for d in set(by_device) - shifted}
        # Every shifted device alerts, on the shifted features, within 5 windows of the shift.
        for device in shifted:
            assert device in by_device, f"{device} never alerted"
            targets = {a["target"] for a in by_device[device]}
            assert targets & {"mean radius", "mean texture"}, targets
            # The first alerting bucket ends at most five one-minute windows after the shift.
            first_end = min(a["bucket_start"] for a in by_device[device]) + 60
            assert first_end - shift_at <= 5 * 60, f"{device}: alert bucket ends {first_end - shift_at:.0f}s after the shift"
        # The simulator served the traffic and the server stored every window: nothing lost.
        states = fleet.states()
        assert all(s.predictions >= 2 * 3600 * 0.95 for s in states.values())
        delivery = {s["device"]: s for s in sim_server.svc.storage.seq_stats()}
        for device_id, s in delivery.items():
            assert s["received"] == s["max_seq"] - s["first_seq"] + 1, device_id
    finally:
        fleet.stop()


def test_broken_sensor_is_flagged_on_its_feature(sim_server):
    from tests.sim_fixtures import trained

    scenario = load_scenario("broken-sensor")
    model = sim_server.add_model(trained())
    fleet = sim_server.fleet(scenario, 4, step_s=10.0).start(wait_online=30)
    try:
        sim_server.assign(fleet, model)
        fleet.wait(lambda: all(s.active_version == "1.0.0" for s in fleet.states().values()), 60,
                   "every device running 1.0.0")
        sim_server.run(fleet, 10 * 60)
        alerts = [a for a in sim_server.device_alerts() if a["severity"] == "alert"]
        flagged = {(a["scope"], a["target"]) for a in alerts}
        assert ("device:sim-0001", "mean texture") in flagged  # NaN bursts
        assert ("device:sim-0002", "mean smoothness") in flagged  # stuck at a constant
        assert not {scope for scope, _ in flagged} & {"device:sim-0003", "device:sim-0004"}
        # NaN rows were accepted (the model imputes) and counted, not refused.
        assert fleet.states()["sim-0001"].refused == 0
    finally:
        fleet.stop()
