"""The local HTTP API: POST /v1/predict, /v1/feedback, GET /v1/health, /v1/model, /metrics.

HTTP/1.1 keep-alive on a threading socketserver, with a small request parser of our own: the
stdlib's BaseHTTPRequestHandler parses every request's headers with the `email` package, which
cost more CPU than validation and inference together. Views only translate: read and decode
the body, call `Agent.predict` (or `Agent.feedback`), encode the answer. A response is one `sendall`; Nagle is off on
TCP sockets; nothing is logged per request.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import socket
import socketserver
import threading
from typing import Any

import msgspec

from edge_agent.agent import Agent
from edge_agent.feedback import items_from_payload
from edge_agent.validation import RequestError, rows_from_payload

log = logging.getLogger("edge_agent.http")

_REASONS = {100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 411: "Length Required", 413: "Payload Too Large",
            422: "Unprocessable Entity", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
            501: "Not Implemented", 503: "Service Unavailable", 505: "HTTP Version Not Supported"}
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
JSON = "application/json"
MAX_HEAD_BYTES = 64 * 1024  # request line and headers; more is refused with 431
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_HEADS: dict[tuple[int, str], bytes] = {}  # status line + Content-Type, built once per pair


def _head(status: int, content_type: str) -> bytes:
    head = _HEADS.get((status, content_type))
    if head is None:
        head = _HEADS[(status, content_type)] = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: {content_type}\r\n"
            "Content-Length: "
        ).encode("latin-1")
    return head


class _Close(Exception):
    """The connection cannot go on (client gone, or a request we cannot frame)."""


class _Refused(Exception):
    """The request was already answered with an error; nothing more to do."""


class Connection:
    """One client connection: reads requests off the socket, answers each in one write."""

    def __init__(self, sock: socket.socket, agent: Agent) -> None:
        self.sock = sock
        self.agent = agent
        self.buf = b""
        self.close = False

    # ------------------------------------------------------------------ framing

    def serve(self) -> None:
        with contextlib.suppress(_Close, ConnectionError, TimeoutError):
            while not self.close:
                if not self.one_request():
                    return

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise _Close
        return data

    def one_request(self) -> bool:
        buf = self.buf
        while True:
            if buf[:1] in (b"\r", b"\n"):
                buf = buf.lstrip(b"\r\n")  # stray line ends between requests are allowed (RFC 9112 2.2)
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(buf) > MAX_HEAD_BYTES:
                self.send(431, _encode({"error": "bad_request", "message": "request headers over 64 KiB"}), close=True)
                return False
            try:
                data = self.sock.recv(65536)
            except (ConnectionError, TimeoutError):
                return False
            if not data:
                return False
            buf += data
        head = buf[:end].decode("latin-1")
        self.buf = buf[end + 4 :]
        lines = head.split("\r\n")
        words = lines[0].split()
        if len(words) != 3 or not words[2].startswith("HTTP/1."):
            status = 505 if len(words) == 3 and words[2].startswith("HTTP/") else 400
            self.send(status, _encode({"error": "bad_request", "message": f"bad request line {lines[0][:100]!r}"}),
                      close=True)
            return False
        method, target, version = words
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                self.send(400, _encode({"error": "bad_request", "message": f"bad header line {line[:100]!r}"}),
                          close=True)
                return False
            headers[name.strip().lower()] = value.strip()
        conn = headers.get("connection", "").lower()
        self.close = conn == "close" or (version == "HTTP/1.0" and conn != "keep-alive")
        path = target.split("?", 1)[0]
        if method == "POST":
            self.do_post(path, headers, version)
        elif method == "GET":
            self.do_get(path, headers, version)
        else:
            self.discard_body(headers, version)
            self.send(501, _encode({"error": "not_implemented", "message": f"method {method[:20]} is not supported; "
                                    "use GET or POST"}))
        return True

    def send(self, status: int, body: bytes, content_type: str = JSON, extra: str = "", close: bool = False) -> None:
        if close:
            self.close = True
        if self.close:
            extra += "Connection: close\r\n"
        tail = f"{len(body)}\r\n{extra}\r\n" if extra else f"{len(body)}\r\n\r\n"
        self.sock.sendall(_head(status, content_type) + tail.encode("latin-1") + body)

    def read_body(self, n: int, headers: dict[str, str], version: str) -> bytes:
        buf = self.buf
        if len(buf) < n and version == "HTTP/1.1" and headers.get("expect", "").lower() == "100-continue":
            self.sock.sendall(_CONTINUE)
        if len(buf) < n:
            parts = [buf]
            have = len(buf)
            while have < n:
                data = self._recv()
                parts.append(data)
                have += len(data)
            buf = b"".join(parts)
        self.buf = buf[n:]
        return buf[:n]

    def discard_body(self, headers: dict[str, str], version: str) -> None:
        try:
            n = int(headers.get("content-length", "0"))
        except ValueError:
            n = -1
        if 0 < n <= self.agent.config.http.max_body_bytes:
            self.read_body(n, headers, version)
        elif n:
            self.close = True

    # ------------------------------------------------------------------ views

    def error(self, exc: RequestError, close: bool = False) -> None:
        extra = 'WWW-Authenticate: Bearer realm="edgefleet-agent"\r\n' if exc.kind == "unauthorized" else ""
        self.send(exc.status, _encode(exc.to_dict()), extra=extra, close=close)

    def authorized(self, headers: dict[str, str], method: str) -> bool:
        token = self.agent.config.http.token
        if not token:
            return True
        given = headers.get("authorization", "")
        if given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip().encode(), token.encode()):
            return True
        self.agent.telemetry.record_error("unauthorized")
        # The body (if any) is unread: close the connection rather than parse it.
        self.error(RequestError("unauthorized", "missing or wrong bearer token (Authorization: Bearer <token>)"),
                   close=method == "POST")
        return False

    def do_get(self, path: str, headers: dict[str, str], version: str) -> None:
        if not self.authorized(headers, "GET"):
            return
        self.discard_body(headers, version)
        agent = self.agent
        if path == "/v1/health":
            health = agent.health()
            self.send(200 if health["status"] == "ok" else 503, _encode(health))
        elif path == "/v1/model":
            self.send(200, _encode(agent.model_info()))
        elif path == "/metrics":
            # Imported on the first scrape: most devices are never scraped.
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            self.send(200, generate_latest(agent.registry), CONTENT_TYPE_LATEST)
        else:
            self.error(RequestError("not_found", f"no endpoint {path[:100]}; see /v1/predict, /v1/feedback, /v1/health, /v1/model, /metrics"))

    def do_post(self, path: str, headers: dict[str, str], version: str) -> None:
        if not self.authorized(headers, "POST"):
            return
        if path == "/v1/predict":
            self.predict(headers, version)
        elif path == "/v1/feedback":
            self.feedback(headers, version)
        else:
            self.discard_body(headers, version)
            self.error(RequestError("not_found", "POST only to /v1/predict or /v1/feedback"))

    def read_json(self, headers: dict[str, str], version: str) -> Any:
        """The request's JSON body; raises RequestError, or _Refused once it has answered itself."""
        length = headers.get("content-length")
        if length is None:
            self.send(411, _encode({"error": "length_required", "message": "send a Content-Length header"}), close=True)
            raise _Refused
        try:
            n = int(length)
        except ValueError:
            n = -1
        limit = self.agent.config.http.max_body_bytes
        if n < 0 or n > limit:
            # Not read: the connection cannot go on.
            self.close = True
            raise RequestError("body_too_large", f"body of {n} bytes; at most {limit} are accepted")
        body = self.read_body(n, headers, version)
        try:
            return _decode(body)
        except msgspec.DecodeError as exc:
            raise RequestError("malformed_json", f"the body is not valid JSON: {exc}") from exc
        except RecursionError:  # msgspec recurses per nesting level: `[[[[...` a few thousand deep
            raise RequestError("malformed_json", "the body's JSON is nested too deeply; "
                               "rows are lists or objects of plain values") from None
        except UnicodeDecodeError as exc:  # msgspec raises this (not DecodeError) for a non-UTF-8 string
            raise RequestError("malformed_json", f"the body is not UTF-8: {exc}") from None

    def predict(self, headers: dict[str, str], version: str) -> None:
        agent = self.agent
        try:
            rows = rows_from_payload(self.read_json(headers, version), agent.config.http.max_rows)
        except _Refused:
            return
        except RequestError as exc:
            agent.telemetry.record_error(exc.kind, exc.feature)
            self.error(exc)
            return
        try:
            result = agent.predict(rows)
        except RequestError as exc:
            self.error(exc)
            return
        out = result.output
        answer: dict[str, Any] = {"model": result.model, "version": result.version, "predictions": out.primary,
                                  "ids": result.ids}
        if out.probabilities is not None:
            answer["probabilities"] = out.probabilities
            answer["classes"] = result.classes
        if out.labels is not None and out.values is not None:
            answer["scores"] = out.values
        self.send(200, _encode(answer))

    def feedback(self, headers: dict[str, str], version: str) -> None:
        agent = self.agent
        try:
            items = items_from_payload(self.read_json(headers, version))
        except _Refused:
            return
        except RequestError as exc:
            agent.telemetry.record_feedback_rejected()
            self.error(exc)
            return
        try:
            result = agent.feedback(items)  # counts its own refusals
        except RequestError as exc:
            self.error(exc)
            return
        self.send(200, _encode(result.to_dict()))


class AgentHandler(socketserver.BaseRequestHandler):
    """Serves one connection until the client closes it or a response says `Connection: close`."""

    agent: Agent  # set on the subclass made by `make_handler`
    nodelay = True  # answers are small single writes: never wait for the client's ACK
    # A connection silent this long (idle keep-alive, or a request that stalls half-sent) is
    # closed: otherwise each stalled client would hold a thread for ever.
    idle_timeout_s = 60.0

    def handle(self) -> None:
        sock = self.request
        sock.settimeout(self.idle_timeout_s)
        if self.nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Connection(sock, self.agent)
        try:
            conn.serve()
        except Exception:  # a bug in a view must not take the listener down: answer 500, close
            log.exception("HTTP request failed")
            with contextlib.suppress(OSError):
                conn.send(500, _encode({"error": "internal_error", "message": "the agent failed on this request; "
                                        "see its log"}), close=True)


def make_handler(agent: Agent) -> type[AgentHandler]:
    return type("BoundAgentHandler", (AgentHandler,), {"agent": agent})


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


class _UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True


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
            unix_handler = type("UnixAgentHandler", (handler,), {"nodelay": False})
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
