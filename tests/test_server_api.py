"""REST API: auth and roles, JSON errors, OpenAPI coverage, model upload and the bundle download."""

from __future__ import annotations

import hashlib

import pytest
import requests

from fleet_server.api.openapi import OPERATIONS
from fleet_server.app import create_app
from fleet_server.auth import new_token, token_hash
from fleet_server.devices import provision_device
from fleet_server.registry import trust_key
from fleet_server.service import bootstrap
from model_tools.signing import generate_keypair
from tests.postgres_fixtures import db_rows, every_backend, server_storage_url  # noqa: F401 - every backend
from tests.server_fixtures import make_bundle, make_config

pytest_plugins = ["tests.server_fixtures"]


@pytest.fixture
def client(request, tmp_path, backend):
    """The Flask app over real storage (each backend), without MQTT (API tests need no broker)."""
    svc = bootstrap(make_config(tmp_path / "server", public_url="http://fleet.example:8080",
                                storage_url=server_storage_url(request, backend)))
    app = create_app(svc.config, services=svc)
    c = app.test_client()
    c.svc = svc
    c.tokens = {}
    for role in ("viewer", "operator"):
        t = new_token()
        svc.storage.insert_token(role, role, token_hash(t), 0.0)
        c.tokens[role] = {"Authorization": f"Bearer {t}"}
    yield c
    svc.close()


def flask_path(rule: str) -> str:
    import re

    return re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule)


def test_every_api_route_is_in_the_openapi_document(client):
    doc = client.get("/api/v1/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    missing = []
    for rule in client.application.url_map.iter_rules():
        if not rule.rule.startswith("/api/v1"):
            continue
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            if method.lower() not in doc["paths"].get(flask_path(rule.rule), {}):
                missing.append(f"{method} {rule.rule}")
    assert not missing, f"routes missing from openapi.json: {missing}"
    documented = {(m, p) for m, p, *_ in OPERATIONS}
    routes = {
        (m.lower(), flask_path(r.rule))
        for r in client.application.url_map.iter_rules()
        for m in r.methods - {"HEAD", "OPTIONS"}
    }
    assert documented <= routes, f"documented but not routed: {documented - routes}"


def test_tokens_and_roles(client):
    r = client.get("/api/v1/devices")
    assert r.status_code == 401 and "create-token" in r.get_json()["error"]
    assert client.get("/api/v1/devices", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/api/v1/devices", headers=client.tokens["viewer"]).status_code == 200
    r = client.post("/api/v1/devices", json={"id": "d1"}, headers=client.tokens["viewer"])
    assert r.status_code == 403 and "operator" in r.get_json()["error"]
    r = client.post("/api/v1/devices", json={"id": "d1", "tags": {"site": "x"}}, headers=client.tokens["operator"])
    assert r.status_code == 201
    body = r.get_json()
    assert 'username = "d1"' in body["agent_config"] and body["password"] in body["agent_config"]
    r = client.post("/api/v1/devices", json={"id": "d1"}, headers=client.tokens["operator"])
    assert r.status_code == 409 and "already exists" in r.get_json()["error"]
    r = client.post("/api/v1/devices", json={"id": "bad/id"}, headers=client.tokens["operator"])
    assert r.status_code == 400 and "not valid" in r.get_json()["error"]


def test_errors_are_json(client):
    r = client.get("/api/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.get_json()
    r = client.delete("/api/v1/devices", headers=client.tokens["operator"])
    assert r.status_code == 405 and "error" in r.get_json()
    r = client.get("/api/v1/devices/ghost", headers=client.tokens["viewer"])
    assert r.status_code == 404 and "ghost" in r.get_json()["error"]
    r = client.get("/api/v1/devices", query_string={"online": "maybe"}, headers=client.tokens["viewer"])
    assert r.status_code == 400 and "true or false" in r.get_json()["error"]
    r = client.post("/api/v1/devices", data="x", headers=client.tokens["operator"])
    assert r.status_code == 400 and "JSON object" in r.get_json()["error"]


def test_metrics_endpoint(client):
    r = client.get("/metrics")
    assert r.status_code == 200 and b"edgefleet_devices" in r.data


def test_upload_verifies_bundles_and_refuses_with_a_reason(client, signing_key):
    private, pub_path = signing_key
    op = client.tokens["operator"]
    bundle = make_bundle(private)
    r = client.post("/api/v1/models", data=bundle, headers=op)
    assert r.status_code == 400 and "trust-key" in r.get_json()["error"]
    r = client.post("/api/v1/keys", json={"pem": pub_path.read_text()}, headers=op)
    assert r.status_code == 201
    other, _ = generate_keypair()
    r = client.post("/api/v1/models", data=make_bundle(other, version="9"), headers=op)
    assert r.status_code == 422 and "signature" in r.get_json()["error"]
    unsigned = make_bundle(None, version="8")
    r = client.post("/api/v1/models", data=unsigned, headers=op)
    assert r.status_code == 422 and "not signed" in r.get_json()["error"]
    r = client.post("/api/v1/models", data=b"PK\x03\x04 garbage", headers=op)
    assert r.status_code == 422 and "refused" in r.get_json()["error"]
    r = client.post("/api/v1/models", data=bundle, headers=op)
    assert r.status_code == 201
    m = r.get_json()["model"]
    assert m["sha256"] == hashlib.sha256(bundle).hexdigest() and m["size"] == len(bundle)
    assert m["download_url"] == "http://fleet.example:8080/api/v1/models/pump/1.0.0/bundle"
    assert [f["name"] for f in m["features"]][1] == "temp/humidity ratio"
    assert client.post("/api/v1/models", data=bundle, headers=op).status_code == 201  # idempotent
    r = client.post("/api/v1/models", data=make_bundle(private, rows=4000), headers=op)
    assert r.status_code == 409 and "new version" in r.get_json()["error"]
    listed = client.get("/api/v1/models", headers=client.tokens["viewer"]).get_json()["models"]
    assert [(x["name"], x["version"]) for x in listed] == [("pump", "1.0.0")]
    r = client.put("/api/v1/models/pump/1.0.0/policy", json={"policy": {"alert_pis": 1}}, headers=op)
    assert r.status_code == 400 and "alert_pis" in r.get_json()["error"]
    r = client.put("/api/v1/models/pump/1.0.0/policy", json={"policy": {"alert_psi": 0.5}}, headers=op)
    assert r.get_json()["model"]["drift_policy"]["alert_psi"] == 0.5


def test_bundle_download_auth_range_and_etag(client, signing_key):
    private, pub_path = signing_key
    trust_key(client.svc, pub_path.read_bytes())
    bundle = make_bundle(private)
    client.post("/api/v1/models", data=bundle, headers=client.tokens["operator"])
    password = provision_device(client.svc, "dev-1").password
    client.svc.storage.put_device_desired("dev-1", {  # told to take it: a device downloads nothing else
        "model": "pump", "version": "1.0.0", "mode": "live", "rollout_id": None, "published_at": 0.0})
    url = "/api/v1/models/pump/1.0.0/bundle"
    assert client.get(url).status_code == 401
    basic = {"Authorization": "Basic " + __import__("base64").b64encode(f"dev-1:{password}".encode()).decode()}
    wrong = {"Authorization": "Basic " + __import__("base64").b64encode(b"dev-1:nope").decode()}
    assert client.get(url, headers=wrong).status_code == 401
    r = client.get(url, headers=basic)
    assert r.status_code == 200 and r.data == bundle
    assert r.headers["Content-Length"] == str(len(bundle))
    etag = r.headers["ETag"].strip('"')
    assert etag == hashlib.sha256(bundle).hexdigest()
    r = client.get(url, headers={**basic, "Range": "bytes=100-199"})
    assert r.status_code == 206 and r.data == bundle[100:200]
    assert r.headers["Content-Range"] == f"bytes 100-199/{len(bundle)}"
    r = client.get(url, headers={**basic, "Range": f"bytes={len(bundle) - 10}-"})
    assert r.status_code == 206 and r.data == bundle[-10:]
    r = client.get(url, headers={**basic, "Range": f"bytes={len(bundle) + 5}-"})
    assert r.status_code == 416
    assert client.get(url, headers=client.tokens["viewer"]).status_code == 200
    assert client.get("/api/v1/models/pump/2.0/bundle", headers=basic).status_code == 403  # not assigned
    assert client.get("/api/v1/models/pump/2.0/bundle", headers=client.tokens["viewer"]).status_code == 404
    client.post("/api/v1/devices/dev-1/revoke", headers=client.tokens["operator"])
    assert client.get(url, headers=basic).status_code == 401


def test_webhooks_and_tokens_are_stored_hashed(client):
    op = client.tokens["operator"]
    r = client.post("/api/v1/webhooks", json={"url": "ftp://x"}, headers=op)
    assert r.status_code == 400
    r = client.post("/api/v1/webhooks", json={"url": "http://127.0.0.1:9/hook"}, headers=op)
    assert r.status_code == 201 and r.get_json()["secret"]
    hooks = client.get("/api/v1/webhooks", headers=client.tokens["viewer"]).get_json()["webhooks"]
    assert "secret" not in hooks[0]
    assert client.delete(f"/api/v1/webhooks/{hooks[0]['id']}", headers=op).status_code == 200
    raw = client.tokens["viewer"]["Authorization"][7:]
    stored = [r[0] for r in db_rows(client.svc.storage, "SELECT token_hash FROM tokens")]
    assert raw not in stored and token_hash(raw) in stored


def test_waitress_serves_the_app(tmp_path):
    """The production server path: waitress in-process, keep-alive connections."""
    from fleet_server.service import FleetServer

    server = FleetServer(make_config(tmp_path / "s"), mqtt=False, loops=False).start()
    try:
        with requests.Session() as s:
            for _ in range(3):
                r = s.get(server.url + "/api/v1/health", timeout=5)
                assert r.status_code == 200 and r.headers["Server"] == "edgefleet"
                assert r.headers.get("Connection", "").lower() != "close"
    finally:
        server.stop()
