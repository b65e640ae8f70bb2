"""Shared plumbing of the REST API: services lookup, auth, query parsing, JSON errors.

A request is authorized by a Bearer token or by a console session cookie. Cookies are ambient
credentials, so a cookie-authorized request that changes something must also carry the session's
CSRF token (header `X-CSRF-Token`); Bearer calls are exempt. Every state-changing call, and every
refusal for lack of role, is written to the audit log.
"""

from __future__ import annotations

import base64
import functools
import logging
from collections.abc import Callable
from typing import Any

from flask import Flask, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from fleet_server.auth import (
    CSRF_HEADER,
    SESSION_COOKIE,
    Role,
    TokenExpired,
    constant_time_equal,
    token_hash,
    token_identity,
)
from fleet_server.context import Services

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered as JSON `{"error": message}` with an HTTP status."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def services() -> Services:
    return current_app.extensions["edgefleet"]


def bearer_identity() -> dict[str, Any] | None:
    """The identity of the request's Bearer token, None without a valid one; an expired token
    is refused here (401, audited) with a message that says so."""
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        return None
    svc = services()
    try:
        return token_identity(svc.storage, header[7:].strip(), svc.clock())
    except TokenExpired as exc:
        refused(401, str(exc))
        audit(request.endpoint or request.path, "denied", exc.identity, reason="token expired")
        raise ApiError(str(exc), 401) from None


def refused(status: int, reason: str) -> None:
    """Log a refused request (who, what, why) for the operator's log."""
    log.warning("refused %s %s from %s: %d %s", request.method, request.path[:200], request.remote_addr,
                status, reason[:300])


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def session_identity() -> dict[str, Any] | None:
    """The operator of a valid console session cookie (name, role, csrf_token), once per request."""
    if "session_identity" in g:
        return g.session_identity
    sid = request.cookies.get(SESSION_COOKIE)
    identity = None
    if sid:
        svc = services()
        identity = svc.storage.find_session(token_hash(sid), svc.clock())
        if identity is not None:
            identity = {**identity, "via": "session"}
    g.session_identity = identity
    return identity


def csrf_ok(identity: dict[str, Any]) -> bool:
    sent = request.headers.get(CSRF_HEADER) or request.form.get("csrf_token") or ""
    return bool(sent) and constant_time_equal(sent, identity["csrf_token"])


def audit(action: str, outcome: str, identity: dict[str, Any] | None, target: str = "", **detail: Any) -> None:
    """Append one row to the audit log (who did what to what, and how it ended)."""
    from fleet_server.console.accounts import record_audit

    record_audit(
        services(), action=action, outcome=outcome, actor=(identity or {}).get("name", ""),
        role=(identity or {}).get("role"), target=target or request.path,
        remote_addr=request.remote_addr, detail=detail,
    )


def basic_device() -> str | None:
    """The device id when the request carries valid HTTP Basic device credentials."""
    header = request.headers.get("Authorization", "")
    if not header.startswith("Basic "):
        return None
    try:
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    svc = services()
    if svc.passwords.check(user, password, svc.storage.device_password_hash(user)):
        return user
    return None


def require(role: Role) -> Callable:
    """Decorator: a Bearer token or console session whose role allows `role` (viewer for reads,
    operator for writes); session calls that change something must carry the CSRF token."""

    def wrap(view: Callable) -> Callable:
        @functools.wraps(view)
        def inner(*args: Any, **kwargs: Any) -> Any:
            identity = bearer_identity()
            if identity is None and "Authorization" not in request.headers:
                identity = session_identity()
            if identity is None:
                message = ("missing or invalid API token: send 'Authorization: Bearer TOKEN' "
                           "(create one with 'edgefleet server create-token')")
                refused(401, message)
                raise ApiError(message, 401)
            changes = request.method not in SAFE_METHODS
            action = request.endpoint or request.path
            if changes and identity.get("via") == "session" and not csrf_ok(identity):
                refused(403, f"missing or wrong CSRF token ({identity.get('name')})")
                audit(action, "denied", identity, reason="missing or wrong CSRF token")
                raise ApiError(
                    f"missing or wrong CSRF token: send the session's token in the {CSRF_HEADER} header "
                    "(the console does this; reload the page if the session changed)",
                    403,
                )
            if not Role(identity["role"]).allows(role):
                refused(403, f"{identity.get('name')} ({identity['role']}) needs {role.value}")
                audit(action, "denied", identity, reason=f"needs {role.value}")
                raise ApiError(f"this needs an {role.value} role; yours is {identity['role']}", 403)
            g.identity = identity
            if not changes:
                return view(*args, **kwargs)
            try:
                result = view(*args, **kwargs)
            except Exception as exc:
                audit(action, "failed", identity, error=str(exc)[:300])
                raise
            audit(action, "ok", identity)
            return result

        inner.required_role = role  # type: ignore[attr-defined]  # read by the OpenAPI test
        return inner

    return wrap


def arg_float(name: str) -> float | None:
    value = request.args.get(name)
    if value is None or value == "":
        return None
    try:
        return float(value)
    except ValueError:
        raise ApiError(f"query parameter {name}={value!r} must be a number") from None


def arg_int(name: str, default: int) -> int:
    value = request.args.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ApiError(f"query parameter {name}={value!r} must be a whole number") from None


def window_args(
    selector: str = "scope", default: str = "fleet"
) -> tuple[str, float | None, float | None]:
    """The arguments of a time-windowed view, in this order: the `selector` argument (`scope`, or
    `by` for the per-group views; `default` when absent), then the optional `start` and `end`."""
    return request.args.get(selector, default), arg_float("start"), arg_float("end")


def arg_bool(name: str) -> bool | None:
    value = request.args.get(name)
    if value is None or value == "":
        return None
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise ApiError(f"query parameter {name}={value!r} must be true or false")


DEEP_JSON = "the JSON body is nested too deeply: send a flat object as the API reference shows"


def json_body() -> dict[str, Any]:
    try:
        data = request.get_json(silent=True)
    except RecursionError:  # the json module recurses per nesting level: `[[[[...` a thousand deep
        raise ApiError(DEEP_JSON) from None
    if not isinstance(data, dict):
        raise ApiError("the request body must be a JSON object (Content-Type: application/json)")
    return data


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def api_error(exc: ApiError):
        return jsonify(error=str(exc)), exc.status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if exc.code and 400 <= exc.code < 500:
            refused(exc.code, exc.name)  # unknown routes (e.g. paths with `..` or encoded slashes)
        response = jsonify(error=exc.description or exc.name, status=exc.code)
        if exc.code == 405 and exc.valid_methods:  # type: ignore[attr-defined]
            response.headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
        return response, exc.code

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        if isinstance(exc, RecursionError) and request.mimetype == "application/json":
            refused(400, DEEP_JSON)  # a view that parsed the body itself
            return jsonify(error=DEEP_JSON), 400
        status = getattr(exc, "status", None)
        if isinstance(status, int) and isinstance(exc, ValueError):
            # Service errors (DeviceError, RegistryError, ...) carry their HTTP status.
            return jsonify(error=str(exc)), status
        log.exception("unhandled error in %s %s", request.method, request.path)
        return jsonify(error="internal server error; see the server log", status=500), 500
