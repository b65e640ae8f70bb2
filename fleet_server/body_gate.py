"""Request body limits: a size per route (bundle uploads large, everything else small), and
credentials checked before a large body is read.

waitress reads a whole request body (in memory, then in a temporary file) before it calls the
app, so a check in a Flask view comes too late: anyone could make the server buffer a body up to
waitress's limit before being told 401. `gated_server` makes waitress ask the `BodyGate` as soon
as a request's line and headers are parsed, and answer 413 or 401 right then, without reading
the body. The app checks the same limits again (`limit_app_bodies`), for the HTTPS server
(cheroot, which streams bodies to the app) and for bodies sent chunked.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from http.cookies import CookieError, SimpleCookie
from typing import Any

from flask import Flask, request

from fleet_server.auth import (
    SESSION_COOKIE,
    Role,
    TokenExpired,
    constant_time_equal,
    token_hash,
    token_identity,
)

log = logging.getLogger(__name__)

KIB, MIB = 1024, 1024 * 1024
SMALL_BODY_BYTES = 1 * MIB  # every JSON body (a rollout naming 10,000 devices is ~300 KiB)
BUNDLE_BYTES = 300 * MIB  # the largest bundle the registry takes
UPLOAD_BODY_BYTES = BUNDLE_BYTES + 1 * MIB  # room for a multipart envelope around it
ANONYMOUS_BODY_BYTES = 64 * KIB  # read before the sender is known (the login form is ~200 bytes)
# waitress's own ceiling for any body (its default is 1 GiB): the largest route limit.
MAX_REQUEST_BODY_BYTES = UPLOAD_BODY_BYTES

ROUTE_LIMITS: list[tuple[str, re.Pattern[str], int]] = [
    ("POST", re.compile(r"^/api/v1/models/?$"), UPLOAD_BODY_BYTES),
]


def body_limit(method: str, path: str) -> int:
    """The largest body `method path` takes."""
    for route_method, pattern, limit in ROUTE_LIMITS:
        if method == route_method and pattern.match(path):
            return limit
    return SMALL_BODY_BYTES


class BodyGate:
    """Decides from the request line and headers alone whether a body may be read at all."""

    def __init__(self, storage: Any, clock: Callable[[], float]) -> None:
        self.storage = storage
        self.clock = clock

    def check(self, method: str, path: str, length: int | None, headers: Mapping[str, str]) -> tuple[int, str] | None:
        """(status, message) to refuse the request before its body is read, or None to read it.
        `length` is the Content-Length, None for a chunked body (size unknown until read);
        `headers` are keyed by upper-case name (`AUTHORIZATION`, `COOKIE`, `X_CSRF_TOKEN`)."""
        limit = body_limit(method, path)
        if length is not None and length > limit:
            return 413, (f"the request body is {length} bytes; {method} {path[:200]} takes at most {limit} bytes")
        if (length is None or length > ANONYMOUS_BODY_BYTES) and not self.may_send_large_body(headers):
            return 401, (f"a request body over {ANONYMOUS_BODY_BYTES // KIB} KiB needs an operator's credentials "
                         "first: send 'Authorization: Bearer TOKEN' (create one with 'edgefleet server create-token')")
        return None

    def may_send_large_body(self, headers: Mapping[str, str]) -> bool:
        """An operator's valid API token, or a console session with its CSRF token. The app checks
        again (and audits) once the body is read: this only decides whether to read it."""
        try:
            auth = headers.get("AUTHORIZATION", "")
            if auth.startswith("Bearer "):
                identity = token_identity(self.storage, auth[7:].strip(), self.clock())
                return identity is not None and Role(identity["role"]).allows(Role.OPERATOR)
            if auth:
                return False
            sid = _cookie(headers.get("COOKIE", ""), SESSION_COOKIE)
            if not sid:
                return False
            identity = self.storage.find_session(token_hash(sid), self.clock())
            sent = headers.get("X_CSRF_TOKEN", "")
            return (identity is not None and bool(sent) and constant_time_equal(sent, identity["csrf_token"])
                    and Role(identity["role"]).allows(Role.OPERATOR))
        except TokenExpired:
            return False
        except Exception:  # a locked database must not open the gate, nor kill the I/O thread
            log.exception("checking credentials before reading a request body failed; refusing it")
            return False


def _cookie(header: str, name: str) -> str:
    try:
        jar = SimpleCookie(header)
    except CookieError:
        return ""
    morsel = jar.get(name)
    return morsel.value if morsel is not None else ""


# ------------------------------------------------------------------ waitress


def gated_server(app: Any, gate: BodyGate, **kwargs: Any) -> Any:
    """A waitress server (as `waitress.create_server`) whose requests pass `gate` before their
    body is read, and that never buffers more than MAX_REQUEST_BODY_BYTES."""
    from waitress import create_server

    kwargs.setdefault("max_request_body_size", MAX_REQUEST_BODY_BYTES)
    server = create_server(app, **kwargs)
    server.channel_class = _gated_channel(gate)
    return server


def _gated_channel(gate: BodyGate) -> type:
    from waitress.channel import HTTPChannel
    from waitress.parser import HTTPRequestParser
    from waitress.utilities import Error, RequestEntityTooLarge

    class Refused(Error):
        """waitress's error response, as the API's JSON error."""

        def __init__(self, code: int, message: str) -> None:
            super().__init__(message)
            self.code = code
            self.reason = {401: "Unauthorized", 413: "Request Entity Too Large"}.get(code, "Refused")

        def to_response(self, ident: str | None = None) -> tuple[str, list[tuple[str, str]], bytes]:
            headers = [("Content-Type", "application/json")]
            if self.code == 401:
                headers.append(("WWW-Authenticate", 'Bearer realm="edgefleet"'))
            return f"{self.code} {self.reason}", headers, json.dumps({"error": self.body}).encode()

    class GatedParser(HTTPRequestParser):
        def received(self, data: bytes) -> int:
            had_headers = self.headers_finished
            consumed = super().received(data)
            if isinstance(self.error, RequestEntityTooLarge):  # waitress's own ceiling: same answer
                limit = body_limit(self.command or "", self.path or "")
                size = f"over {self.adj.max_request_body_size}" if self.chunked else str(self.content_length)
                self.error = Refused(413, f"the request body is {size} bytes; {self.command} "
                                          f"{(self.path or '')[:200]} takes at most {limit} bytes")
                return consumed
            if self.error is not None or self.empty:
                return consumed
            if not had_headers and self.headers_finished and (self.chunked or self.content_length > 0):
                verdict = gate.check(self.command or "", self.path or "",
                                     None if self.chunked else self.content_length, self.headers)
                if verdict is not None:
                    return self._refuse(*verdict, data_len=len(data))
            elif had_headers and self.chunked and not self.completed:
                limit = body_limit(self.command or "", self.path or "")
                if self.body_bytes_received > limit:
                    return self._refuse(413, f"the chunked request body is over {limit} bytes; {self.command} "
                                             f"{(self.path or '')[:200]} takes at most {limit} bytes",
                                        data_len=len(data))
            return consumed

        def _refuse(self, status: int, message: str, data_len: int) -> int:
            log.warning("refused %s %s before reading its body: %d %s", self.command, (self.path or "")[:200],
                        status, message[:300])
            self.error = Refused(status, message)
            self.completed = True
            self.expect_continue = False  # no "100 Continue": the client must not send the body
            self.connection_close = True
            return data_len  # what arrived of the body is dropped with the connection

    class GatedChannel(HTTPChannel):
        parser_class = GatedParser

    return GatedChannel


# ------------------------------------------------------------------ Flask (all servers)


def limit_app_bodies(app: Flask) -> None:
    """Per-route body limits inside the app: Werkzeug answers 413 when a body is read past it."""
    app.config["MAX_CONTENT_LENGTH"] = SMALL_BODY_BYTES
    app.config["MAX_FORM_MEMORY_SIZE"] = SMALL_BODY_BYTES

    @app.before_request
    def route_body_limit() -> None:
        limit = body_limit(request.method, request.path)
        request.max_content_length = limit
        request.max_form_memory_size = limit
