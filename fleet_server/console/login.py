"""Console area: log in and out (rate-limited, argon2id, HttpOnly SameSite=Strict cookie)."""

from __future__ import annotations

import secrets
from urllib.parse import unquote, urlsplit

from flask import Blueprint, Response, make_response, redirect, render_template, request, url_for

from fleet_server.api.common import services, session_identity
from fleet_server.auth import SESSION_COOKIE, constant_time_equal
from fleet_server.console import accounts
from fleet_server.console.web import no_store

# The console's templates live in console/templates/console/ (registered once, found by every area).
bp = Blueprint("console_auth", __name__, url_prefix="/console", template_folder="templates")

LOGIN_CSRF_COOKIE = "ef_login"  # double-submit token: a forged login form cannot know it
CONSOLE_PREFIX = "/console"


def safe_next(target: str | None) -> str:
    """Where to go after logging in: a console path on this server, else the overview.

    `next` is attacker-controlled (a link in a phishing mail), so it is judged as a browser would
    read it: percent-encoding undone (also twice encoded), backslashes read as slashes (`/\\evil`
    is `//evil`, another host), tabs and newlines dropped by the URL parser, so any control
    character refuses the target. Only a path under /console without scheme or host is followed.
    """
    default = url_for("console_overview.page")
    if not target or len(target) > 2048:
        return default
    seen = target
    for _ in range(3):  # %255C -> %5C -> \
        seen = unquote(seen)
    seen = seen.replace("\\", "/")
    if any(ord(c) < 0x20 or ord(c) == 0x7F or c.isspace() for c in seen):
        return default
    parts = urlsplit(seen)
    if parts.scheme or parts.netloc or seen.startswith("//"):
        return default
    if not (seen == CONSOLE_PREFIX or seen.startswith(CONSOLE_PREFIX + "/") or seen.startswith(CONSOLE_PREFIX + "?")):
        return default
    return target


def _secure() -> bool:
    """Secure cookies when the console is served over TLS (directly or via a proxy's scheme)."""
    return request.is_secure or services().config.server_url.startswith("https://")


def _login_form(error: str = "", status: int = 200, name: str = "") -> Response:
    token = secrets.token_urlsafe(24)
    oidc = services().config.oidc  # single sign-on offered beside the local accounts
    response = make_response(
        render_template(
            "console/login.html", error=error, login_token=token, name=name,
            next=safe_next(request.values.get("next")), fleet=services().config.fleet,
            sso_label=oidc.label if oidc is not None else "",
        ),
        status,
    )
    response.set_cookie(LOGIN_CSRF_COOKIE, token, max_age=1800, httponly=True, samesite="Strict",
                        secure=_secure(), path="/console/login")
    return no_store(response)


@bp.get("/login")
def login() -> Response:
    if session_identity() is not None:
        return redirect(safe_next(request.args.get("next")))
    return _login_form()


@bp.post("/login")
def do_login() -> Response:
    sent, expected = request.form.get("login_token", ""), request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not sent or not expected or not constant_time_equal(sent, expected):
        return _login_form("The login form expired; please try again.", 400)
    name = request.form.get("name", "").strip()
    try:
        session = accounts.login(services(), name, request.form.get("password", ""), request.remote_addr or "")
    except accounts.AccountError as exc:
        response = _login_form(str(exc), exc.status, name)
        if exc.retry_after:
            response.headers["Retry-After"] = str(exc.retry_after)
        return response
    response = redirect(safe_next(request.form.get("next")), 303)
    response.set_cookie(SESSION_COOKIE, session.id, max_age=accounts.SESSION_LIFETIME_S, httponly=True,
                        samesite="Strict", secure=_secure(), path="/")
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/console/login")
    return response


@bp.post("/logout")
def logout() -> Response:
    identity = session_identity()
    sid = request.cookies.get(SESSION_COOKIE)
    # Logging out needs the session's CSRF token too: a forged logout is a nuisance, not harmless.
    if identity is not None and sid and constant_time_equal(request.form.get("csrf_token", ""), identity["csrf_token"]):
        accounts.logout(services(), sid, identity, request.remote_addr)
    elif identity is not None:
        return Response("missing or wrong CSRF token", 403)
    response = redirect(url_for("console_auth.login"), 303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
