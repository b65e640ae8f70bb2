"""Hostile input against the fleet server's REST API (a real `edgefleet server run` process with
its managed Mosquitto, over real HTTP): hypothesis draws requests for every operation in
/api/v1/openapi.json — path parameters with slashes, dots, NUL and unicode, query parameters of
the wrong type, bodies of every JSON shape and random bytes. No 5xx, every answer within the
timeout, the server's RSS bounded."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import psutil
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet_server.auth import issue_token
from fleet_server.storage.sqlite import SqliteStorage
from tests.brokers import free_port, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.broker]

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 5.0
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("hostile-server") / "server"
    storage = SqliteStorage(data_dir / "fleet.db")
    tokens = {role: issue_token(storage, f"fuzz-{role}", role, time.time()) for role in ("viewer", "operator")}
    storage.close()
    port = free_port()
    log = open(data_dir / "server.log", "wb")  # noqa: SIM115 - closed at teardown; a pipe could fill up
    proc = subprocess.Popen(
        [sys.executable, "-c", "from edge_agent.entry import main; main()", "server", "run", "--data-dir",
         str(data_dir), "--listen", f"127.0.0.1:{port}", "--broker-port", str(free_port())],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {(data_dir / 'server.log').read_text()[-2000:]}")
        try:
            return requests.get(f"{url}/api/v1/health", timeout=1).ok
        except requests.ConnectionError:
            return False

    wait_until(up, 30, message="server up")
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {tokens['operator']}"
    r = session.post(f"{url}/api/v1/devices", json={"id": "fuzz-dev"}, timeout=TIMEOUT)
    assert r.status_code == 201, r.text
    operations = []
    for path, methods in session.get(f"{url}/api/v1/openapi.json", timeout=TIMEOUT).json()["paths"].items():
        for method, op in methods.items():
            operations.append((method, path, op))
    yield proc, url, session, operations
    session.close()
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()
    assert "Traceback" not in (data_dir / "server.log").read_text(), "the server logged an unhandled error"


path_values = st.one_of(
    st.sampled_from(["fuzz-dev", "pump", "1.0.0", "..", ".", "%2e%2e", "..%2F..%2Fetc%2Fpasswd", "/etc/passwd",
                     "a\x00b", "%00", "ünïcødé", "🚀", "x" * 5000, "-1", "0", "99999999999999999999999"]),
    st.text(max_size=30),
)
query_values = st.one_of(
    st.sampled_from(["", "-1", "0", "1e308", "nan", "inf", "-inf", "true", "maybe", "tag:", "device:", "fleet",
                     "k=v", "=", "tag:a=b=c", "9" * 400, "\x00", "by"]),
    st.text(max_size=20),
)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
                         st.floats(allow_nan=False), st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)), max_leaves=25)
known_keys = ["id", "tags", "data_dir", "listen", "window_s", "policy", "url", "secret", "pem", "comment",
              "model", "version", "target", "stages", "gates", "on_failure", "reason", "alert_psi"]
bodies = st.one_of(
    json_values,
    st.dictionaries(st.sampled_from(known_keys), json_values, max_size=6),
    st.binary(max_size=300),
)


def _fill(path: str, params: dict[str, str]) -> str:
    for name, value in params.items():
        path = path.replace("{" + name + "}", quote(value, safe=""))
    return path


@FUZZ
@given(data=st.data())
def test_every_route_answers_without_5xx(server, data):
    proc, url, session, operations = server
    method, path, op = data.draw(st.sampled_from(operations))
    params = op.get("parameters", [])
    path_params = {p["name"]: data.draw(path_values) for p in params if p["in"] == "path"}
    query = {p["name"]: data.draw(query_values) for p in params if p["in"] == "query"
             and data.draw(st.booleans())}
    kwargs: dict = {"params": query}
    if method in ("post", "put", "patch"):
        body = data.draw(bodies)
        if isinstance(body, bytes):
            kwargs["data"] = body
        else:
            kwargs["data"] = json.dumps(body)
            kwargs["headers"] = {"Content-Type": "application/json"}
    role = data.draw(st.sampled_from(["operator", "viewer", "none", "garbage"]))
    headers = kwargs.setdefault("headers", {})
    if role == "none":
        headers["Authorization"] = ""
    elif role == "garbage":
        headers["Authorization"] = data.draw(st.sampled_from(["Bearer ", "Basic !!!", "Basic Zm9vOmJhcg==",
                                                               "Bearer eft_" + "A" * 43, "Digest x"]))
    elif role == "viewer":
        headers["Authorization"] = session.headers["Authorization"].replace("operator", "viewer")
    r = session.request(method, url + _fill(path, path_params), timeout=TIMEOUT, **kwargs)
    assert r.status_code < 500, (method, path, path_params, query, r.status_code, r.text[:300])
    if r.status_code >= 400 and r.headers.get("Content-Type", "").startswith("application/json"):
        assert r.json().get("error"), r.text[:300]


def test_rss_stays_bounded_under_hostile_requests(server):
    proc, url, session, operations = server
    pid = psutil.Process(proc.pid)
    junk = [b"\x00" * 1000, b"[" * 50_000, b'{"id": ' + b"9" * 10_000 + b"}", "{\"id\": \"\u00e9\"}".encode()]
    for i in range(50):  # warm-up
        session.post(f"{url}/api/v1/devices", data=junk[i % len(junk)], timeout=TIMEOUT)
    before = pid.memory_info().rss
    for i in range(600):
        session.post(f"{url}/api/v1/devices", data=junk[i % len(junk)], timeout=TIMEOUT,
                     headers={"Content-Type": "application/json"})
        session.get(f"{url}/api/v1/models/..%2F..%2Fetc/passwd/bundle", timeout=TIMEOUT)
    after = pid.memory_info().rss
    for path in ("/api/v1/devices", "/api/v1/rollouts", "/api/v1/webhooks"):  # views parse JSON in two ways
        r = session.post(url + path, data=b"[" * 50_000, headers={"Content-Type": "application/json"},
                         timeout=TIMEOUT)
        assert r.status_code == 400 and "nested too deeply" in r.json()["error"], (path, r.text)
    assert after - before < 32 * 1024 * 1024, f"RSS grew from {before >> 20} to {after >> 20} MiB"
    assert session.get(f"{url}/api/v1/devices/fuzz-dev", timeout=TIMEOUT).status_code == 200
