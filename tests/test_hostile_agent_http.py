"""Hostile input against the agent's own HTTP/1.1 server (a real `edgefleet agent run` process):
random and malformed bodies, wrong types, huge numbers, deep nesting, unicode, oversized bodies
and broken framing. Every request is answered with a 4xx (never a 500) within a timeout, the
agent keeps serving, and its RSS stays bounded."""

from __future__ import annotations

import json
import socket
import time

import psutil
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.agent_fixtures import AgentProcess, bundle_bytes, install_active, make_config
from tests.brokers import wait_until

pytestmark = [pytest.mark.slow]

TOKEN = "fuzz-token"
TIMEOUT = 5.0
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# RFC 9110 answers for a method or protocol version the server does not implement.
PROTOCOL_5XX = {501, 505}


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    """The agent as a subprocess with the LR model active, HTTP on a free port, no MQTT."""
    tmp = tmp_path_factory.mktemp("hostile-agent")
    port = _free_port()
    config = make_config(tmp, listen=f"127.0.0.1:{port}",
                         http={"token": TOKEN, "max_body_bytes": 64 * 1024, "max_rows": 100,
                               "allowed_hosts": [ALLOWED_HOST], "allowed_origins": [ALLOWED_ORIGIN]})
    install_active(config.path, bundle_bytes("lr", "1.0.0"))
    proc = AgentProcess(config, tmp / "agent.toml").start()
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return requests.get(f"{url}/v1/health", headers=AUTH, timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    wait_until(healthy, 30, message="agent serving")
    yield proc, url, port
    proc.stop()


AUTH = {"Authorization": f"Bearer {TOKEN}"}
ALLOWED_HOST = "device-7.plant.example"  # a name the operator exposes the API under
ALLOWED_ORIGIN = "http://127.0.0.1:3000"  # a local web app the operator allows
SESSION = requests.Session()  # keep-alive, as local apps use the API (a refusal may close it)


def _free_port() -> int:
    from tests.brokers import free_port

    return free_port()


def rss(proc: AgentProcess) -> int:
    assert proc.proc is not None
    return psutil.Process(proc.proc.pid).memory_info().rss


def raw_exchange(port: int, data: bytes, *, shut: bool = True) -> bytes:
    """Send bytes on a fresh connection and read until the agent closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.settimeout(TIMEOUT)
        try:
            s.sendall(data)
            if shut:
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the agent refused early and closed: what it answered is still readable
        chunks = []
        try:
            while True:
                part = s.recv(65536)
                if not part:
                    break
                chunks.append(part)
        except ConnectionResetError:
            pass
        return b"".join(chunks)


def statuses(answer: bytes) -> list[int]:
    """Status codes of every response in a raw answer (keep-alive may carry several)."""
    out = []
    for line in answer.split(b"\r\n"):
        if line.startswith(b"HTTP/1.1 "):
            out.append(int(line.split()[1]))
    return out


def still_serving(url: str) -> None:
    r = requests.post(f"{url}/v1/predict", json={"row": [0.1] * 6}, headers=AUTH, timeout=TIMEOUT)
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------ JSON bodies

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=8), st.dictionaries(st.text(max_size=8), inner, max_size=6)), max_leaves=40)
# Shapes that get past the first checks, so the fuzz reaches row and feedback validation.
predict_bodies = st.one_of(
    json_values,
    st.builds(lambda v: {"rows": v}, json_values),
    st.builds(lambda v: {"row": v}, json_values),
    st.builds(lambda v: {"rows": [v]}, st.lists(json_values, min_size=6, max_size=6)),
    st.builds(lambda v: {"row": dict(zip([f"f{i}" for i in range(6)], v, strict=False))},
              st.lists(json_values, min_size=6, max_size=6)),
)
feedback_bodies = st.one_of(
    json_values,
    st.builds(lambda v: {"feedback": v}, json_values),
    st.builds(lambda i, lab, val: {"id": i, "label": lab, "value": val}, json_values, json_values, json_values),
    st.builds(lambda i, lab: [{"id": i, "label": lab}], st.text(max_size=30), json_values),
)
RAW_BODIES = [
    b"[" * 100_000 + b"]" * 100_000,                   # deep nesting
    b'{"rows": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"rows": [[' + b"9" * 20_000 + b", 1, 2, 3, 4, 5]]}",  # a 20,000-digit integer
    b'{"rows": [[1e999999, -1e999999, 1, 2, 3, 4]]}',  # overflow to infinity
    b'{"rows": [[NaN, Infinity, 1, 2, 3, 4]]}',
    b'{"row": {"\\ud800": 1}}',                         # a lone surrogate
    '{"row": {"température ✓ 🚀": 1}}'.encode(),
    b"\xff\xfe\x00\x00garbage",
    b'{"rows": [' + b"[1,2,3,4,5,6]," * 5000 + b"[1,2,3,4,5,6]]}",  # too many rows
    b'{"id": "' + b"a" * 60_000 + b'", "label": 1}',
    b'{"feedback": [' + b'{"id": "x-1", "label": 1},' * 3000 + b'{"id": "x", "label": 1}]}',
]


@FUZZ
@given(body=predict_bodies)
def test_predict_fuzz_gets_4xx_only(agent, body):
    _, url, _ = agent
    r = SESSION.post(f"{url}/v1/predict", data=json.dumps(body), headers=AUTH, timeout=TIMEOUT)
    assert r.status_code < 500, r.text
    assert r.headers["Content-Type"] == "application/json"
    if r.status_code >= 400:
        assert r.json()["error"] and r.json()["message"]


@FUZZ
@given(body=feedback_bodies)
def test_feedback_fuzz_gets_4xx_only(agent, body):
    _, url, _ = agent
    r = SESSION.post(f"{url}/v1/feedback", data=json.dumps(body), headers=AUTH, timeout=TIMEOUT)
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert r.json()["error"] and r.json()["message"]


@FUZZ
@given(body=st.binary(max_size=2048), path=st.sampled_from(["/v1/predict", "/v1/feedback"]))
def test_random_bytes_get_4xx_only(agent, body, path):
    _, url, _ = agent
    r = SESSION.post(f"{url}{path}", data=body, headers=AUTH, timeout=TIMEOUT)
    assert r.status_code < 500, r.text


@pytest.mark.parametrize("body", RAW_BODIES, ids=range(len(RAW_BODIES)))
@pytest.mark.parametrize("path", ["/v1/predict", "/v1/feedback"])
def test_pathological_bodies_get_4xx(agent, body, path):
    _, url, _ = agent
    r = requests.post(f"{url}{path}", data=body, headers=AUTH, timeout=TIMEOUT)
    if r.status_code == 200:  # well-formed feedback for ids this agent never issued: counted, not refused
        assert path == "/v1/feedback" and r.json()["joined"] == 0, r.text
    else:
        assert 400 <= r.status_code < 500, r.text
        assert r.json()["error"]
    still_serving(url)


# ------------------------------------------------------------------ framing

tokens = st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"G\x00T", b"", b"HTTP/1.1", b"HTTP/1.0",
                          b"HTTP/2.0", b"HTTP/9", b"/v1/predict", b"/v1/health", b"/../../etc/passwd",
                          b"*", b"\xff\xfe", b"%00", b" ", b"\t"])
header_lines = st.one_of(
    st.builds(lambda n: b"Content-Length: " + n, st.sampled_from(
        [b"5", b"-1", b"99999999999999999999", b"abc", b"1_0", b"+3", b" 4 ", b"0x10", b""])),
    st.just(b"Transfer-Encoding: chunked"), st.just(b"Expect: 100-continue"), st.just(b"Connection: close"),
    st.just(b"Authorization: Bearer " + TOKEN.encode()), st.just(b"Authorization: Bearer wrong"),
    st.just(b"no colon here"), st.just(b"X-Big: " + b"x" * 70_000), st.binary(max_size=40),
)


@FUZZ
@given(request_line=st.lists(tokens, min_size=0, max_size=4), headers=st.lists(header_lines, max_size=5),
       body=st.binary(max_size=64))
def test_broken_framing_never_hangs_or_fails(agent, request_line, headers, body):
    """Whatever arrives on the socket: an answer below 500 (or 501/505), or a closed connection,
    within the timeout; a half-sent body never blocks other clients."""
    _, _, port = agent
    data = b" ".join(request_line) + b"\r\n" + b"\r\n".join(headers) + b"\r\n\r\n" + body
    start = time.monotonic()
    try:
        answer = raw_exchange(port, data)
    except TimeoutError:
        pytest.fail(f"no answer and no close within {TIMEOUT} s for {data[:200]!r}")
    assert time.monotonic() - start < TIMEOUT + 2
    for status in statuses(answer):
        assert status < 500 or status in PROTOCOL_5XX, answer[:300]


def test_slow_and_idle_connections_do_not_block_others(agent):
    """Connections that send half a request and stall do not stop the agent from serving."""
    _, url, port = agent
    stalled = []
    for i in range(50):
        s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nAuthorization: Bearer " + TOKEN.encode()
                  + b"\r\nContent-Length: 1000\r\n\r\n{\"rows\"" if i % 2 else b"GET /v1/heal")
        stalled.append(s)
    try:
        start = time.monotonic()
        still_serving(url)
        assert time.monotonic() - start < 2
    finally:
        for s in stalled:
            s.close()


def test_oversized_bodies_are_refused_unread(agent):
    _, url, port = agent
    big = b"[" + b"1," * 200_000 + b"1]"
    r = requests.post(f"{url}/v1/predict", data=big, headers=AUTH, timeout=TIMEOUT)
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"
    # A client that claims a huge body and streams it: answered at once, connection closed.
    answer = raw_exchange(port, b"POST /v1/predict HTTP/1.1\r\nAuthorization: Bearer " + TOKEN.encode()
                          + b"\r\nContent-Length: 10000000000\r\n\r\n" + b"x" * 100_000)
    assert statuses(answer) == [413]
    still_serving(url)


def test_rss_stays_bounded_under_hostile_load(agent):
    """After the warm-up above, a thousand more hostile requests grow the agent's RSS by little."""
    proc, url, port = agent
    for body in RAW_BODIES[:4]:  # warm up allocator pools once
        requests.post(f"{url}/v1/predict", data=body, headers=AUTH, timeout=TIMEOUT)
    before = rss(proc)
    with requests.Session() as s:
        s.headers.update(AUTH)
        for i in range(1000):
            body = RAW_BODIES[i % len(RAW_BODIES)] if i % 10 == 0 else json.dumps({"rows": [[i] * (i % 9)]})
            s.post(f"{url}/v1/{'predict' if i % 3 else 'feedback'}", data=body, timeout=TIMEOUT)
    for _ in range(100):
        raw_exchange(port, b"POST /v1/predict HTTP/1.1\r\nContent-Length: 10\r\n\r\n{")
    after = rss(proc)
    assert after - before < 16 * 1024 * 1024, f"RSS grew from {before >> 20} to {after >> 20} MiB"
    still_serving(url)


# ------------------------------------------------------------------ browsers on the device


def _predict_raw(port: int, headers: dict[str, str], body: bytes = b'{"row": [0.1, 0.1, 0.1, 0.1, 0.1, 0.1]}',
                 host: str | None = None) -> tuple[int, dict]:
    """One POST /v1/predict with exactly these headers (no Host unless given) on a fresh connection."""
    lines = [b"POST /v1/predict HTTP/1.1"]
    if host is not None:
        lines.append(b"Host: " + host.encode())
    lines += [f"{k}: {v}".encode() for k, v in headers.items()]
    lines.append(f"Content-Length: {len(body)}".encode())
    answer = raw_exchange(port, b"\r\n".join(lines) + b"\r\n\r\n" + body)
    head, _, payload = answer.partition(b"\r\n\r\n")
    return statuses(answer)[0], json.loads(payload.decode() or "{}")


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.evil.example:{port}",
                                  "localhost.evil.example", "EVIL.example:{port}", "evil.example."])
def test_dns_rebinding_host_is_refused(agent, host):
    """A page on evil.example whose name was rebound to 127.0.0.1 reaches the agent with its own
    name in Host: refused before anything runs, even with a valid token."""
    _, url, port = agent
    status, body = _predict_raw(port, AUTH, host=host.format(port=port))
    assert status == 403 and body["error"] == "forbidden_host", body
    r = requests.get(f"{url}/v1/health", headers={**AUTH, "Host": host.format(port=port)}, timeout=TIMEOUT)
    assert r.status_code == 403 and r.json()["error"] == "forbidden_host"
    still_serving(url)


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "localhost", "LOCALHOST:{port}",
                                  "[::1]:{port}", ALLOWED_HOST, ALLOWED_HOST + ":{port}", None])
def test_own_names_and_allowed_hosts_are_served(agent, host):
    _, _, port = agent
    status, body = _predict_raw(port, AUTH, host=None if host is None else host.format(port=port))
    assert status == 200, body


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://127.0.0.1:3001", "https://127.0.0.1:3000",
                                    "http://localhost:3000", "file://"])
def test_cross_origin_requests_are_refused(agent, origin):
    """A browser's cross-origin `text/plain` POST (a "simple" request: no preflight) carries an
    Origin: refused unless that origin is allowed in the config, and the model does not run."""
    proc, url, port = agent
    before = _predictions(url)
    status, body = _predict_raw(port, {**AUTH, "Origin": origin, "Content-Type": "text/plain"},
                                host=f"127.0.0.1:{port}")
    assert status == 403 and body["error"] == "forbidden_origin", body
    r = requests.get(f"{url}/v1/model", headers={**AUTH, "Origin": origin}, timeout=TIMEOUT)
    assert r.status_code == 403 and "Access-Control-Allow-Origin" not in r.headers
    assert _predictions(url) == before


def test_an_allowed_origin_is_served(agent):
    _, _, port = agent
    status, body = _predict_raw(port, {**AUTH, "Origin": ALLOWED_ORIGIN, "Content-Type": "text/plain"},
                                host=f"127.0.0.1:{port}")
    assert status == 200 and body["predictions"], body


def _predictions(url: str) -> float:
    text = requests.get(f"{url}/metrics", headers=AUTH, timeout=TIMEOUT).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("edgefleet_predictions_total"))
