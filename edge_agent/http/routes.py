"""The agent's endpoints: POST /v1/predict, /v1/feedback, GET /v1/health, /v1/model, /metrics.

Views only translate: check the bearer token, decode the body, call `Agent.predict` (or
`Agent.feedback`, `health`, `model_info`), encode the answer. Nothing is logged per request.
A check that applies to every request (Host and Origin, `origin.py`; the token) belongs in
`request`, before dispatch.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import msgspec

from edge_agent.feedback import items_from_payload
from edge_agent.http.connection import ADAPTIVE, POOL, Connection, Job
from edge_agent.http.origin import BrowserPolicy
from edge_agent.http.wire import body_length, encode
from edge_agent.validation import RequestError, rows_from_payload

try:  # what hmac.compare_digest is; importing hmac would load OpenSSL's libcrypto (~3.5 MiB RSS)
    from _operator import _compare_digest as compare_digest
except ImportError:  # an interpreter other than CPython
    from hmac import compare_digest

if TYPE_CHECKING:
    from edge_agent.agent import Agent

_decode = msgspec.json.Decoder().decode


def decode(body: bytes) -> Any:
    """A request body's JSON, or RequestError("malformed_json") saying what is wrong with it."""
    try:
        return _decode(body)
    except msgspec.DecodeError as exc:
        raise RequestError("malformed_json", f"the body is not valid JSON: {exc}") from exc
    except RecursionError:  # msgspec recurses per nesting level: `[[[[...` a few thousand deep
        raise RequestError("malformed_json", "the body's JSON is nested too deeply; "
                           "rows are lists or objects of plain values") from None
    except UnicodeDecodeError as exc:  # msgspec raises this (not DecodeError) for a non-UTF-8 string
        raise RequestError("malformed_json", f"the body is not UTF-8: {exc}") from None


def error(conn: Connection, exc: RequestError, close: bool = False) -> None:
    """Answer a refusal: its status and JSON body (`kind`, `message`)."""
    extra = 'WWW-Authenticate: Bearer realm="edgefleet-agent"\r\n' if exc.kind == "unauthorized" else ""
    conn.send(exc.status, encode(exc.to_dict()), extra=extra, close=close)


class AgentRoutes:
    """Answers the framed requests of every connection with one `Agent`."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.browsers = BrowserPolicy(agent.config.http)

    def request(self, conn: Connection, method: str, path: str, headers: dict[str, str], version: str) -> None:
        # No browser reaches the Unix socket: its Host is whatever the client makes up.
        refused = None if conn.sock.family == socket.AF_UNIX else self.browsers.refusal(headers)
        if refused is not None:  # before anything runs or the body is read
            kind, message = refused
            self.agent.telemetry.record_error(kind)
            conn.send(403, encode({"error": kind, "message": message}), close=True)
            return
        if method == "POST":
            self.do_post(conn, path, headers, version)
        elif method == "GET":
            self.do_get(conn, path, headers, version)
        else:
            conn.discard_body(headers, version, lambda _body: conn.send(501, encode(
                {"error": "not_implemented", "message": f"method {method[:20]} is not supported; use GET or POST"})))

    def authorized(self, conn: Connection, headers: dict[str, str], method: str) -> bool:
        token = self.agent.config.http.token
        if not token:
            return True
        given = headers.get("authorization", "")
        if given.startswith("Bearer ") and compare_digest(given[7:].strip().encode(), token.encode()):
            return True
        self.agent.telemetry.record_error("unauthorized")
        # The body (if any) is unread: close the connection rather than parse it.
        error(conn, RequestError("unauthorized", "missing or wrong bearer token (Authorization: Bearer <token>)"),
              close=method == "POST")
        return False

    def do_get(self, conn: Connection, path: str, headers: dict[str, str], version: str) -> None:
        if not self.authorized(conn, headers, "GET"):
            return
        if path in ("/v1/health", "/v1/model", "/metrics"):
            conn.discard_body(headers, version, lambda _body: self.get(conn, path), POOL)
        else:
            conn.discard_body(headers, version, lambda _body: error(conn, RequestError(
                "not_found", f"no endpoint {path[:100]}; see /v1/predict, /v1/feedback, /v1/health, /v1/model, /metrics")))

    def get(self, conn: Connection, path: str) -> None:
        agent = self.agent
        if path == "/v1/health":
            health = agent.health()
            conn.send(200 if health["status"] == "ok" else 503, encode(health))
        elif path == "/v1/model":
            conn.send(200, encode(agent.model_info()))
        else:  # /metrics
            # Written by edge_agent.metrics itself: prometheus_client would stay imported (~4 MiB).
            from edge_agent.metrics import CONTENT_TYPE, render

            conn.send(200, render(agent), CONTENT_TYPE)

    def do_post(self, conn: Connection, path: str, headers: dict[str, str], version: str) -> None:
        if not self.authorized(conn, headers, "POST"):
            return
        if path == "/v1/predict":
            self.json_body(conn, headers, version, partial(self.predict, conn),
                           lambda exc: self.agent.telemetry.record_error(exc.kind, exc.feature))
        elif path == "/v1/feedback":
            self.json_body(conn, headers, version, partial(self.feedback, conn),
                           lambda _exc: self.agent.telemetry.record_feedback_rejected())
        else:
            conn.discard_body(headers, version, lambda _body: error(conn,
                RequestError("not_found", "POST only to /v1/predict or /v1/feedback")))

    def json_body(self, conn: Connection, headers: dict[str, str], version: str, job: Job,
                  refused: Callable[[RequestError], None]) -> None:
        """Frame a JSON body for `job`, or refuse it (411, 413) without reading it."""
        length = headers.get("content-length")
        if length is None:
            conn.send(411, encode({"error": "length_required", "message": "send a Content-Length header"}), close=True)
            return
        n = body_length(length, headers)
        limit = self.agent.config.http.max_body_bytes
        if n < 0:
            conn.close = True  # the framing is unknown: the connection cannot go on
            exc = RequestError("bad_request", f"Content-Length must be decimal digits alone, without "
                               f"Transfer-Encoding; got {length[:40]!r}")
            refused(exc)
            error(conn, exc)
            return
        if n > limit:
            # Not read: the connection cannot go on.
            conn.close = True
            exc = RequestError("body_too_large", f"body of {n} bytes; at most {limit} are accepted")
            refused(exc)
            error(conn, exc)
            return
        conn.await_body(n, headers, version, job, ADAPTIVE)

    def predict(self, conn: Connection, body: bytes) -> None:
        agent = self.agent
        try:
            rows = rows_from_payload(decode(body), agent.config.http.max_rows)
        except RequestError as exc:
            agent.telemetry.record_error(exc.kind, exc.feature)
            error(conn, exc)
            return
        try:
            result = agent.predict(rows)
        except RequestError as exc:
            error(conn, exc)
            return
        out = result.output
        answer: dict[str, Any] = {"model": result.model, "version": result.version, "predictions": out.primary,
                                  "ids": result.ids}
        if out.probabilities is not None:
            answer["probabilities"] = out.probabilities
            answer["classes"] = result.classes
        if out.labels is not None and out.values is not None:
            answer["scores"] = out.values
        conn.send(200, encode(answer))

    def feedback(self, conn: Connection, body: bytes) -> None:
        agent = self.agent
        try:
            items = items_from_payload(decode(body))
        except RequestError as exc:
            agent.telemetry.record_feedback_rejected()
            error(conn, exc)
            return
        try:
            result = agent.feedback(items)  # counts its own refusals
        except RequestError as exc:
            error(conn, exc)
            return
        conn.send(200, encode(result.to_dict()))
