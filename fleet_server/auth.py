"""Credentials: device passwords (argon2id + Mosquitto's $7$ hash), API tokens and roles.

Only hashes are stored. Device passwords are random and high-entropy, but they are checked by
the HTTP download endpoint, so they get argon2id (the OWASP-recommended memory-hard hash, via
argon2-cffi) with a small in-memory cache of recent successes so resumed downloads stay cheap.
API tokens are 256-bit random strings: a salted slow hash adds nothing to their strength, so
they are stored as SHA-256 and looked up directly. Operators (console accounts) choose their
passwords, so those get argon2id too; console session ids are random like tokens.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from enum import StrEnum
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

TOKEN_PREFIX = "eft_"
# OWASP minimum argon2id parameters: ~20 ms per check here, 19 MiB of memory.
_hasher = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)
MOSQUITTO_ITERATIONS = 101  # what mosquitto_passwd 2.0 writes; the password itself is random


class Role(StrEnum):
    VIEWER = "viewer"  # read everything
    OPERATOR = "operator"  # also change things: devices, models, alerts, webhooks

    def allows(self, needed: Role) -> bool:
        return self is Role.OPERATOR or needed is Role.VIEWER


def new_device_password() -> str:
    return secrets.token_urlsafe(24)


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def mosquitto_hash(password: str, salt: bytes | None = None) -> str:
    """A Mosquitto 2.0 password-file hash: `$7$iterations$salt$PBKDF2-SHA512` (base64)."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, MOSQUITTO_ITERATIONS)
    return f"$7${MOSQUITTO_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


# Unknown accounts are checked against this hash, so a wrong password costs one argon2 check
# whether the name exists or not: response times do not tell which ids exist.
_DUMMY_HASH = _hasher.hash("edgefleet: no such account")


class PasswordChecker:
    """Checks device passwords against argon2 hashes, remembering recent successes.

    An unknown (or revoked) device id is checked against a dummy hash, so a wrong password takes
    the same time for an existing and an unknown id (no device-id oracle).
    """

    def __init__(self, cache_size: int = 4096, hasher: PasswordHasher = _hasher) -> None:
        self._ok: OrderedDict[tuple[str, bytes], str] = OrderedDict()
        self._size = cache_size
        self._lock = threading.Lock()
        self._hasher = hasher

    def check(self, device_id: str, password: str, stored_hash: str | None) -> bool:
        if stored_hash is None:
            with contextlib.suppress(VerificationError, InvalidHashError):
                self._hasher.verify(_DUMMY_HASH, password)
            return False
        # The cache key includes the stored hash: a revoked or re-provisioned device misses it.
        key = (device_id, hashlib.sha256(password.encode()).digest())
        with self._lock:
            if self._ok.get(key) == stored_hash:
                self._ok.move_to_end(key)
                return True
        try:
            self._hasher.verify(stored_hash, password)
        except (VerificationError, InvalidHashError):
            return False
        with self._lock:
            self._ok[key] = stored_hash
            while len(self._ok) > self._size:
                self._ok.popitem(last=False)
        return True


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenExpired(Exception):
    """A known API token whose expiry has passed; the message says when and what to do."""

    def __init__(self, identity: dict[str, Any], expired_at: float) -> None:
        super().__init__(
            f"API token {identity['name']!r} expired at "
            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(expired_at))}: "
            "create a new one with 'edgefleet server create-token'"
        )
        self.identity = identity
        self.expired_at = expired_at


def issue_token(storage: Any, name: str, role: str, now: float, expires_in_s: float | None = None) -> str:
    """Create an API token (returned once; only its hash is stored), optionally expiring."""
    if expires_in_s is not None and not expires_in_s > 0:
        raise ValueError(f"a token's lifetime must be positive, got {expires_in_s} seconds")
    token = new_token()
    storage.insert_token(name, role, token_hash(token), now,
                         now + expires_in_s if expires_in_s is not None else None)
    return token


def token_identity(storage: Any, token: str, now: float) -> dict[str, Any] | None:
    """The identity (id, name, role) of a valid token, None for an unknown or revoked one;
    raises TokenExpired for a known token past its expiry."""
    identity = storage.find_token(token_hash(token))
    if identity is None:
        return None
    expires_at = identity.get("expires_at")
    if expires_at is not None and now >= expires_at:
        raise TokenExpired(identity, expires_at)
    return {**identity, "expires_at": expires_at}


def constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


SESSION_COOKIE = "ef_session"
CSRF_HEADER = "X-CSRF-Token"


def verify_password(stored_hash: str | None, password: str) -> bool:
    """Check a password against an argon2 hash. An unknown account (None) costs the same time,
    so response times do not tell which operator names exist."""
    try:
        return _hasher.verify(stored_hash or _DUMMY_HASH, password) and stored_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def new_session_id() -> str:
    return secrets.token_urlsafe(32)


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)
