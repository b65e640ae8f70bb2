"""The local HTTP API: POST /v1/predict, GET /v1/health, /v1/model, /metrics.

A stdlib ThreadingHTTPServer speaking HTTP/1.1 keep-alive (no Werkzeug dev server, which
closes every connection). Views only translate: read and decode the body, call
`Agent.predict`, encode the answer. Responses are written in one `sendall`.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edge_agent.agent import Agent
from edge_agent.validation import RequestError, rows_from_payload

log = logging.getLogger("edge_agent.http")

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
            411: "Length Required", 413: "Payload Too Large", 422: "Unprocessable Entity",
            500: "Internal Server Error", 503: "Service Unavailable"}
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.decode


class AgentHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "edgefleet-agent"
    disable_nagle_algorithm = True
    agent: Agent  # set on the subclass made by `make_handler`

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # access logs on a Pi's SD card cost more than they tell

    def _send(self, status: int, body: bytes, content_type: str = "application/json", extra: str = "") -> None:
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
        ).encode("latin-1")
        self.wfile.write(head + body)

    def _error(self, exc: RequestError, close: bool = False) -> None:
        extra = "Connection: close\r\n" if close else ""
        if exc.kind == "unauthorized":
            extra += 'WWW-Authenticate: Bearer realm="edgefleet-agent"\r\n'
        if close:
            self.close_connection = True
        self._send(exc.status, _encode(exc.to_dict()), extra=extra)

    def _authorized(self) -> bool:
        token = self.agent.config.http.token
        if not token:
            return True
        given = self.headers.get("Authorization", "")
        if given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip().encode(), token.encode()):
            return True
        self.agent.telemetry.record_error("unauthorized")
        # The body (if any) is unread: close the connection rather than parse it.
        self._error(RequestError("unauthorized", "missing or wrong bearer token (Authorization: Bearer <token>)"),
                    close=self.command == "POST")
        return False

    def do_GET(self) -> None:
        if not self._authorized():
            return
        path = self.path.split("?", 1)[0]
        agent = self.agent
        if path == "/v1/health":
            health = agent.health()
            self._send(200 if health["status"] == "ok" else 503, _encode(health))
        elif path == "/v1/model":
            self._send(200, _encode(agent.model_info()))
        elif path == "/metrics":
            self._send(200, generate_latest(agent.registry), CONTENT_TYPE_LATEST)
        else:
            self._error(RequestError("not_found", f"no endpoint {path[:100]}; see /v1/predict, /v1/health, /v1/model, /metrics"))

    def do_POST(self) -> None:
        if not self._authorized():
            return
        if self.path.split("?", 1)[0] != "/v1/predict":
            self._discard_body()
            self._error(RequestError("not_found", "POST only to /v1/predict"))
            return
        agent = self.agent
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            self._send(411, _encode({"error": "length_required", "message": "send a Content-Length header"}),
                       extra="Connection: close\r\n")
            return
        try:
            n = int(length)
        except ValueError:
            n = -1
        limit = agent.config.http.max_body_bytes
        if n < 0 or n > limit:
            agent.telemetry.record_error("body_too_large")
            self._error(RequestError("body_too_large", f"body of {n} bytes; at most {limit} are accepted"), close=True)
            return
        body = self.rfile.read(n)
        try:
            try:
                payload = _decode(body)
            except msgspec.DecodeError as exc:
                raise RequestError("malformed_json", f"the body is not valid JSON: {exc}") from exc
            rows = rows_from_payload(payload, agent.config.http.max_rows)
        except RequestError as exc:
            agent.telemetry.record_error(exc.kind, exc.feature)
            self._error(exc)
            return
        try:
            result = agent.predict(rows)
        except RequestError as exc:
            self._error(exc)
            return
        out = result.output
        answer: dict[str, Any] = {"model": result.model, "version": result.version,
                                  "predictions": out.primary}
        if out.probabilities is not None:
            answer["probabilities"] = out.probabilities
            answer["classes"] = agent.active.classes if agent.active else None
        if out.labels is not None and out.values is not None:
            answer["scores"] = out.values
        self._send(200, _encode(answer))

    def _discard_body(self) -> None:
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            n = 0
        if 0 < n <= self.agent.config.http.max_body_bytes:
            self.rfile.read(n)
        elif n:
            self.close_connection = True


def make_handler(agent: Agent) -> type[AgentHandler]:
    return type("BoundAgentHandler", (AgentHandler,), {"agent": agent})


class _TCPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self):  # BaseHTTPRequestHandler wants a (host, port)-like client address
        sock, _ = super().get_request()
        return sock, ("unix", 0)


class HttpApi:
    """The agent's HTTP listeners (TCP and/or Unix socket), each served from a thread."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.servers: list[socketserver.BaseServer] = []
        self.threads: list[threading.Thread] = []

    @property
    def address(self) -> tuple[str, int] | None:
        for s in self.servers:
            if isinstance(s, _TCPServer):
                host, port = s.server_address[:2]
                return str(host), int(port)
        return None

    def start(self) -> HttpApi:
        cfg = self.agent.config.http
        handler = make_handler(self.agent)
        if cfg.listen:
            host, _, port = cfg.listen.rpartition(":")
            self.servers.append(_TCPServer((host or "127.0.0.1", int(port)), handler))
        if cfg.unix_socket:
            if os.path.exists(cfg.unix_socket):
                os.unlink(cfg.unix_socket)  # a stale socket from a previous run
            # TCP_NODELAY does not exist on Unix sockets.
            unix_handler = type("UnixAgentHandler", (handler,), {"disable_nagle_algorithm": False})
            server = _UnixServer(cfg.unix_socket, unix_handler)
            os.chmod(cfg.unix_socket, 0o660)
            self.servers.append(server)
        for server in self.servers:
            t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                                 name="http", daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()
            if isinstance(server, _UnixServer):
                with contextlib.suppress(OSError):
                    os.unlink(server.server_address)
        self.servers.clear()
