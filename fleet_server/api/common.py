"""Shared plumbing of the REST API: services lookup, token auth, query parsing, JSON errors."""

from __future__ import annotations

import base64
import functools
import logging
from collections.abc import Callable
from typing import Any

from flask import Flask, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from fleet_server.auth import Role, token_hash
from fleet_server.service import Services

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered as JSON `{"error": message}` with an HTTP status."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def services() -> Services:
    return current_app.extensions["edgefleet"]


def bearer_identity() -> dict[str, Any] | None:
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        return None
    return services().storage.find_token(token_hash(header[7:].strip()))


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
    """Decorator: a Bearer token whose role allows `role` (viewer for reads, operator for writes)."""

    def wrap(view: Callable) -> Callable:
        @functools.wraps(view)
        def inner(*args: Any, **kwargs: Any) -> Any:
            identity = bearer_identity()
            if identity is None:
                raise ApiError(
                    "missing or invalid API token: send 'Authorization: Bearer TOKEN' "
                    "(create one with 'edgefleet server create-token')",
                    401,
                )
            if not Role(identity["role"]).allows(role):
                raise ApiError(f"this needs an {role.value} token; yours is {identity['role']}", 403)
            g.identity = identity
            return view(*args, **kwargs)

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


def arg_bool(name: str) -> bool | None:
    value = request.args.get(name)
    if value is None or value == "":
        return None
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise ApiError(f"query parameter {name}={value!r} must be true or false")


def json_body() -> dict[str, Any]:
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise ApiError("the request body must be a JSON object (Content-Type: application/json)")
    return data


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def api_error(exc: ApiError):
        return jsonify(error=str(exc)), exc.status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        response = jsonify(error=exc.description or exc.name, status=exc.code)
        if exc.code == 405 and exc.valid_methods:  # type: ignore[attr-defined]
            response.headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
        return response, exc.code

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        status = getattr(exc, "status", None)
        if isinstance(status, int) and isinstance(exc, ValueError):
            # Service errors (DeviceError, RegistryError, ...) carry their HTTP status.
            return jsonify(error=str(exc)), status
        log.exception("unhandled error in %s %s", request.method, request.path)
        return jsonify(error="internal server error; see the server log", status=500), 500
