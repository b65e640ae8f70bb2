"""Webhook delivery against a real HTTP receiver on 127.0.0.1 that checks the signature."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fleet_server.alerts import BucketDrift, DriftPolicy, evaluate
from fleet_server.webhooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    alert_payload,
    deliver,
    encode_body,
    sign,
    verify_signature,
)

SECRET = b"s3cret-for-tests"


@dataclass
class Receiver:
    """Answers `script` statuses in order (then 200); "slow" sleeps past the client timeout."""

    url: str
    script: list[int | str] = field(default_factory=list)
    received: list[dict] = field(default_factory=list)
    secret: bytes = SECRET


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    # Loopback only: a proxy from the environment must not see (or swallow) test requests.
    for name in (
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            signature = self.headers.get(SIGNATURE_HEADER)
            state.received.append(
                {
                    "path": self.path,
                    "body": body,
                    "headers": dict(self.headers),
                    "valid": verify_signature(body, state.secret, signature),
                }
            )
            step = state.script.pop(0) if state.script else 200
            if step == "slow":
                time.sleep(1.0)
                step = 200
            if not state.received[-1]["valid"]:
                step = 401
            self.send_response(int(step))
            if step in (301, 302, 307, 308):
                self.send_header("Location", "/elsewhere")
            reply = b"ok" if step == 200 else b"nope"
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/drift"
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


PAYLOAD = {"event": "drift.alert.open", "alert": {"feature": "temp/humidity ratio", "psi": 0.31}}


def test_retries_5xx_with_exponential_backoff_then_succeeds(receiver):
    receiver.script = [503, 500]
    sleeps: list[float] = []
    result = deliver(
        receiver.url,
        PAYLOAD,
        SECRET,
        event="drift.alert.open",
        retries=3,
        backoff=0.5,
        sleep=sleeps.append,
    )
    assert result.ok and result.attempts == 3 and result.status == 200
    assert sleeps == [0.5, 1.0]
    assert len(receiver.received) == 3
    for req in receiver.received:
        assert req["valid"], "the receiver must be able to verify every attempt"
        assert req["headers"][EVENT_HEADER] == "drift.alert.open"
        assert req["headers"][DELIVERY_HEADER] == result.delivery_id  # same id on retries
        assert req["headers"]["Content-Type"] == "application/json"
        assert json.loads(req["body"]) == PAYLOAD
        assert req["path"] == "/hooks/drift"


def test_gives_up_after_the_retries(receiver):
    receiver.script = [500, 502, 503, 504]
    sleeps: list[float] = []
    result = deliver(receiver.url, PAYLOAD, SECRET, retries=2, backoff=0.1, sleep=sleeps.append)
    assert not result.ok and result.attempts == 3 and result.status == 503
    assert "503" in result.error
    assert sleeps == [0.1, 0.2]


def test_backoff_is_capped(receiver):
    receiver.script = [500] * 5
    sleeps: list[float] = []
    deliver(receiver.url, PAYLOAD, SECRET, retries=5, backoff=1, max_backoff=3, sleep=sleeps.append)
    assert sleeps == [1, 2, 3, 3, 3]


def test_429_is_retried_but_other_4xx_are_not(receiver):
    receiver.script = [429]
    assert deliver(receiver.url, PAYLOAD, SECRET, sleep=lambda s: None).attempts == 2
    receiver.script = [404]
    result = deliver(receiver.url, PAYLOAD, SECRET, sleep=lambda s: None)
    assert not result.ok and result.attempts == 1 and result.status == 404
    assert result.response == "nope"


def test_wrong_secret_is_refused_by_the_receiver_and_not_retried(receiver):
    result = deliver(receiver.url, PAYLOAD, b"other secret", sleep=lambda s: None)
    assert not result.ok and result.status == 401 and result.attempts == 1
    assert receiver.received[0]["valid"] is False


def test_redirects_are_not_followed(receiver):
    receiver.script = [307]
    result = deliver(receiver.url, PAYLOAD, SECRET, sleep=lambda s: None)
    assert not result.ok and result.status == 307 and result.attempts == 1
    assert [r["path"] for r in receiver.received] == ["/hooks/drift"]


def test_timeout_is_retried(receiver):
    receiver.script = ["slow"]
    result = deliver(receiver.url, PAYLOAD, SECRET, timeout=0.3, sleep=lambda s: None)
    assert result.ok and result.attempts == 2


def test_connection_refused_is_retried_then_reported():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    sleeps: list[float] = []
    result = deliver(
        f"http://127.0.0.1:{port}/x", PAYLOAD, SECRET, retries=2, backoff=0.01, sleep=sleeps.append
    )
    assert not result.ok and result.status is None and result.attempts == 3
    assert "Refused" in result.error or "refused" in result.error
    assert sleeps == [0.01, 0.02]


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x", "http:///x", "x"])
def test_only_http_urls(url):
    with pytest.raises(ValueError, match="http:// or https://"):
        deliver(url, PAYLOAD, SECRET)


def test_signature_is_over_the_exact_body():
    body = encode_body(PAYLOAD)
    header = sign(body, SECRET)
    assert header.startswith("sha256=") and len(header) == 7 + 64
    assert verify_signature(body, SECRET, header)
    assert not verify_signature(body + b" ", SECRET, header)
    assert not verify_signature(body, SECRET, None)
    with pytest.raises(ValueError):
        encode_body({"psi": float("nan")})  # never send invalid JSON


def test_alert_payload_end_to_end(receiver):
    res = evaluate(
        [BucketDrift(t, 900, 0.4, 0.05) for t in (0.0, 300.0, 600.0)],
        DriftPolicy(),
        scope="tag:site=north",
        model_version="1.2.0",
        feature="temp/humidity ratio",
    )
    transition = res.transitions[-1]
    payload = alert_payload(transition, model="chiller", fleet="plant-1")
    result = deliver(receiver.url, payload, SECRET, event=transition.event, sleep=lambda s: None)
    assert result.ok
    got = json.loads(receiver.received[0]["body"])
    assert got["event"] == "drift.alert.open" and got["model"] == "chiller"
    assert got["alert"]["level"] == "alert" and got["alert"]["scope"] == "tag:site=north"
    assert got["alert"]["first_bucket"] == 0.0 and got["alert"]["last_bucket"] == 600.0
    assert receiver.received[0]["headers"][EVENT_HEADER] == "drift.alert.open"


def test_the_verification_snippet_in_the_docs_works():
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "drift.md").read_text()
    snippet = next(
        s for s in re.findall(r"```python\n(.*?)```", doc, re.S) if "is_from_edgefleet" in s
    )
    namespace: dict = {}
    exec(snippet, namespace)  # our own documentation
    body = encode_body(PAYLOAD)
    assert namespace["is_from_edgefleet"](body, sign(body, SECRET), SECRET)
    assert not namespace["is_from_edgefleet"](body, sign(body, b"wrong"), SECRET)
    assert not namespace["is_from_edgefleet"](body, None, SECRET)
