"""Actions that no longer apply: the rollout's status document lists the operator actions that
apply now (`actions`, which the console's buttons follow), and the API refuses every other one
with 409 and a message saying why. A completed staged rollout cannot be aborted any more (its
version is the fleet's); a completed blue-green rollout can, once, while no later rollout has
replaced it."""

from __future__ import annotations

import time

import pytest
import requests

from fleet_server import registry
from fleet_server.auth import issue_token
from model_tools.signing import generate_keypair, save_public_key
from tests.server_fixtures import make_bundle, make_config


@pytest.fixture
def api(tmp_path):
    from fleet_server.service import FleetServer

    fleet = FleetServer(make_config(tmp_path / "server"), mqtt=False, ingest=False, loops=False).start()
    svc = fleet.svc
    private, public = generate_keypair()
    registry.trust_key(svc, save_public_key(public, tmp_path / "signer.pub").read_bytes(), "test")
    for version in ("1.0.0", "2.0.0", "3.0.0"):
        registry.upload_bundle(svc, make_bundle(private, "pump", version))
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {issue_token(svc.storage, 'ops', 'operator', time.time())}"
    assert session.post(f"{fleet.url}/api/v1/devices", json={"id": "dev-a"}, timeout=10).status_code == 201

    def call(method: str, path: str, **kwargs) -> requests.Response:
        return session.request(method, f"{fleet.url}/api/v1{path}", timeout=10, **kwargs)

    yield call
    session.close()
    fleet.stop()


def create(api, version: str, **extra) -> str:
    r = api("post", "/rollouts", json={"model": "pump", "version": version, "target": {"devices": ["dev-a"]},
                                       **extra})
    assert r.status_code == 201, r.text
    return r.json()["rollout"]["id"]


def act(api, rollout_id: str, action: str) -> requests.Response:
    return api("post", f"/rollouts/{rollout_id}/{action}", json={"reason": "test"})


def test_a_running_and_a_paused_rollout_offer_what_applies(api):
    rid = create(api, "2.0.0", stages=[{"count": 1}, {"percent": 100}])
    assert api("get", f"/rollouts/{rid}").json()["rollout"]["actions"] == ["pause", "advance", "abort"]
    assert act(api, rid, "resume").status_code == 409
    assert act(api, rid, "pause").json()["rollout"]["actions"] == ["resume", "advance", "abort"]
    again = act(api, rid, "pause")
    assert again.status_code == 409 and "cannot pause a rollout that is paused" in again.json()["error"]
    assert act(api, rid, "abort").json()["rollout"]["actions"] == []
    for action in ("pause", "resume", "advance", "abort"):
        r = act(api, rid, action)
        assert r.status_code == 409 and "aborting" in r.json()["error"], (action, r.text)


def test_a_completed_staged_rollout_cannot_be_aborted(api):
    rid = create(api, "2.0.0", stages=[{"count": 1}, {"percent": 100}])
    act(api, rid, "advance")
    done = act(api, rid, "advance").json()["rollout"]
    assert done["state"] == "completed" and done["actions"] == []
    refused = act(api, rid, "abort")
    assert refused.status_code == 409
    assert "create a rollout of the previous version" in refused.json()["error"]
    assert api("get", f"/rollouts/{rid}").json()["rollout"]["state"] == "completed"  # nothing changed
    for action in ("pause", "resume", "advance"):
        assert act(api, rid, action).status_code == 409


def test_a_completed_blue_green_rollout_aborts_once_while_it_is_current(api):
    first = create(api, "2.0.0", blue_green=True)
    assert act(api, first, "advance").json()["rollout"]["actions"] == ["abort"]  # the instant way back
    second = create(api, "3.0.0", blue_green=True)
    act(api, second, "advance")
    # The first switch was replaced by the second: going "back" to 1.0.0 from it no longer applies.
    assert api("get", f"/rollouts/{first}").json()["rollout"]["actions"] == []
    assert act(api, first, "abort").status_code == 409
    aborting = act(api, second, "abort")
    assert aborting.status_code == 200 and aborting.json()["rollout"]["state"] == "aborting"
    assert act(api, second, "abort").status_code == 409
