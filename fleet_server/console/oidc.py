"""Console area: single sign-on through an OpenID Connect provider (`[oidc]` in server.toml).

`GET /console/login/oidc` sends the browser to the provider with a fresh state, nonce and PKCE
verifier, kept in an HttpOnly cookie bound to this browser; the provider sends it back to
`/console/login/oidc/callback`, where `fleet_server.oidc` checks it all. The user then gets the
same console session as a local login (stored in the database, so every node knows it).
"""

from __future__ import annotations

import base64
import json
from typing import Any

from flask import (
    Blueprint,
    Response,
    current_app,
    make_response,
    redirect,
    render_template,
    request,
)

from fleet_server.api.common import services
from fleet_server.auth import SESSION_COOKIE, new_csrf_token, new_session_id, token_hash
from fleet_server.console import accounts
from fleet_server.console.login import _login_form, _secure, safe_next
from fleet_server.console.web import no_store
from fleet_server.context import Services
from fleet_server.oidc import (
    CALLBACK_PATH,
    PENDING_LIFETIME_S,
    OidcClient,
    OidcError,
    PendingLogin,
    SignedIn,
)

bp = Blueprint("console_oidc", __name__, url_prefix="/console", template_folder="templates")

PENDING_COOKIE = "ef_oidc"
PENDING_PATH = "/console/login/oidc"
SSO_PASSWORD_MARK = "!oidc "  # an operator row made by sign-in: never a valid argon2 hash, no local login


def oidc_client() -> OidcClient | None:
    """This app's client for the configured provider (its documents cached per process), or None."""
    config = services().config
    if config.oidc is None:
        return None
    client = current_app.extensions.get("edgefleet_oidc")
    if client is None:
        client = OidcClient(config.oidc, config.oidc.redirect_url or config.server_url + CALLBACK_PATH,
                            clock=services().clock)
        current_app.extensions["edgefleet_oidc"] = client
    return client


def _encode(pending: PendingLogin) -> str:
    return base64.urlsafe_b64encode(json.dumps(pending.as_dict()).encode()).decode()


def _decode(value: str) -> PendingLogin:
    try:
        data: Any = json.loads(base64.urlsafe_b64decode(value.encode()))
    except ValueError:
        data = None
    return PendingLogin.from_dict(data)


@bp.get("/login/oidc")
def start() -> Response:
    client = oidc_client()
    if client is None:
        return _login_form("Single sign-on is not configured on this server.", 404)
    try:
        url, pending = client.begin(safe_next(request.args.get("next")))
    except OidcError as exc:
        _audit_failure(None, exc)
        return _login_form(str(exc), exc.status)
    response = redirect(url, 302)
    # SameSite=Lax, not Strict: the provider's redirect back is a cross-site navigation.
    response.set_cookie(PENDING_COOKIE, _encode(pending), max_age=PENDING_LIFETIME_S, httponly=True,
                        samesite="Lax", secure=_secure(), path=PENDING_PATH)
    return no_store(response)


@bp.get("/login/oidc/callback")
def callback() -> Response:
    client = oidc_client()
    if client is None:
        return _login_form("Single sign-on is not configured on this server.", 404)
    signed: SignedIn | None = None
    try:
        pending = _decode(request.cookies.get(PENDING_COOKIE, ""))
        signed = client.finish(pending, request.args)
        session = open_session(services(), signed, request.remote_addr or "")
    except OidcError as exc:
        _audit_failure(signed, exc)
        response = _login_form(str(exc), exc.status)
        response.delete_cookie(PENDING_COOKIE, path=PENDING_PATH)
        return response
    target = safe_next(pending.next)
    # A page, not a redirect: a browser may withhold the new SameSite=Strict cookie from a navigation
    # whose redirect chain crossed sites (provider -> here); one started by this page is same-site.
    response = make_response(render_template("console/signed_in.html", target=target))
    response.set_cookie(SESSION_COOKIE, session.id, max_age=accounts.SESSION_LIFETIME_S, httponly=True,
                        samesite="Strict", secure=_secure(), path="/")
    response.delete_cookie(PENDING_COOKIE, path=PENDING_PATH)
    return no_store(response)


def _audit_failure(signed: SignedIn | None, exc: OidcError) -> None:
    actor = signed.username if signed is not None else ""
    detail: dict[str, Any] = {"method": "oidc", "reason": exc.reason}
    if signed is not None:
        detail.update(issuer=signed.issuer, subject=signed.subject, claim_values=signed.claim_values[:20])
    accounts.record_audit(services(), action="login", outcome="denied" if exc.status == 403 else "failed",
                          actor=actor[:64], role=None, target=f"operator:{actor[:64]}" if actor else "sso",
                          remote_addr=request.remote_addr, detail=detail)


def operator_name(signed: SignedIn) -> str:
    """The operator name an SSO user gets: the username claim, made a valid edgefleet name."""
    cleaned = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "-" for c in signed.username)
    cleaned = cleaned.lstrip("._-")[:64]
    if not cleaned:
        raise OidcError("the identity provider sent no usable user name", 401, "no username")
    return cleaned


def open_session(svc: Services, signed: SignedIn, remote_addr: str) -> accounts.Session:
    """The console session of a signed-in user (the same kind a local login opens), audited.

    The user is an operator row bound to the provider's (issuer, subject): a local account of the
    same name is never taken over, and disabling the row locks the user out here too."""
    if signed.role is None:
        raise OidcError(
            f"You signed in at the identity provider as {signed.username!r}, but none of your "
            f"{svc.config.oidc.role_claim if svc.config.oidc else 'role'} values grants a role in this "
            "edgefleet console. Ask an administrator to add you to a group that edgefleet maps to a role.",
            403, "no role granted",
        )
    name, now = operator_name(signed), svc.clock()
    mark = f"{SSO_PASSWORD_MARK}{signed.issuer} {signed.subject}"
    row = svc.storage.get_operator(name)
    if row is None:
        svc.storage.insert_operator(name, signed.role.value, mark, now)
        accounts.record_audit(svc, action="operator.create", outcome="ok", actor=name, role=signed.role.value,
                              target=f"operator:{name}", remote_addr=remote_addr,
                              detail={"method": "oidc", "role": signed.role.value})
    elif row["password_hash"] != mark:
        raise OidcError(f"The operator name {name!r} belongs to another account on this server; ask an "
                        "administrator to rename one of them.", 403, "name taken")
    elif row["disabled_at"] is not None:
        raise OidcError(f"The operator {name!r} is disabled on this server.", 403, "disabled")
    elif row["role"] != signed.role.value:  # the provider's groups changed: they decide
        svc.storage.set_operator(name, role=signed.role.value)
    svc.storage.delete_expired_sessions(now)
    session = accounts.Session(new_session_id(), name, signed.role.value, new_csrf_token(),
                               now + accounts.SESSION_LIFETIME_S)
    svc.storage.insert_session(token_hash(session.id), name, session.csrf_token, now, session.expires_at)
    accounts.record_audit(svc, action="login", outcome="ok", actor=name, role=signed.role.value,
                          target=f"operator:{name}", remote_addr=remote_addr,
                          detail={"method": "oidc", "issuer": signed.issuer, "subject": signed.subject})
    return session
