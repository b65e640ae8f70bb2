"""Saved device groups: the tag query language, storage on both backends, the REST API and the
console's counts, and rollouts that target a group while devices' tags change (real simulated
agents, real broker and controller)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import requests

from fleet_server import rollouts
from fleet_server.console.accounts import create_operator
from fleet_server.device_groups import DeviceGroupError, list_groups, save_group, set_device_tags
from fleet_server.group_query import GroupQueryError, parse_query
from fleet_server.rollout_model import RolloutError, parse_spec
from fleet_server.storage.open import open_storage
from tests.postgres_fixtures import BACKENDS, backend_url

pytest_plugins = ["tests.server_fixtures", "tests.sim_fixtures"]


# ---------------------------------------------------------------- the query language

DEVICES = {
    "pump-1": {"site": "madrid", "hw": "pi4", "line": "2"},
    "pump-2": {"site": "madrid", "hw": "pi5"},
    "pump-3": {"site": "berlin", "hw": "pi4"},
    "lab-1": {"site": "madrid", "hw": "pi4", "stage": "lab"},
    "cam-7": {},
}


@pytest.mark.parametrize("query, members", [
    ("site==madrid", {"pump-1", "pump-2", "lab-1"}),
    ("site!=madrid", {"pump-3", "cam-7"}),  # a device without the tag differs from it
    ("site==madrid;hw==pi4", {"pump-1", "lab-1"}),
    ("site==madrid;stage!=lab", {"pump-1", "pump-2"}),
    ("hw=in=(pi5, pi4);site=out=(berlin)", {"pump-1", "pump-2", "lab-1"}),
    ("site==berlin,line==2", {"pump-3", "pump-1"}),  # , is or; ; binds tighter
    ("id==pump-*", {"pump-1", "pump-2", "pump-3"}),
    ("line==*", {"pump-1"}),  # the tag is set
    ("site==mad*;hw==pi?", {"pump-1", "pump-2", "lab-1"}),
    (" site == madrid ; hw == pi5 ", {"pump-2"}),
])
def test_query_selects_devices_by_tags(query, members):
    q = parse_query(query)
    assert {d for d, tags in DEVICES.items() if q.matches(d, tags)} == members


@pytest.mark.parametrize("query, message", [
    ("", "needs a query"),
    ("site=madrid", "cannot read the condition"),
    ("site==", "cannot read the condition"),
    ("site=in=madrid", "takes a list in parentheses"),
    ("site=in=(a,)", "empty"),
    ("site==a)", "unbalanced"),
    ("hw=in=(pi4,pi5", "unbalanced"),
    ("site==a;;hw==b", "cannot read the condition"),
    ("x" * 2001, "at most 2000"),
])
def test_bad_queries_say_what_is_wrong(query, message):
    with pytest.raises(GroupQueryError, match=message):
        parse_query(query)


def test_rollout_target_names_a_group_and_keeps_its_query():
    spec = parse_spec({"model": "m", "version": "2", "target": {"device_group": "madrid", "query": "site==madrid"}})
    assert spec.target.matches("x", {"site": "madrid"}) and not spec.target.matches("x", {"site": "berlin"})
    assert spec.to_dict()["target"] == {"all": False, "tags": {}, "group": None, "devices": [],
                                        "device_group": "madrid", "query": "site==madrid"}
    # Targets without a group keep their stored form (fleet targets compare equal across upgrades).
    assert "query" not in parse_spec({"model": "m", "version": "2", "target": {"all": True}}).to_dict()["target"]
    with pytest.raises(RolloutError, match="has no query"):
        parse_spec({"model": "m", "version": "2", "target": {"device_group": "madrid"}})
    with pytest.raises(RolloutError, match="target query: cannot read"):
        parse_spec({"model": "m", "version": "2", "target": {"query": "site=madrid"}})


# ---------------------------------------------------------------- storage, on every backend


@pytest.fixture(params=BACKENDS)
def storage(request, tmp_path):
    s = open_storage(backend_url(request, request.param, tmp_path))
    for d, tags in DEVICES.items():
        s.insert_device(d, "default", tags, "h", "b", 1.0)
    yield s
    s.close()


def test_groups_and_tags_are_stored(storage):
    row = {"name": "madrid", "query": "site==madrid", "description": "plant", "created_at": 1.0,
           "created_by": "alice", "updated_at": 1.0}
    storage.put_device_group(row)
    storage.put_device_group({**row, "name": "berlin", "query": "site==berlin", "description": ""})
    assert storage.get_device_group("madrid") == row
    assert [g["name"] for g in storage.list_device_groups()] == ["berlin", "madrid"]
    storage.put_device_group({**row, "query": "site==madrid;hw==pi4", "updated_at": 2.0})  # replaces
    assert storage.get_device_group("madrid")["query"] == "site==madrid;hw==pi4"
    assert len(storage.list_device_groups()) == 2
    assert storage.delete_device_group("berlin") is True
    assert storage.delete_device_group("berlin") is False
    assert storage.get_device_group("berlin") is None

    assert storage.set_device_tags("pump-3", {"site": "madrid", "hw": "pi4"}) is True
    assert storage.get_device("pump-3")["tags"] == {"site": "madrid", "hw": "pi4"}
    assert storage.set_device_tags("pump-3", {}) is True
    assert storage.get_device("pump-3")["tags"] == {}
    assert storage.set_device_tags("nobody", {"site": "x"}) is False
    # The tag filters of the device list see the new tags.
    storage.set_device_tags("cam-7", {"site": "madrid"})
    assert {d["id"] for d in storage.list_devices(tags={"site": "madrid"})} == {"pump-1", "pump-2", "lab-1", "cam-7"}


# ---------------------------------------------------------------- API and console


def test_groups_api_counts_members_and_follows_tag_changes(fleet):
    for d, tags in DEVICES.items():
        fleet.provision(d, tags)
    r = fleet.api("put", "/api/v1/groups/madrid", json={"query": "site==madrid;stage!=lab", "description": "plant"})
    assert r.status_code == 200, r.text
    assert r.json()["group"]["members"] == 2
    assert fleet.api("put", "/api/v1/groups/madrid", "viewer", json={"query": "site==x"}).status_code == 403
    assert fleet.api("put", "/api/v1/groups/Bad Name", json={"query": "site==x"}).status_code == 400
    bad = fleet.api("put", "/api/v1/groups/x", json={"query": "site=madrid"})
    assert bad.status_code == 400 and "cannot read the condition" in bad.json()["error"]

    r = fleet.api("put", "/api/v1/devices/pump-3/tags", json={"tags": {"site": "madrid", "hw": "pi4"}})
    assert r.status_code == 200 and r.json()["device"]["tags"] == {"site": "madrid", "hw": "pi4"}
    assert fleet.api("put", "/api/v1/devices/nobody/tags", json={"tags": {}}).status_code == 404
    assert fleet.api("put", "/api/v1/devices/pump-3/tags", json={"tags": {"site": 3}}).status_code == 400

    group = fleet.api("get", "/api/v1/groups/madrid", "viewer").json()["group"]
    assert group["devices"] == ["pump-1", "pump-2", "pump-3"] and group["members"] == 3
    assert group["online"] == 0 and group["offline"] == 0  # never connected
    listed = fleet.api("get", "/api/v1/groups", "viewer").json()["groups"]
    assert [(g["name"], g["members"]) for g in listed] == [("madrid", 3)]

    # The console's device page shows each group's counts.
    create_operator(fleet.svc, "vera", "viewer", "a-long-enough-password")
    session = requests.Session()
    form = session.get(f"{fleet.url}/console/login", timeout=10).text
    token = re.search(r'name="login_token" value="([^"]+)"', form).group(1)
    session.post(f"{fleet.url}/console/login", timeout=10, data={
        "name": "vera", "password": "a-long-enough-password", "login_token": token, "next": "/console/"})
    page = session.get(f"{fleet.url}/console/devices", timeout=10).text
    assert '<tr data-group="madrid"><td>madrid</td><td><code>site==madrid;stage!=lab</code></td><td class="members">3</td>' in page

    assert fleet.api("delete", "/api/v1/groups/madrid").status_code == 200
    assert fleet.api("get", "/api/v1/groups/madrid", "viewer").status_code == 404
    # A rollout naming a group that does not exist is refused with what to do.
    r = fleet.api("post", "/api/v1/rollouts", json={"model": "m", "version": "1", "target": {"device_group": "madrid"}})
    assert r.status_code == 400 and "does not exist" in r.json()["error"]


# ---------------------------------------------------------------- rollouts while tags change

INTERVAL_S = 10.0
NO_STATISTICAL_GATES = {g: {"enabled": False} for g in (
    "error_rate_delta", "p95_latency_ratio", "prediction_js", "shadow_agreement", "input_drift_psi",
    "accuracy_delta")}


def _drive(sim_server, fleet, rid: str, limit_s: float = 1800) -> dict[str, Any]:
    start = sim_server.clock()
    while True:
        rollouts.reconcile(sim_server.svc)
        row = sim_server.svc.storage.get_rollout(rid)
        if row["state"] in ("completed", "paused", "aborted"):
            return rollouts.rollout_status(sim_server.svc, rid)
        assert sim_server.clock() - start <= limit_s, rollouts.rollout_status(sim_server.svc, rid)["waiting_for"]
        fleet.advance(INTERVAL_S)
        sim_server.settle(fleet, judge=False)


def _settle_versions(sim_server, fleet, expected: dict[str, str], limit_s: float = 600) -> None:
    """Reconcile and advance until every device runs what `expected` says."""
    start = sim_server.clock()
    while True:
        rollouts.reconcile(sim_server.svc)
        running = {d: s.active_version for d, s in fleet.states().items()}
        if running == expected:
            return
        assert sim_server.clock() - start <= limit_s, {d: (running[d], v) for d, v in expected.items() if running[d] != v}
        fleet.advance(INTERVAL_S)
        sim_server.settle(fleet, judge=False)


def test_devices_whose_tags_change_join_the_group_rollout_and_its_fleet_target(sim_server):
    from tests.sim_fixtures import trained

    svc = sim_server.svc
    for version in ("1.0.0", "2.0.0", "3.0.0"):
        sim_server.add_model(trained(version))
    sites = {0: "north", 1: "north", 2: "north", 3: "south", 4: "south", 5: "south", 6: "east", 7: "east"}
    fleet = sim_server.fleet({"rate_per_s": 2.0, "window_s": 30.0}, len(sites), step_s=5.0,
                             tags=lambda device_id: {"site": sites[int(device_id.rsplit("-", 1)[1]) - 1]})
    ids = sorted(fleet.ids)
    site = {d: svc.storage.get_device(d)["tags"]["site"] for d in ids}
    north = [d for d in ids if site[d] == "north"]
    south = [d for d in ids if site[d] == "south"]
    east = [d for d in ids if site[d] == "east"]
    fleet.preinstall(trained("1.0.0").bundle_bytes).start(wait_online=60)
    try:
        fleet.advance(30)
        sim_server.settle(fleet, judge=False)
        save_group(svc, "north", "site==north", actor="alice")
        save_group(svc, "south", "site=in=(south)", actor="alice")
        assert {g["name"]: (g["members"], g["online"]) for g in list_groups(svc)} == {"north": (3, 3), "south": (3, 3)}

        plan = {"model": "tumour", "version": "2.0.0", "target": {"device_group": "north"},
                "stages": [{"percent": 50, "min_soak_s": 60}, {"percent": 100, "min_soak_s": 60}],
                "gates": NO_STATISTICAL_GATES}
        rid = rollouts.create_rollout(svc, plan, actor="alice")["id"]
        rollouts.reconcile(svc)
        # Mid-rollout: an east device is retagged north and joins the rollout.
        joiner = east[0]
        set_device_tags(svc, joiner, {"site": "north"})
        # Editing the group afterwards does not move the rollout: it keeps the query it started with.
        save_group(svc, "north", "site==nowhere")
        done = _drive(sim_server, fleet, rid)
        assert done["state"] == "completed", done.get("reason")
        assert done["target"]["device_group"] == "north" and done["target"]["query"] == "site==north"
        assert {m["device"] for m in done["devices"]} == {*north, joiner}
        _settle_versions(sim_server, fleet, {d: "2.0.0" if d in (*north, joiner) else "1.0.0" for d in ids})

        # A second group rollout; then a device of the first group is retagged into the second:
        # told by the first rollout, it joins the second's fleet target.
        save_group(svc, "north", "site==north")
        plan = {**plan, "version": "3.0.0", "target": {"device_group": "south"}}
        rid2 = rollouts.create_rollout(svc, plan, actor="alice")["id"]
        assert _drive(sim_server, fleet, rid2)["state"] == "completed"
        mover = north[0]
        set_device_tags(svc, mover, {"site": "south"})
        # A device that was never told anything and now matches a group gets its fleet target.
        newcomer = east[1]
        set_device_tags(svc, newcomer, {"site": "north"})
        expected = {d: "1.0.0" for d in ids}
        expected.update({d: "2.0.0" for d in (*north, joiner, newcomer) if d != mover})
        expected.update({d: "3.0.0" for d in (*south, mover)})
        _settle_versions(sim_server, fleet, expected)
        counts = {g["name"]: g["members"] for g in list_groups(svc)}
        assert counts == {"north": 4, "south": 4}  # north: 2 left + joiner + newcomer; south: 3 + mover
    finally:
        fleet.stop()


def test_set_device_tags_refuses_bad_tags(sim_server):
    svc = sim_server.svc
    from fleet_server.devices import provision_device

    provision_device(svc, "t-1", {"site": "a"})
    with pytest.raises(DeviceGroupError, match="tag key"):
        set_device_tags(svc, "t-1", {"bad key": "x"})
    with pytest.raises(DeviceGroupError, match="no device"):
        set_device_tags(svc, "t-2", {"site": "a"})
    assert set_device_tags(svc, "t-1", {"site": "b"})["tags"] == {"site": "b"}
