"""Malformed REST input is a 4xx naming the field, never a 500: every JSON body is decoded against
its msgspec schema (fleet_server/api/schemas.py, published in the OpenAPI document) before a view
uses it.

A real server over real HTTP (in-process, without MQTT). Three layers: the cases that answered
500 or were stored (`window_s` as a list, a policy with NUL, a huge integer, a list or a string
for a number); every field of every JSON body of the OpenAPI document against a list of hostile
values; and hypothesis-drawn bodies for every operation of the document. No 5xx, and nothing in
the server's log with a traceback."""

from __future__ import annotations

import copy
import json
import logging
import time
from typing import Any
from urllib.parse import quote

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet_server import registry
from fleet_server.auth import issue_token
from model_tools.signing import generate_keypair, save_public_key
from tests.server_fixtures import make_bundle, make_config

TIMEOUT = 10.0
HOSTILE: list[Any] = [
    None, True, False, 0, -1, 2**53 + 1, 2**63, 10**30, -(10**30), 1.5, -0.0, 1e308, -1e308,
    "", "\x00", "a\x00b", "line\nbreak", "1", "0.3", "NaN", "x" * 5000, "ünïcødé 🚀",
    [], [1], ["a", None], {}, {"a": 1}, {"policy": None}, [[[[[]]]]],
]
RAW_BODIES = [b"", b"NaN", b"1e999", b"[" * 50_000, b'{"id": "a"', b"\xff\xfe", b"\x00", b"null", b"[]", b'"x"',
              b'{"id": 1e999}', b'{"id": "dev-raw", "tags": {"a": "\\ud800"}}']
# Nested fields the table also reaches (the top-level ones come from the OpenAPI document).
NESTED = {
    ("put", "/api/v1/models/{name}/{version}/policy"): ["policy.warn_psi", "policy.alert_psi",
                                                       "policy.min_predictions", "policy.consecutive"],
    ("post", "/api/v1/rollouts"): ["target.all", "target.tags", "target.group", "target.devices",
                                   "stages.0.percent", "stages.0.count", "stages.0.mode", "stages.0.min_soak_s",
                                   "stages.0.min_reporting", "stages.0.approval", "gates.error_rate_delta",
                                   "gates.error_rate_delta.max", "gates.error_rate_delta.min_sample"],
    ("post", "/api/v1/devices"): ["tags.site"],
    ("put", "/api/v1/devices/{device_id}/tags"): ["tags.site"],
}


MAPS = {"tags", "gates"}  # objects whose keys are data, not field names


class LogRecorder(logging.Handler):
    """Every record the server logs at ERROR or with a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bad: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR:
            self.bad.append(self.format(record))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from fleet_server.service import FleetServer

    base = tmp_path_factory.mktemp("validation")
    recorder = LogRecorder()
    logging.getLogger().addHandler(recorder)
    fleet = FleetServer(make_config(base / "server"), mqtt=False, ingest=False, loops=False).start()
    svc = fleet.svc
    private, public = generate_keypair()
    registry.trust_key(svc, save_public_key(public, base / "signer.pub").read_bytes(), "test")
    registry.upload_bundle(svc, make_bundle(private, "pump", "1.0.0"))
    token = issue_token(svc.storage, "validation", "operator", time.time())
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    r = session.post(f"{fleet.url}/api/v1/devices", json={"id": "dev-a"}, timeout=TIMEOUT)
    assert r.status_code == 201, r.text
    r = session.post(f"{fleet.url}/api/v1/rollouts", timeout=TIMEOUT,
                     json={"model": "pump", "version": "1.0.0", "target": {"devices": ["dev-a"]}})
    assert r.status_code == 201, r.text
    rollout_id = r.json()["rollout"]["id"]
    document = session.get(f"{fleet.url}/api/v1/openapi.json", timeout=TIMEOUT).json()
    yield fleet, session, document, rollout_id, recorder
    session.close()
    fleet.stop()
    logging.getLogger().removeHandler(recorder)
    assert recorder.bad == [], "the server logged an error or a traceback:\n" + "\n".join(recorder.bad[:5])


def _ok_path(path: str, rollout_id: str) -> str:
    return (path.replace("{device_id}", "dev-a").replace("{name}", "pump").replace("{version}", "1.0.0")
            .replace("{rollout_id}", rollout_id).replace("{alert_id}", "1").replace("{webhook_id}", "1"))


_counter = iter(range(10**9))


def valid_body(method: str, path: str) -> dict[str, Any]:
    """A body the operation accepts (or refuses for its state, e.g. 409), never for its shape."""
    if path == "/api/v1/devices":
        return {"id": f"dev-{next(_counter)}", "tags": {"site": "berlin"}, "listen": "127.0.0.1:8471",
                "window_s": 30}
    if path.endswith("/policy"):
        return {"policy": {"warn_psi": 0.1, "alert_psi": 0.3, "min_predictions": 100, "consecutive": 2}}
    if path == "/api/v1/keys":
        return {"pem": "not a key", "comment": "c"}
    if path == "/api/v1/webhooks":
        return {"url": "http://127.0.0.1:9/hook"}
    if path == "/api/v1/rollouts":
        return {"model": "pump", "version": "1.0.0", "target": {"devices": ["dev-a"]},
                "stages": [{"percent": 50, "mode": "live", "min_soak_s": 1, "min_reporting": 1, "approval": False}],
                "gates": {"error_rate_delta": {"max": 0.1, "min_sample": 10}}, "on_failure": "pause",
                "device_timeout_s": 60, "name": "n", "blue_green": False}
    if path.endswith("/tags"):
        return {"tags": {"site": "berlin", "line": "2"}}
    if path.startswith("/api/v1/groups/"):
        return {"query": "site==berlin", "description": "Berlin's pumps"}
    if path.startswith("/api/v1/device/credentials"):
        return {"rotation_id": "rot-1"}
    return {"reason": "because"}


def _set(body: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(body)
    node: Any = out
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(leaf)] = value
    else:
        node[leaf] = value
    return out


def json_operations(document: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    """(method, path, top-level fields) of every operation with a JSON body, from the document."""
    schemas = document["components"]["schemas"]
    ops = []
    for path, methods in document["paths"].items():
        for method, op in methods.items():
            content = op.get("requestBody", {}).get("content", {})
            if "application/json" in content:
                ref = content["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
                ops.append((method, path, sorted(schemas[ref]["properties"])))
    return ops


def test_every_json_body_has_a_schema_in_the_document(server):
    _, _, document, _, _ = server
    ops = json_operations(document)
    assert {(m, p) for m, p, _ in ops} >= {("post", "/api/v1/devices"), ("put", "/api/v1/models/{name}/{version}/policy"),
                                          ("post", "/api/v1/rollouts"), ("post", "/api/v1/webhooks"),
                                          ("post", "/api/v1/keys"), ("post", "/api/v1/rollouts/{rollout_id}/abort")}
    assert all(fields for _, _, fields in ops)


def test_the_reported_cases_are_400_naming_the_field(server):
    fleet, session, _, _, _ = server
    url = fleet.url + "/api/v1"
    for window in ([60], "60", {"s": 60}, 10**30, 0, True):
        r = session.post(f"{url}/devices", json={"id": "dev-w", "window_s": window}, timeout=TIMEOUT)
        assert r.status_code == 400 and "window_s" in r.json()["error"], (window, r.text)
    assert session.get(f"{url}/devices/dev-w", timeout=TIMEOUT).status_code == 404  # nothing half-made
    for field in ("warn_psi", "alert_psi", "min_predictions", "consecutive"):
        for value in ("\x00", "a\x00", 10**30, -(10**30), [0.3], "0.3", True, {"v": 1}):
            r = session.put(f"{url}/models/pump/1.0.0/policy", json={"policy": {field: value}}, timeout=TIMEOUT)
            assert r.status_code == 400 and f"policy.{field}" in r.json()["error"], (field, value, r.text)
    r = session.put(f"{url}/models/pump/1.0.0/policy", json={"policy": {"alert_pis": 0.3}}, timeout=TIMEOUT)
    assert r.status_code == 400 and "alert_pis" in r.json()["error"]  # a typo is not ignored
    assert session.get(f"{url}/models/pump/1.0.0", timeout=TIMEOUT).json()["model"]["policy_override"] is None
    r = session.put(f"{url}/models/pump/1.0.0/policy", json={"policy": {"alert_psi": 0.4}}, timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["model"]["policy_override"] == {"alert_psi": 0.4}
    r = session.post(f"{url}/devices", json={"id": "dev-opts", "listen": "0.0.0.0:8471", "window_s": 15},
                     timeout=TIMEOUT)
    assert r.status_code == 201 and 'listen = "0.0.0.0:8471"' in r.json()["agent_config"]
    assert "window_s = 15.0" in r.json()["agent_config"]


def test_every_field_of_every_json_body_refuses_hostile_values(server):
    fleet, session, document, rollout_id, recorder = server
    checked = 0
    for method, path, fields in json_operations(document):
        for field in fields + NESTED.get((method, path), []):
            # The innermost field the error can name: msgspec names a map's entries `tags[...]`.
            parts = field.split(".")
            leaf = parts[-1]
            if parts[0] in MAPS and len(parts) == 2:
                leaf = parts[0]
            for value in HOSTILE:
                body = _set(valid_body(method, path), field, value)
                r = session.request(method, fleet.url + _ok_path(path, rollout_id), json=body, timeout=TIMEOUT)
                assert r.status_code < 500, (method, path, field, value, r.status_code, r.text[:300])
                if r.status_code == 400 and r.json()["error"].startswith("invalid request body"):
                    assert leaf in r.json()["error"], (method, path, field, value, r.text[:300])
                checked += 1
        for raw in RAW_BODIES:
            r = session.request(method, fleet.url + _ok_path(path, rollout_id), data=raw, timeout=TIMEOUT,
                                headers={"Content-Type": "application/json"})
            assert r.status_code < 500, (method, path, raw[:40], r.status_code, r.text[:300])
            assert r.status_code >= 400 or raw == b"", (method, path, raw[:40], r.status_code)
    assert checked > 500
    assert recorder.bad == []


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**40), max_value=10**40),
                         st.floats(allow_nan=False), st.text(max_size=30), st.sampled_from(HOSTILE))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=20)


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_operation_of_the_document_survives_hostile_bodies(server, data):
    fleet, session, document, rollout_id, recorder = server
    operations = [(m, p, op) for p, methods in document["paths"].items() for m, op in methods.items()]
    method, path, op = data.draw(st.sampled_from(operations))
    fields = []
    content = op.get("requestBody", {}).get("content", {})
    if "application/json" in content:
        ref = content["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
        fields = sorted(document["components"]["schemas"][ref]["properties"])
    keys = st.sampled_from(fields) if fields else st.text(max_size=10)
    body = data.draw(st.one_of(
        st.builds(lambda base, extra: {**base, **extra}, st.just(valid_body(method, path)),
                  st.dictionaries(keys, json_values, max_size=3)),
        st.dictionaries(keys, json_values, max_size=5),
        json_values,
        st.binary(max_size=200),
    ))
    kwargs: dict[str, Any] = {}
    if isinstance(body, bytes):
        kwargs["data"] = body
    else:
        kwargs["data"] = json.dumps(body)
        kwargs["headers"] = {"Content-Type": data.draw(st.sampled_from(["application/json", "text/plain"]))}
    target = _ok_path(path, rollout_id)
    if data.draw(st.booleans()):  # now and then a hostile path parameter as well
        target = target.replace("dev-a", quote(data.draw(st.sampled_from(["..", "a\x00b", "x" * 300, "%2F"])), safe=""))
    r = session.request(method, fleet.url + target, timeout=TIMEOUT, **kwargs)
    assert r.status_code < 500, (method, path, body if not isinstance(body, bytes) else body[:60], r.status_code,
                                 r.text[:300])
    if r.status_code >= 400:
        assert r.json().get("error"), r.text[:300]
    assert recorder.bad == [], recorder.bad[:3]
