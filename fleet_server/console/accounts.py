"""Operator accounts, console sessions, rate-limited login and the audit log (no Flask here).

Operators choose their passwords, so they are hashed with argon2id. A session is a random id in
an HttpOnly cookie; the server keeps only its SHA-256 with the operator, the session's CSRF token
and its expiry, so logging out, disabling an operator or changing their role ends it at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edge_agent.protocol import valid_id
from fleet_server.auth import (
    Role,
    hash_password,
    new_csrf_token,
    new_session_id,
    token_hash,
    verify_password,
)
from fleet_server.storage import Conflict

if TYPE_CHECKING:
    from fleet_server.context import Services

SESSION_LIFETIME_S = 12 * 3600  # one shift; the operator logs in again after
MIN_PASSWORD_LENGTH = 10


class AccountError(ValueError):
    """An account or login request that cannot be done; the message says why and what to do."""

    def __init__(self, message: str, status: int = 400, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


@dataclass
class Session:
    """A new console session: the cookie value (shown to the browser once) and its CSRF token."""

    id: str
    operator: str
    role: str
    csrf_token: str
    expires_at: float


def parse_role(role: str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise AccountError(f"role {role!r} is not known: use 'viewer' (reads) or 'operator' (acts)") from None


def check_password_strength(name: str, password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"the password needs at least {MIN_PASSWORD_LENGTH} characters")
    if password.lower() == name.lower():
        raise AccountError("the password must not be the operator's name")


def create_operator(svc: Services, name: str, role: str, password: str, *, update: bool = False) -> dict[str, Any]:
    """Create an operator account (or with `update`, set an existing one's role and password)."""
    if not valid_id(name):
        raise AccountError(
            f"operator name {name!r} is not valid: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    parsed = parse_role(role)
    check_password_strength(name, password)
    hashed = hash_password(password)
    if update and svc.storage.get_operator(name) is not None:
        svc.storage.set_operator(name, role=parsed.value, password_hash=hashed)
    else:
        try:
            svc.storage.insert_operator(name, parsed.value, hashed, svc.clock())
        except Conflict:
            raise AccountError(
                f"operator {name!r} already exists; pass --update to change their role or password", 409
            ) from None
    record_audit(svc, action="operator.update" if update else "operator.create", outcome="ok", actor="cli",
                 role=None, target=f"operator:{name}", detail={"role": parsed.value})
    row = svc.storage.get_operator(name) or {}
    return {k: row.get(k) for k in ("name", "role", "created_at", "disabled_at")}


def login(svc: Services, name: str, password: str, remote_addr: str) -> Session:
    """Check the credentials (rate limited) and open a session; every attempt is audited."""
    lim, now = svc.login_limiter, svc.clock()
    wait = lim.retry_after(svc.storage, name, remote_addr, now)
    if wait is not None:
        record_audit(svc, action="login", outcome="denied", actor=name, role=None, target=f"operator:{name}",
                     remote_addr=remote_addr, detail={"reason": "rate limited"})
        raise AccountError(f"too many failed logins; try again in {wait} seconds", 429, retry_after=wait)
    row = svc.storage.get_operator(name) if valid_id(name) else None
    ok = verify_password(row["password_hash"] if row else None, password)
    if not ok or row is None or row["disabled_at"] is not None:
        lim.failed(svc.storage, name, remote_addr, now)
        record_audit(svc, action="login", outcome="failed", actor=name, role=None, target=f"operator:{name}",
                     remote_addr=remote_addr, detail={})
        raise AccountError("wrong operator name or password", 401)
    lim.succeeded(svc.storage, name)
    svc.storage.delete_expired_sessions(now)
    session = Session(new_session_id(), row["name"], row["role"], new_csrf_token(), now + SESSION_LIFETIME_S)
    svc.storage.insert_session(token_hash(session.id), session.operator, session.csrf_token, now, session.expires_at)
    record_audit(svc, action="login", outcome="ok", actor=row["name"], role=row["role"],
                 target=f"operator:{row['name']}", remote_addr=remote_addr, detail={})
    return session


def locked_logins(svc: Services) -> list[dict[str, Any]]:
    """Operator names and client addresses that may not log in now (too many failures)."""
    return svc.login_limiter.locked(svc.storage, svc.clock())


def logout(svc: Services, session_id: str, identity: dict[str, Any] | None, remote_addr: str | None) -> None:
    svc.storage.delete_session(token_hash(session_id))
    if identity is not None:
        record_audit(svc, action="logout", outcome="ok", actor=identity["name"], role=identity["role"],
                     target=f"operator:{identity['name']}", remote_addr=remote_addr, detail={})


def record_audit(
    svc: Services,
    *,
    action: str,
    outcome: str,
    actor: str,
    role: str | None,
    target: str = "",
    remote_addr: str | None = None,
    detail: dict[str, Any] | None = None,
) -> int:
    """Append one audit row: who (`actor`, `role`) did `action` to `target`, and the `outcome`."""
    return svc.storage.insert_audit(
        {
            "at": svc.clock(),
            "actor": actor,
            "role": role,
            "action": action,
            "target": target,
            "outcome": outcome,
            "detail": detail or {},
            "remote_addr": remote_addr,
        }
    )


def audit_log(svc: Services, target_prefix: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    return svc.storage.list_audit(target_prefix=target_prefix, limit=min(limit, 1000))
