"""Fault tests: simulated devices crash in every update state, lose their network, get corrupted
or cut-off downloads, a full disk or a slow CPU — and the real agent code copes."""

from __future__ import annotations

import pytest

from edge_agent.update.events import State
from firmware_sim.faults import CRASH_STATES

pytest_plugins = ["tests.sim_fixtures"]
pytestmark = [pytest.mark.broker, pytest.mark.slow]


def _advance_until(sim_server, fleet, done, limit_s: float, what: str) -> None:
    """Advance a minute at a time (stored and settled) until `done()`, at most `limit_s`."""
    elapsed = 0.0
    while not done():
        if elapsed >= limit_s:
            raise AssertionError(f"{what} not reached after {limit_s:.0f} simulated seconds: "
                                 f"{[(s.device_id, s.update_state, s.active_version, s.last_error) for s in fleet.states().values()]}")
        fleet.advance(60)
        elapsed += 60
        sim_server.settle(fleet, judge=False)


def test_crash_in_every_update_state_ends_on_a_valid_model(sim_server):
    from tests.sim_fixtures import trained

    v1, v2 = trained("1.0.0"), trained("1.1.0", "logreg-strong")
    sim_server.add_model(v1)
    model2 = sim_server.add_model(v2)
    # Shadow is only entered in a shadow rollout; every other update state gets a device.
    states = [s for s in CRASH_STATES if s != State.SHADOW.value and not s.startswith(("Check", "Roll", "Fail", "Clean"))]
    devices = [f"sim-{i:04d}" for i in range(1, len(states) + 1)]
    scenario = {
        "rate_per_s": 2.0,
        "fault": [{"kind": "crash_in_state", "state": s, "devices": [d]} for s, d in zip(states, devices, strict=True)],
    }
    fleet = sim_server.fleet(scenario, len(devices), step_s=10.0).preinstall(v1.bundle_bytes).start(wait_online=30)
    try:
        sim_server.assign(fleet, model2)

        def settled() -> bool:
            st = fleet.states().values()
            return all(s.crashes == 1 and s.running and s.update_state == "Idle" and s.update_outcome for s in st)

        _advance_until(sim_server, fleet, settled, 30 * 60, "every device rebooted and idle")
        before = {d: s.predictions for d, s in fleet.states().items()}
        fleet.advance(120)
        sim_server.settle(fleet, judge=False)
        for device_id, s in fleet.states().items():
            assert s.active_version in ("1.0.0", "1.1.0"), (device_id, s)
            assert s.predictions > before[device_id] and s.refused == 0, (device_id, s)
            row = sim_server.svc.storage.get_device(device_id)
            assert row["active_version"] == s.active_version, (device_id, row)
        # The crashes were where the scenario put them: each device reported the restart.
        for state, device_id in zip(states, devices, strict=True):
            events = sim_server.svc.storage.events(device_id, 200)
            assert any(e.get("event") == "restart" and e.get("from_state") == state for e in events), (device_id, state)
    finally:
        fleet.stop()


def test_offline_devices_deliver_their_outbox_without_loss_or_duplicates(sim_server):
    from tests.sim_fixtures import trained

    v1 = trained()
    sim_server.add_model(v1)
    scenario = {
        "rate_per_s": 2.0,
        "fault": [
            {"kind": "offline", "share": 0.3, "start_min": 2, "duration_min": 8},
            {"kind": "disconnect", "share": 0.2, "start_min": 4, "duration_min": 2},
        ],
    }
    fleet = sim_server.fleet(scenario, 10, step_s=10.0).preinstall(v1.bundle_bytes).start(wait_online=30)
    try:
        sim_server.run(fleet, 5 * 60, judge_every=100)
        down = [d for d, s in fleet.states().items() if s.network_down]
        assert len(down) >= 3
        assert all(s.outbox > 0 for d, s in fleet.states().items() if d in down)  # windows queue up
        for device_id in down:
            assert sim_server.svc.storage.get_device(device_id)["status"] == "offline"
        sim_server.run(fleet, 10 * 60, judge_every=100)
        conn = sim_server.svc.storage.db.conn
        for device_id, s in fleet.states().items():
            assert s.outbox == 0 and s.online, device_id
            stored = conn.execute("SELECT COUNT(*), COUNT(DISTINCT seq) FROM windows WHERE device = ?",
                                  (device_id,)).fetchone()
            assert stored[0] == stored[1] == s.windows, (device_id, stored, s.windows)
            stats = sim_server.svc.storage.seq_stats(device_id)[0]
            assert stats["received"] == stats["max_seq"] - stats["first_seq"] + 1, (device_id, stats)
    finally:
        fleet.stop()


def test_download_disk_and_cpu_faults_fail_safely(sim_server):
    from tests.sim_fixtures import trained

    v1, v2 = trained("1.0.0"), trained("1.1.0", "logreg-strong")
    sim_server.add_model(v1)
    model2 = sim_server.add_model(v2)
    scenario = {
        "rate_per_s": 2.0,
        "fault": [
            {"kind": "corrupt_download", "devices": ["sim-0001"]},
            {"kind": "truncated_download", "devices": ["sim-0002"]},
            {"kind": "full_disk", "devices": ["sim-0003"]},
            {"kind": "slow_cpu", "factor": 100, "devices": ["sim-0004"]},
        ],
    }
    fleet = sim_server.fleet(scenario, 5, step_s=10.0).preinstall(v1.bundle_bytes).start(wait_online=30)
    try:
        sim_server.assign(fleet, model2)

        def done() -> bool:
            return all(s.update_state == "Idle" and s.update_outcome for s in fleet.states().values())

        _advance_until(sim_server, fleet, done, 20 * 60, "every update finished")
        s = fleet.states()
        assert s["sim-0001"].active_version == "1.0.0" and "sha256" in (s["sim-0001"].last_error or "")
        assert s["sim-0002"].active_version == "1.1.0"  # resumed with Range until complete
        assert fleet.downloads is not None and fleet.downloads.requests >= 2
        assert s["sim-0003"].active_version == "1.0.0" and "disk" in (s["sim-0003"].last_error or "")
        assert s["sim-0004"].active_version == "1.0.0" and "latency" in (s["sim-0004"].last_error or "")
        assert s["sim-0005"].active_version == "1.1.0"
    finally:
        fleet.stop()
