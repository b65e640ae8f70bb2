"""Access control through the real server, broker and HTTP: broker ACL between devices, revoked
devices, expired and missing API tokens, a console viewer trying to act, CSRF, and path traversal
in bundle download URLs. Everything is refused, and every refusal is logged or audited."""

from __future__ import annotations

import base64
import logging
import re
import time

import pytest
import requests
from click.testing import CliRunner

from edge_agent.protocol import DesiredState
from fleet_server.auth import issue_token
from fleet_server.devices import revoke_device
from tests.postgres_fixtures import db_rows, every_backend  # noqa: F401 - every backend
from tests.server_fixtures import DeviceClient, make_bundle, shifted_window, wait_until

pytest_plugins = ["tests.server_fixtures"]
pytestmark = [pytest.mark.broker]

EDGES = [[-1.0, 0.0, 1.0]] * 3


def stored_seqs(fleet, device):
    return {r[0] for r in db_rows(fleet.svc.storage, "SELECT seq FROM windows WHERE device = ?", device)}


def test_devices_cannot_use_each_others_topics_or_wildcards(fleet):
    pw_a, pw_b = fleet.provision("acl-a"), fleet.provision("acl-b")
    a = DeviceClient(fleet.config, "acl-a", pw_a).wait_connected()
    b = DeviceClient(fleet.config, "acl-b", pw_b).wait_connected()
    try:
        for pattern in ("ef/#", "#", "$SYS/#", f"ef/{fleet.config.fleet}/d/+/desired",
                        f"ef/{fleet.config.fleet}/d/acl-b/#", f"$share/x/ef/{fleet.config.fleet}/d/+/telemetry"):
            a.client.subscribe(pattern, qos=1)
        b.publish("telemetry", shifted_window("acl-b", 1, EDGES))              # b's own traffic
        a.publish("telemetry", shifted_window("acl-b", 2, EDGES), device="acl-b")  # a forging b's
        a.publish("events", b'{"v": 1}', device="acl-b")
        a.publish("desired", b'{"v": 1}', device="acl-b", retain=True)         # a device never writes desired
        a.publish("desired", b'{"v": 1}', retain=True)
        desired = DesiredState(model="m", version="1", url="http://x", sha256="0" * 64, size=1)
        assert fleet.svc.publisher.publish_desired("acl-b", desired)
        wait_until(lambda: stored_seqs(fleet, "acl-b") == {1}, 10)
        time.sleep(0.5)
        assert stored_seqs(fleet, "acl-b") == {1}
        assert not a.received, [m.topic for m in a.received]  # none of b's telemetry, desired or $SYS
        # b's retained desired is still the server's
        b.client.subscribe(b.topic("desired"), qos=1)
        wait_until(lambda: any(m.topic.endswith("/desired") for m in b.received), 5)
        assert b"sha256" in [m for m in b.received if m.topic.endswith("/desired")][-1].payload
    finally:
        a.close()
        b.close()


def test_a_device_with_another_devices_password_is_refused(fleet):
    fleet.provision("acl-c")
    pw_d = fleet.provision("acl-d")
    stolen = DeviceClient(fleet.config, "acl-c", pw_d).wait_connected()
    assert stolen.refused
    stolen.close()


def test_a_revoked_device_loses_broker_and_download_access(fleet, signing_key, caplog):
    private, pub = signing_key
    fleet.api("post", "/api/v1/keys", json={"pem": pub.read_text()})
    assert fleet.api("post", "/api/v1/models", data=make_bundle(private)).status_code == 201
    pw = fleet.provision("acl-r")
    fleet.svc.storage.put_device_desired("acl-r", {  # told to take it: a device downloads nothing else
        "model": "pump", "version": "1.0.0", "mode": "live", "rollout_id": None, "published_at": 0.0})
    url = fleet.url + "/api/v1/models/pump/1.0.0/bundle"
    assert requests.get(url, auth=("acl-r", pw), timeout=10).status_code == 200
    dev = DeviceClient(fleet.config, "acl-r", pw).wait_connected()
    assert not dev.refused
    dev.close()
    revoke_device(fleet.svc, "acl-r")
    again = DeviceClient(fleet.config, "acl-r", pw).wait_connected()
    assert again.refused
    again.close()
    with caplog.at_level(logging.WARNING, logger="fleet_server.api"):
        r = requests.get(url, auth=("acl-r", pw), timeout=10)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic")
    assert any("refused GET /api/v1/models/pump/1.0.0/bundle" in m for m in caplog.messages), caplog.messages


def test_expired_and_missing_tokens_get_401_with_a_clear_message(fleet, caplog):
    svc = fleet.svc
    token = issue_token(svc.storage, "short-lived", "operator", time.time() - 100, expires_in_s=10)
    live = issue_token(svc.storage, "long-lived", "viewer", time.time(), expires_in_s=3600)
    with caplog.at_level(logging.WARNING, logger="fleet_server.api"):
        r = requests.get(fleet.url + "/api/v1/devices", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert r.status_code == 401
        assert "'short-lived' expired at" in r.json()["error"] and "create-token" in r.json()["error"]
        r = requests.get(fleet.url + "/api/v1/devices", timeout=10)
        assert r.status_code == 401 and "missing or invalid API token" in r.json()["error"]
        r = requests.get(fleet.url + "/api/v1/devices", headers={"Authorization": "Bearer eft_nope"}, timeout=10)
        assert r.status_code == 401
    assert requests.get(fleet.url + "/api/v1/devices", headers={"Authorization": f"Bearer {live}"},
                        timeout=10).status_code == 200
    assert sum("refused GET /api/v1/devices" in m for m in caplog.messages) == 3, caplog.messages
    audit = svc.storage.list_audit(limit=10)
    assert any(a["actor"] == "short-lived" and a["outcome"] == "denied" for a in audit), audit


def test_create_token_cli_expires_in(fleet):
    from fleet_server.cli import server

    runner = CliRunner()
    out = runner.invoke(server, ["create-token", "--data-dir", str(fleet.config.data_dir), "--expires-in", "1h"])
    assert out.exit_code == 0, out.output
    token = out.output.strip()
    expires_at, created_at = db_rows(fleet.svc.storage, "SELECT expires_at, created_at FROM tokens WHERE name = 'cli'")[0]
    row = {"expires_at": expires_at, "created_at": created_at}
    assert row["expires_at"] - row["created_at"] == pytest.approx(3600)
    assert requests.get(fleet.url + "/api/v1/devices", headers={"Authorization": f"Bearer {token}"},
                        timeout=10).status_code == 200
    bad = runner.invoke(server, ["create-token", "--data-dir", str(fleet.config.data_dir), "--expires-in", "soon"])
    assert bad.exit_code != 0 and "not a duration" in bad.output


def _console_session(fleet, role: str) -> tuple[requests.Session, str]:
    from fleet_server.console.accounts import create_operator

    name = f"op-{role}"
    create_operator(fleet.svc, name, role, "correct horse battery")
    s = requests.Session()
    page = s.get(fleet.url + "/console/login", timeout=10)
    token = re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)
    r = s.post(fleet.url + "/console/login", data={"name": name, "password": "correct horse battery",
                                                  "login_token": token, "next": "/console/"},
               timeout=10, allow_redirects=False)
    assert r.status_code in (302, 303), r.text[:300]
    return s, name


def test_console_viewer_cannot_act_and_csrf_is_required(fleet, caplog):
    viewer, vname = _console_session(fleet, "viewer")
    operator, oname = _console_session(fleet, "operator")
    fleet.provision("acl-v")
    with caplog.at_level(logging.WARNING, logger="fleet_server.api"):
        # A viewer's session cannot change anything, CSRF token or not.
        r = viewer.post(fleet.url + "/api/v1/devices/acl-v/revoke", timeout=10)
        assert r.status_code == 403
        # An operator's session without, or with a wrong, CSRF token: refused.
        r = operator.post(fleet.url + "/api/v1/devices/acl-v/revoke", timeout=10)
        assert r.status_code == 403 and "CSRF" in r.json()["error"]
        r = operator.post(fleet.url + "/api/v1/devices/acl-v/revoke", headers={"X-CSRF-Token": "forged"},
                          timeout=10)
        assert r.status_code == 403
    assert fleet.svc.storage.get_device("acl-v")["revoked_at"] is None
    audit = fleet.svc.storage.list_audit(limit=20)
    denied = [(a["actor"], a["outcome"]) for a in audit if a["outcome"] == "denied"]
    assert denied.count((oname, "denied")) == 2 and (vname, "denied") in denied, audit
    assert sum("refused POST /api/v1/devices/acl-v/revoke" in m for m in caplog.messages) >= 3


TRAVERSALS = [
    "/api/v1/models/..%2F..%2Fetc/passwd/bundle",
    "/api/v1/models/%2e%2e/%2e%2e/bundle",
    "/api/v1/models/../../etc/passwd/bundle",
    "/api/v1/models/%2Fetc%2Fpasswd/1.0.0/bundle",
    "/api/v1/models/pump/1.0.0%00/bundle",
    "/api/v1/models/pump/..%2F..%2F..%2Ffleet.db/bundle",
    "/api/v1/models/pump/%2e%2e%2f%2e%2e%2fsecrets%2fmqtt-server-password/bundle",
    "/api/v1/models/%252e%252e/%252e%252e/bundle",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_path_traversal_in_download_urls_is_refused(fleet, signing_key, path, caplog):
    private, pub = signing_key
    fleet.api("post", "/api/v1/keys", json={"pem": pub.read_text()})
    fleet.api("post", "/api/v1/models", data=make_bundle(private))
    pw = fleet.provision("acl-t")
    basic = "Basic " + base64.b64encode(f"acl-t:{pw}".encode()).decode()
    with caplog.at_level(logging.INFO, logger="fleet_server.api"):
        # requests would normalise `..`; send the raw path as a client can.
        session = requests.Session()
        req = requests.Request("GET", fleet.url + path, headers={"Authorization": basic}).prepare()
        req.url = fleet.url + path
        r = session.send(req, timeout=10)
    assert r.status_code in (400, 404), (r.status_code, r.text[:200])
    assert b"root:" not in r.content and b"SQLite" not in r.content and len(r.content) < 1000
    assert r.headers["Content-Type"].startswith("application/json")
    assert any("refused GET" in m for m in caplog.messages), caplog.messages
