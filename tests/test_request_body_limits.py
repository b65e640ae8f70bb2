"""Large bodies: each route takes a body up to its own limit (a bundle upload 301 MiB, anything
else 1 MiB), waitress never buffers more than the largest, and credentials are checked before a
large body is read: the refusal arrives while the client has sent nothing but headers.

Raw sockets against a real waitress server, so that what the server reads is what the test sent."""

from __future__ import annotations

import json
import socket

import pytest

from fleet_server.auth import issue_token
from fleet_server.body_gate import (
    ANONYMOUS_BODY_BYTES,
    SMALL_BODY_BYTES,
    UPLOAD_BODY_BYTES,
    body_limit,
)
from tests.server_fixtures import make_config

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from fleet_server.service import FleetServer

    fleet = FleetServer(make_config(tmp_path_factory.mktemp("limits") / "server"), mqtt=False, ingest=False,
                        loops=False).start()
    now = fleet.svc.clock()
    tokens = {role: issue_token(fleet.svc.storage, f"limits-{role}", role, now) for role in ("viewer", "operator")}
    yield fleet, tokens
    fleet.stop()


def exchange(url: str, head: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Send a request's head (and `body`, if any), read one response; fail if none comes."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        sock.sendall(head.encode("latin-1") + b"\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed without an answer: {data!r}"
            data += chunk
        head_bytes, _, rest = data.partition(b"\r\n\r\n")
        lines = head_bytes.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if status == 100:
            return status, headers, rest
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return status, headers, rest[:length]


def head(method: str, path: str, length: int | None, *extra: str) -> str:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines.append("Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}")
    lines.extend(extra)
    return "\r\n".join(lines) + "\r\n"


def test_route_limits():
    assert body_limit("POST", "/api/v1/models") == UPLOAD_BODY_BYTES > 300 * MIB
    for method, path in (("POST", "/api/v1/devices"), ("PUT", "/api/v1/models/pump/1.0.0/policy"),
                         ("POST", "/api/v1/rollouts"), ("POST", "/console/login"), ("POST", "/api/v1/models/x")):
        assert body_limit(method, path) == SMALL_BODY_BYTES


def test_a_900_mib_body_is_refused_before_it_is_sent(server):
    fleet, _ = server
    status, headers, body = exchange(fleet.url, head("POST", "/api/v1/models", 900 * MIB))
    assert status == 413 and "takes at most" in json.loads(body)["error"]
    assert headers.get("connection", "").lower() == "close"


@pytest.mark.parametrize("auth", [None, "Bearer eft_" + "A" * 43, "Basic Zm9vOmJhcg==", "viewer"])
def test_a_large_upload_needs_an_operator_before_its_body_is_read(server, auth):
    fleet, tokens = server
    extra = ["Expect: 100-continue"]
    if auth == "viewer":
        extra.append(f"Authorization: Bearer {tokens['viewer']}")
    elif auth:
        extra.append(f"Authorization: {auth}")
    status, headers, body = exchange(fleet.url, head("POST", "/api/v1/models", 200 * MIB, *extra))
    # 401 instead of "100 Continue": the client is told not to send the body, and nothing was buffered.
    assert status == 401, (status, body)
    assert "needs an operator" in json.loads(body)["error"] and headers["content-type"] == "application/json"


def test_an_operator_is_asked_for_the_large_upload(server):
    fleet, tokens = server
    status, _, _ = exchange(fleet.url, head("POST", "/api/v1/models", 200 * MIB, "Expect: 100-continue",
                                             f"Authorization: Bearer {tokens['operator']}"))
    assert status == 100  # the server wants the body: the upload route's limit is large


def test_a_chunked_body_of_unknown_size_needs_credentials_first(server):
    fleet, _ = server
    status, _, body = exchange(fleet.url, head("POST", "/api/v1/models", None))
    assert status == 401, body


def test_json_routes_take_small_bodies_only(server):
    fleet, tokens = server
    op = f"Authorization: Bearer {tokens['operator']}"
    status, _, body = exchange(fleet.url, head("POST", "/api/v1/devices", 2 * MIB, op, "Content-Type: application/json"))
    assert status == 413 and "at most 1048576" in json.loads(body)["error"]
    # Anonymous bodies over 64 KiB are not read, on any route (the login form is far smaller).
    status, _, _ = exchange(fleet.url, head("POST", "/console/login", ANONYMOUS_BODY_BYTES + 1))
    assert status == 401
    # A small anonymous body is read, and the app refuses it as before.
    payload = b'{"id": "dev-1"}'
    status, _, body = exchange(fleet.url, head("POST", "/api/v1/devices", len(payload),
                                               "Content-Type: application/json"), payload)
    assert status == 401 and "create-token" in json.loads(body)["error"]
    # An operator's body within the limit goes through.
    status, _, body = exchange(fleet.url, head("POST", "/api/v1/devices", len(payload), op,
                                               "Content-Type: application/json"), payload)
    assert status == 201, body


def test_the_app_enforces_the_same_limits_without_waitress(server):
    """The HTTPS server (cheroot) streams bodies to the app: Flask refuses past the route's limit."""
    fleet, tokens = server
    client = fleet.app.test_client()
    big = b"{" + b" " * (SMALL_BODY_BYTES + 10) + b"}"
    r = client.post("/api/v1/devices", data=big, content_type="application/json",
                    headers={"Authorization": f"Bearer {tokens['operator']}"})
    assert r.status_code == 413
