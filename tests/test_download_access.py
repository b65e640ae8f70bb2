"""Per-device download authorization through the real server and HTTP: a device's credentials open
only the bundle versions it is, or was, told to take (its desired state, its rollouts' versions
and the ones they roll back to, the fleet target that matches it); anything else, including a
version it only claims to run, is 403, logged and audited. Operators' tokens download anything."""

from __future__ import annotations

import logging

import pytest
import requests

from edge_agent.protocol import ReportedState
from fleet_server import registry
from fleet_server.desired import publish_desired
from tests.server_fixtures import DeviceClient, make_bundle, wait_until

pytest_plugins = ["tests.server_fixtures"]
pytestmark = [pytest.mark.broker]


def url(fleet, name: str, version: str) -> str:
    return f"{fleet.url}/api/v1/models/{name}/{version}/bundle"


@pytest.fixture
def models(fleet, signing_key):
    private, pub = signing_key
    fleet.api("post", "/api/v1/keys", json={"pem": pub.read_text()})
    for name, version in (("pump", "1.0.0"), ("pump", "2.0.0"), ("pump", "3.0.0"), ("fan", "1.0.0")):
        assert fleet.api("post", "/api/v1/models", data=make_bundle(private, name=name, version=version)).status_code == 201
    return fleet


def test_a_device_downloads_only_what_it_was_told(models, caplog):
    fleet = models
    svc = fleet.svc
    pw_a, pw_b = fleet.provision("dl-a"), fleet.provision("dl-b")
    # Nothing told yet: every version refused, for both devices.
    with caplog.at_level(logging.WARNING, logger="fleet_server.api"):
        r = requests.get(url(fleet, "pump", "1.0.0"), auth=("dl-a", pw_a), timeout=10)
    assert r.status_code == 403 and "not assigned" in r.json()["error"]
    assert any("refused GET /api/v1/models/pump/1.0.0/bundle" in m for m in caplog.messages), caplog.messages
    audit = svc.storage.list_audit(limit=10)
    assert any(a["actor"] == "dl-a" and a["outcome"] == "denied" and "pump/1.0.0" in a["target"] for a in audit), audit
    # Told 2.0.0: that one opens, for this device only, and nothing else does.
    assert publish_desired(svc, "dl-a", registry.desired_state(svc, "pump", "2.0.0"))
    assert requests.get(url(fleet, "pump", "2.0.0"), auth=("dl-a", pw_a), timeout=10).status_code == 200
    assert requests.get(url(fleet, "pump", "2.0.0"), auth=("dl-b", pw_b), timeout=10).status_code == 403
    for name, version in (("pump", "1.0.0"), ("pump", "3.0.0"), ("fan", "1.0.0")):
        assert requests.get(url(fleet, name, version), auth=("dl-a", pw_a), timeout=10).status_code == 403, version
    # Range requests are held to the same rule.
    r = requests.get(url(fleet, "pump", "3.0.0"), auth=("dl-a", pw_a), headers={"Range": "bytes=0-9"}, timeout=10)
    assert r.status_code == 403
    # Told 3.0.0 next (2.0.0 stays installed on the device for its own rollback): 3.0.0 opens.
    assert publish_desired(svc, "dl-a", registry.desired_state(svc, "pump", "3.0.0"))
    assert requests.get(url(fleet, "pump", "3.0.0"), auth=("dl-a", pw_a), timeout=10).status_code == 200
    assert requests.get(url(fleet, "pump", "1.0.0"), auth=("dl-a", pw_a), timeout=10).status_code == 403
    # An operator's token downloads anything.
    assert fleet.api("get", "/api/v1/models/fan/1.0.0/bundle").status_code == 200


def test_the_matching_fleet_target_opens_and_what_a_device_claims_does_not(models):
    fleet = models
    svc = fleet.svc
    pw_site = fleet.provision("dl-s", {"site": "berlin"})
    pw_other = fleet.provision("dl-o", {"site": "paris"})
    svc.storage.set_fleet_target("pump", {"tags": {"site": "berlin"}}, "3.0.0", None, svc.clock())
    assert requests.get(url(fleet, "pump", "3.0.0"), auth=("dl-s", pw_site), timeout=10).status_code == 200
    assert requests.get(url(fleet, "pump", "3.0.0"), auth=("dl-o", pw_other), timeout=10).status_code == 403
    # A device reporting that it runs fan 1.0.0 (its own claim) is not given fan 1.0.0.
    dev = DeviceClient(fleet.config, "dl-o", pw_other).wait_connected()
    try:
        dev.publish("reported", ReportedState(device="dl-o", ts=svc.clock(), model="fan", active_version="1.0.0",
                                              previous_version="1.0.0"), retain=True)
        wait_until(lambda: (svc.storage.get_device("dl-o")["reported"] or {}).get("active_version") == "1.0.0", 10)
    finally:
        dev.close()
    assert requests.get(url(fleet, "fan", "1.0.0"), auth=("dl-o", pw_other), timeout=10).status_code == 403


def test_a_rollout_opens_its_version_and_the_rollback_target(models):
    """A device in a rollout may fetch the rollout's version and the one it ran before (which an
    abort sends it back to), even once its desired state has moved on."""
    from fleet_server.rollouts import create_rollout

    fleet = models
    svc = fleet.svc
    pw = fleet.provision("dl-r")
    rollout = create_rollout(svc, {"model": "pump", "version": "3.0.0", "target": {"devices": ["dl-r"]},
                                   "stages": [{"percent": 100}]}, actor="test")
    rollout_id = rollout.get("id") or rollout["rollout"]["id"]
    assert requests.get(url(fleet, "pump", "3.0.0"), auth=("dl-r", pw), timeout=10).status_code == 403
    # What the controller records when the device joins (it ran 1.0.0 before).
    svc.storage.put_rollout_devices([{
        "rollout_id": rollout_id, "device": "dl-r", "stage": 0, "mode": "live", "previous_version": "1.0.0",
        "assigned_at": svc.clock(), "desired_at": None, "status": "pending", "status_at": None, "live_at": None,
    }])
    assert requests.get(url(fleet, "pump", "3.0.0"), auth=("dl-r", pw), timeout=10).status_code == 200
    assert requests.get(url(fleet, "pump", "1.0.0"), auth=("dl-r", pw), timeout=10).status_code == 200
    assert requests.get(url(fleet, "pump", "2.0.0"), auth=("dl-r", pw), timeout=10).status_code == 403
