"""Rollout schedules: start not before a time, stages only inside a maintenance window (cron +
duration + time zone), devices activating only inside their own windows.

The window arithmetic is checked on fixed instants (DST days in Europe/Madrid, windows across
midnight); the controller and the agents on a simulated fleet whose clock the test moves: real
agents, real broker, real server.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import pytest
import requests

from fleet_server import registry, rollouts
from fleet_server.rollout_model import RolloutError, parse_spec
from fleet_server.rollouts.schedule import Schedule, Window, parse_duration, parse_schedule
from tests.postgres_fixtures import every_backend, server_storage_url  # noqa: F401 - API tests on every backend

MADRID = "Europe/Madrid"


def ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def local(window: Window, intervals: list[tuple[float, float]]) -> list[tuple[str, str]]:
    return [(window.local_iso(a), window.local_iso(b)) for a, b in intervals]


# ---------------------------------------------------------------- window arithmetic


def test_daily_window_follows_the_wall_clock_across_spring_forward():
    w = Window("0 2 * * *", 7200, MADRID)
    got = w.upcoming(ts("2026-03-27T12:00:00+00:00"), 3)
    # 02:00 does not exist on 29 March (clocks jump to 03:00): the window opens at the jump.
    assert local(w, got) == [("2026-03-28T02:00+01:00", "2026-03-28T04:00+01:00"),
                             ("2026-03-29T03:00+02:00", "2026-03-29T05:00+02:00"),
                             ("2026-03-30T02:00+02:00", "2026-03-30T04:00+02:00")]
    assert [datetime.fromtimestamp(a, UTC).hour for a, _ in got] == [1, 1, 0]  # 02:00 local in UTC
    assert all(b - a == 7200 for a, b in got)  # the duration is elapsed time


def test_daily_window_opens_once_when_the_hour_repeats_in_autumn():
    w = Window("30 2 * * *", 3600, MADRID)
    got = w.upcoming(ts("2026-10-24T12:00:00+00:00"), 2)
    # 02:30 happens twice on 25 October: the window opens at the first, for one elapsed hour.
    assert local(w, got) == [("2026-10-25T02:30+02:00", "2026-10-25T02:30+01:00"),
                             ("2026-10-26T02:30+01:00", "2026-10-26T03:30+01:00")]
    assert w.current(ts("2026-10-25T02:45:00+01:00")) is None  # the second 02:45 is after it closed
    assert w.current(ts("2026-10-25T02:45:00+02:00")) is not None


def test_a_start_in_the_skipped_hour_opens_the_same_time_later():
    w = Window("30 2 * * *", 3600, MADRID)
    assert local(w, w.upcoming(ts("2026-03-28T12:00:00+00:00"), 1)) == [
        ("2026-03-29T03:30+02:00", "2026-03-29T04:30+02:00")]


def test_window_across_midnight():
    w = Window("0 23 * * *", 3 * 3600, MADRID)
    assert w.current(ts("2026-12-07T23:30:00+01:00")) is not None
    assert w.current(ts("2026-12-08T01:59:00+01:00")) == (ts("2026-12-07T23:00:00+01:00"),
                                                           ts("2026-12-08T02:00:00+01:00"))
    assert w.current(ts("2026-12-08T02:00:00+01:00")) is None
    assert w.current(ts("2026-12-07T22:59:00+01:00")) is None
    # On the night clocks go back, 3 h of elapsed time end at 01:00 local.
    assert w.current(ts("2026-10-24T23:30:00+02:00"))[1] == ts("2026-10-25T01:00:00+01:00")


def test_weekday_window_and_waiting_text():
    s = Schedule(window=Window("0 2 * * 1-5", 7200, MADRID))
    friday_noon = ts("2026-12-11T12:00:00+01:00")
    assert s.waiting(friday_noon) == "outside maintenance window, next opens 2026-12-14T02:00+01:00"
    assert s.waiting(ts("2026-12-14T03:00:00+01:00")) is None
    view = s.view(friday_noon)
    assert view["window_open"] is False and view["next_window"]["opens"] == "2026-12-14T02:00+01:00"


def test_not_before_then_window():
    s = parse_schedule({"not_before": "2026-12-08T00:00:00+01:00",
                        "window": {"cron": "0 2 * * *", "duration": "2h", "timezone": MADRID}})
    assert s is not None and s.not_before == ts("2026-12-07T23:00:00+00:00")
    assert s.waiting(ts("2026-12-07T22:00:00+00:00")) == "not started: starts not before 2026-12-08T00:00+01:00"
    assert s.waiting(ts("2026-12-07T23:30:00+00:00")).startswith("outside maintenance window, next opens 2026-12-08T02:00")
    assert s.may_start_stage(ts("2026-12-08T02:30:00+01:00"))


def test_device_windows_from_tags():
    s = Schedule(window=Window("0 2 * * *", 3600, MADRID), device_windows=True)
    now = ts("2026-12-07T12:00:00+00:00")
    # A device's own zone: 02:00 in Santiago de Chile (UTC-3 in December) is 05:00 UTC.
    own_zone = s.activate_windows({"maintenance_tz": "America/Santiago"}, now)
    assert own_zone is not None and len(own_zone) == 7
    assert datetime.fromtimestamp(own_zone[0][0], UTC).isoformat() == "2026-12-08T05:00:00+00:00"
    own = s.activate_windows({"maintenance_window": "30 4 * * *; 90m", "maintenance_tz": "UTC"}, now)
    assert own[0] == [ts("2026-12-08T04:30:00+00:00"), ts("2026-12-08T06:00:00+00:00")]
    default = s.activate_windows({}, now)
    assert datetime.fromtimestamp(default[0][0], UTC).hour == 1  # the rollout's window, Madrid time
    assert Schedule(window=s.window).activate_windows({"maintenance_tz": "UTC"}, now) is None  # off


@pytest.mark.parametrize("raw, message", [
    ({"window": {"cron": "0 2 * *", "duration": "2h"}}, "not a 5-field cron"),
    ({"window": {"cron": "0 25 * * *", "duration": "2h"}}, "not a 5-field cron"),
    ({"window": {"cron": "0 2 31 2 *", "duration": "2h"}}, "not a 5-field cron"),  # never matches
    ({"window": {"cron": "0 2 * * *", "duration": "2 fortnights"}}, "window duration"),
    ({"window": {"cron": "0 2 * * *", "duration": 0}}, "more than 0"),
    ({"window": {"cron": "0 2 * * *", "duration": "2h", "timezone": "Mars/Olympus"}}, "IANA time zone"),
    ({"window": {"cron": "0 2 * * *"}}, "duration is required"),
    ({"not_before": "2026-12-08T02:00:00"}, "with its offset"),
    ({"not_before": "9999-12-31T23:59:00+00:00"}, "between 1970 and 2100"),
    ({"not_before": float("nan")}, "between 1970 and 2100"),
    ({"when": "soon"}, "unknown field"),
])
def test_bad_schedules_are_refused(raw, message):
    with pytest.raises(RolloutError, match=message):
        parse_spec({"model": "m", "version": "2", "schedule": raw})


def test_schedule_is_kept_in_the_spec_and_absent_without_one():
    spec = parse_spec({"model": "m", "version": "2", "schedule": {
        "window": {"cron": "0  2 * * *", "duration": "1h30m", "timezone": MADRID}}})
    assert spec.to_dict()["schedule"] == {"not_before": None, "device_windows": False,
                                          "window": {"cron": "0 2 * * *", "duration_s": 5400.0, "timezone": MADRID}}
    assert parse_spec(spec.to_dict()) == spec  # the stored form reads back the same
    assert "schedule" not in parse_spec({"model": "m", "version": "2"}).to_dict()
    assert parse_duration("1d") == 86400 and parse_duration(90) == 90


def test_rehearsal_clock_starts_shortly_before_the_rollout_may_act():
    from firmware_sim.rehearse.run import SCHEDULE_LEAD_S, _start_time

    now = ts("2026-12-07T12:00:00+00:00")
    notes: list[str] = []
    plan = {"schedule": {"window": {"cron": "0 2 * * *", "duration": "2h", "timezone": MADRID}}}
    assert _start_time(plan, now, notes) == ts("2026-12-08T02:00:00+01:00") - SCHEDULE_LEAD_S
    assert notes == ["schedule: the simulated clock starts at 2026-12-08T01:55+01:00, 5 min before the rollout "
                     "may first act"]
    later = {"schedule": {"not_before": "2026-12-10T00:00:00Z"}}
    assert _start_time(later, now, []) == ts("2026-12-10T00:00:00+00:00") - SCHEDULE_LEAD_S
    assert _start_time({}, now, []) == now
    assert _start_time({"schedule": {"window": {"cron": "* * * * *", "duration": 60}}}, now, []) == now


# ---------------------------------------------------------------- the REST API, on every storage backend


@pytest.fixture
def api(tmp_path, request, backend):
    from firmware_sim.clock import SimClock
    from fleet_server.auth import issue_token
    from fleet_server.service import FleetServer
    from model_tools.signing import generate_keypair, save_public_key
    from tests.server_fixtures import make_bundle, make_config

    clock = SimClock(speed=0, start=ts("2026-12-07T12:00:00+00:00"))
    config = make_config(tmp_path / "server", storage_url=server_storage_url(request, backend))
    fleet = FleetServer(config, clock=clock, mqtt=False, ingest=False, loops=False).start()
    private, public = generate_keypair()
    registry.trust_key(fleet.svc, save_public_key(public, tmp_path / "signer.pub").read_bytes(), "test")
    registry.upload_bundle(fleet.svc, make_bundle(private, "pump", "2.0.0"))
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {issue_token(fleet.svc.storage, 'ops', 'operator', time.time())}"
    assert session.post(f"{fleet.url}/api/v1/devices", json={"id": "dev-a"}, timeout=10).status_code == 201

    def call(method: str, path: str, **kwargs) -> requests.Response:
        return session.request(method, f"{fleet.url}/api/v1{path}", timeout=10, **kwargs)

    yield call
    session.close()
    fleet.stop()


def test_api_stores_the_schedule_and_says_why_it_waits(api):
    body = {"model": "pump", "version": "2.0.0", "target": {"devices": ["dev-a"]},
            "schedule": {"window": {"cron": "0 2 * * *", "duration": "2h", "timezone": MADRID}}}
    r = api("post", "/rollouts", json=body)
    assert r.status_code == 201, r.text
    rid = r.json()["rollout"]["id"]
    shown = api("get", f"/rollouts/{rid}").json()["rollout"]
    assert shown["waiting"] == "outside maintenance window, next opens 2026-12-08T02:00+01:00"
    assert shown["schedule"]["window"] == {"cron": "0 2 * * *", "duration_s": 7200.0, "timezone": MADRID}
    assert shown["schedule"]["next_window"]["closes"] == "2026-12-08T04:00+01:00"
    assert shown["spec"]["schedule"]["window"]["cron"] == "0 2 * * *"
    # Operator actions work outside the window.
    assert api("post", f"/rollouts/{rid}/pause", json={}).json()["rollout"]["state"] == "paused"
    assert api("get", f"/rollouts/{rid}").json()["rollout"]["waiting"] is None  # paused: the reason says why
    assert api("post", f"/rollouts/{rid}/resume", json={}).json()["rollout"]["state"] == "running"
    assert api("post", f"/rollouts/{rid}/abort", json={}).json()["rollout"]["state"] == "aborting"
    bad = api("post", "/rollouts", json={**body, "schedule": {"window": {"cron": "61 * * * *", "duration": "1h"}}})
    assert bad.status_code == 400 and "cron" in bad.json()["error"]
    typo = api("post", "/rollouts", json={**body, "schedule": {"windows": {}}})
    assert typo.status_code == 400


def test_not_before_starts_the_first_stage_then(api):
    r = api("post", "/rollouts", json={"model": "pump", "version": "2.0.0", "target": {"devices": ["dev-a"]},
                                       "schedule": {"not_before": "2026-12-09T06:00:00Z"}})
    assert r.status_code == 201, r.text
    shown = r.json()["rollout"]
    assert shown["stage_started_at"] == ts("2026-12-09T06:00:00+00:00")
    assert shown["waiting"] == "not started: starts not before 2026-12-09T06:00+00:00"


# ---------------------------------------------------------------- a simulated fleet of real agents

pytest_plugins = ["tests.sim_fixtures"]
INTERVAL_S = 30.0
DEVICES = 6
# The simulated clock starts at 2027-01-15T08:00:00Z (tests.sim_fixtures.START), 09:00 in Madrid.
# Windows at minutes 5, 15, 25, ... of every hour, 3 minutes long: the first opens 5 minutes in.
EVERY_10 = {"cron": "5-59/10 * * * *", "duration": "3m", "timezone": MADRID}


def _start(sim_server, devices: int = DEVICES, tags=None):
    from tests.sim_fixtures import trained

    sim_server.add_model(trained("1.0.0"))
    sim_server.add_model(trained("2.0.0"))
    kwargs = {"tags": tags} if tags else {}
    fleet = sim_server.fleet({"rate_per_s": 2.0, "window_s": 30.0}, devices, step_s=10.0, **kwargs)
    fleet.preinstall(trained("1.0.0").bundle_bytes).start(wait_online=60)
    fleet.advance(30)
    sim_server.settle(fleet, judge=False)
    return fleet


def _pass_until(sim_server, fleet, rid: str, until: float, stop=None) -> dict[str, Any]:
    """Controller pass, then move the clock, until the clock reaches `until` or `stop(status)`."""
    while True:
        rollouts.reconcile(sim_server.svc)
        status = rollouts.rollout_status(sim_server.svc, rid)
        if (stop is not None and stop(status)) or sim_server.clock() >= until:
            return status
        fleet.advance(INTERVAL_S)
        sim_server.settle(fleet, judge=False)


def _at(sim_server, minutes: float) -> float:
    from tests.sim_fixtures import START

    return START + minutes * 60


@pytest.mark.broker
@pytest.mark.slow
def test_stages_take_devices_only_inside_the_window(sim_server):
    fleet = _start(sim_server)
    try:
        plan = {"model": "tumour", "version": "2.0.0", "target": {"all": True}, "schedule": {"window": EVERY_10},
                "stages": [{"count": 2, "min_soak_s": 240}, {"percent": 100, "min_soak_s": 30}]}
        rid = rollouts.create_rollout(sim_server.svc, plan)["id"]
        status = _pass_until(sim_server, fleet, rid, _at(sim_server, 4.5))
        assert status["cohorts"]["assigned"] == 0 and status["state"] == "running"
        assert status["waiting"] == "outside maintenance window, next opens 2027-01-15T09:05+01:00"
        assert status["waiting_for"][0] == "schedule: outside maintenance window, next opens 2027-01-15T09:05+01:00"
        assert {s.active_version for s in fleet.states().values()} == {"1.0.0"}

        # 08:05Z the window opens: stage 1 takes its 2 devices; its soak ends after the window
        # closed at 08:08Z, so the stage waits with its gates passed.
        status = _pass_until(sim_server, fleet, rid, _at(sim_server, 13))
        assert status["stage"] == 0 and status["cohorts"]["assigned"] == 2
        assert all(m["assigned_at"] >= _at(sim_server, 5) for m in status["devices"])
        assert status["stages"][0]["started_at"] >= _at(sim_server, 5)  # its soak counts from then
        assert status["waiting_for"] == ["schedule: outside maintenance window, next opens 2027-01-15T09:15+01:00"]
        assert status["schedule"]["next_window"]["opens"] == "2027-01-15T09:15+01:00"

        # Pause and resume work outside the window.
        assert rollouts.pause(sim_server.svc, rid, "alice")["state"] == "paused"
        assert rollouts.resume(sim_server.svc, rid, "alice")["state"] == "running"

        # 08:15Z: the window opens again, the stage ends and the last one takes every device.
        # The rollout completes inside a window too (this one or the next, once every device has
        # committed after its probation).
        done = _pass_until(sim_server, fleet, rid, _at(sim_server, 29), stop=lambda s: s["state"] == "completed")
        assert done["state"] == "completed", done["waiting_for"]
        passed = [a for a in done["audit"] if a["action"] == "stage_passed"]
        assert len(passed) == 1 and _at(sim_server, 15) <= passed[0]["ts"] < _at(sim_server, 18)
        assert done["stages"][1]["started_at"] >= _at(sim_server, 15)
        window = Window("5-59/10 * * * *", 180, MADRID)
        assert all(window.current(a["ts"]) for a in done["audit"] if a["action"] in ("stage_passed", "complete"))
        fleet.advance(30)
        sim_server.settle(fleet, judge=False)
        assert {s.active_version for s in fleet.states().values()} == {"2.0.0"}
    finally:
        fleet.stop()


@pytest.mark.broker
@pytest.mark.slow
def test_abort_outside_the_window_is_not_delayed(sim_server):
    fleet = _start(sim_server)
    try:
        plan = {"model": "tumour", "version": "2.0.0", "target": {"all": True}, "schedule": {"window": EVERY_10},
                "stages": [{"count": 3, "min_soak_s": 600}, {"percent": 100, "min_soak_s": 60}]}
        rid = rollouts.create_rollout(sim_server.svc, plan)["id"]
        status = _pass_until(sim_server, fleet, rid, _at(sim_server, 9))
        taken = [m["device"] for m in status["devices"]]
        assert len(taken) == 3 and {fleet.states()[d].active_version for d in taken} == {"2.0.0"}
        assert status["schedule"]["window_open"] is False
        assert rollouts.abort(sim_server.svc, rid, "alice")["state"] == "aborting"
        done = _pass_until(sim_server, fleet, rid, _at(sim_server, 14.5), stop=lambda s: s["state"] == "aborted")
        assert done["state"] == "aborted"  # before the next window opens at 08:15Z
        assert {m["status"] for m in done["devices"]} == {"reverted"}
        assert {s.active_version for s in fleet.states().values()} == {"1.0.0"}
    finally:
        fleet.stop()


@pytest.mark.broker
@pytest.mark.slow
def test_devices_activate_only_inside_their_own_window(sim_server):
    # Half the devices have their own window, 08:12-08:15 UTC; the others take any time. The
    # rollout starts not before 08:03Z.
    def tags(device_id: str) -> dict[str, str]:
        late = int(device_id.rsplit("-", 1)[1]) % 2 == 0
        return {"maintenance_window": "12 8 * * *; 3m", "maintenance_tz": "UTC"} if late else {}

    fleet = _start(sim_server, tags=tags)
    try:
        late = sorted(d for d in fleet.ids if tags(d))
        plan = {"model": "tumour", "version": "2.0.0", "target": {"all": True}, "device_timeout_s": 300,
                "schedule": {"not_before": _at(sim_server, 3), "device_windows": True},
                "stages": [{"percent": 100, "min_soak_s": 60}]}
        rid = rollouts.create_rollout(sim_server.svc, plan)["id"]
        status = _pass_until(sim_server, fleet, rid, _at(sim_server, 2))
        assert status["cohorts"]["assigned"] == 0
        assert status["waiting"] == "not started: starts not before 2027-01-15T08:03+00:00"

        status = _pass_until(sim_server, fleet, rid, _at(sim_server, 11.5))
        states = fleet.states()
        assert status["state"] == "running" and status["cohorts"]["assigned"] == DEVICES
        for d in fleet.ids:
            if d in late:  # downloaded and self-tested, held for the window; not timed out
                assert states[d].active_version == "1.0.0", d
                assert sim_server.svc.storage.get_device(d)["reported"]["candidate_version"] == "2.0.0"
            else:
                assert states[d].active_version == "2.0.0", d
        assert {m["status"] for m in status["devices"] if m["device"] in late} == {"pending"}

        done = _pass_until(sim_server, fleet, rid, _at(sim_server, 20), stop=lambda s: s["state"] == "completed")
        assert done["state"] == "completed", done["waiting_for"]
        events = [e for e in sim_server.svc.storage.rollout_events(rid)
                  if e["device"] in late and e["kind"] == "transition" and e.get("to_state") == "Activate"]
        assert len(events) == len(late)
        assert all(_at(sim_server, 12) <= e["ts"] < _at(sim_server, 15) for e in events), events
    finally:
        fleet.stop()


@pytest.mark.broker
@pytest.mark.slow
def test_rehearsal_honours_the_schedule():
    from firmware_sim.rehearse import rehearse
    from firmware_sim.rehearse.run import SCHEDULE_LEAD_S
    from firmware_sim.scenario import parse_scenario
    from tests.agent_fixtures import bundle_bytes, public_pem
    from tests.test_rehearse import skewed_dataset
    from tests.test_rollout_agents import plan, stage

    schedule = {"window": {"cron": "0 2 * * *", "duration": "20m", "timezone": MADRID}}
    report = rehearse(plan("2.0.0", [stage(50, soak=60), stage(100, soak=60)], schedule=schedule), devices=4,
                      scenario=parse_scenario({"rate_per_s": 2.0, "window_s": 30.0}, "schedule-test"),
                      current_bundle=bundle_bytes("lr", "1.0.0"), candidate_bundle=bundle_bytes("lr", "2.0.0"),
                      trusted_keys=[public_pem("trusted")], dataset=skewed_dataset(), interval_s=30.0,
                      max_sim_s=3600)
    assert report.outcome == "completed", report.table()
    # The clock started 5 minutes before 02:00 in Madrid (whatever the date and offset).
    assert any(n.startswith("schedule: the simulated clock starts at ") and "T01:55+0" in n
               for n in report.notes), report.notes
    # The first stage took its devices when the window opened, 5 minutes after the rollout was
    # created, and its soak counted from then.
    assert report.stages[0].started_at >= SCHEDULE_LEAD_S - 60, report.table()
    assert report.sim_s > SCHEDULE_LEAD_S
