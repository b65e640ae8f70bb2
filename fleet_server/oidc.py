"""OpenID Connect sign-in for the console (no Flask here): the `[oidc]` settings, the provider's
discovery document and keys, the authorization code flow with PKCE, the ID token's checks and
the mapping of a claim (e.g. `groups`) to an edgefleet role.

Authlib does the protocol: `OAuth2Session` builds the authorization URL (S256 code challenge) and
exchanges the code; joserfc (Authlib's JOSE library) verifies the ID token's signature against the
provider's published keys, and `authlib.oidc.core.CodeIDToken` checks issuer, audience, expiry,
nonce, azp and at_hash.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.config_file import ConfigError, field_names, unknown_keys
from fleet_server.auth import Role

DISCOVERY_PATH = "/.well-known/openid-configuration"
CALLBACK_PATH = "/console/login/oidc/callback"
# Asymmetric algorithms only: an HMAC-signed ID token would be checked with the client secret,
# which a confused provider setup could let another client forge.
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]
METADATA_TTL_S = 3600.0
JWKS_REFRESH_MIN_S = 60.0  # an unknown key id refetches the keys at most this often (rotation)
HTTP_TIMEOUT_S = 10.0
PENDING_LIFETIME_S = 600  # a sign-in must come back from the provider within this
ROLE_ORDER = list(Role)  # later members grant more; a user with several mapped values gets the most


class OidcError(ValueError):
    """A sign-in that cannot be completed; the message says why (shown on the login page)."""

    def __init__(self, message: str, status: int = 401, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason or message


@dataclass
class OidcConfig:
    """The `[oidc]` table of server.toml."""

    issuer: str
    client_id: str
    client_secret: str = ""
    client_secret_file: str = ""  # read at start; beats client_secret
    redirect_url: str = ""  # default: public URL + /console/login/oidc/callback
    scopes: list[str] = field(default_factory=lambda: ["openid", "profile", "email"])
    role_claim: str = "groups"
    roles: dict[str, str] = field(default_factory=dict)  # claim value -> viewer / operator
    username_claim: str = "preferred_username"
    display_name: str = ""  # the login button's "Sign in with ..."; default the issuer's host
    ca_file: str = ""  # CA bundle for the provider's HTTPS; default the system's
    leeway_s: float = 60.0  # clock skew allowed on exp / iat

    def __post_init__(self) -> None:
        self.issuer = self.issuer.rstrip("/")
        if not self.issuer.startswith(("https://", "http://")):
            raise ConfigError(f"[oidc] issuer {self.issuer!r} must be the provider's https:// URL")
        if not self.client_id:
            raise ConfigError("[oidc] client_id is empty: register edgefleet as a client at the provider")
        if "openid" not in self.scopes:
            raise ConfigError("[oidc] scopes must include \"openid\"")
        if not self.roles:
            raise ConfigError(
                f"[oidc] roles is empty: map values of the {self.role_claim!r} claim to roles, e.g. "
                '[oidc.roles] "edgefleet-operators" = "operator"'
            )
        known = [r.value for r in Role]
        for value, role in self.roles.items():
            if role not in known:
                raise ConfigError(f"[oidc.roles] {value!r} = {role!r}: the role must be one of {known}")
        if self.leeway_s < 0:
            raise ConfigError("[oidc] leeway_s must be 0 or more seconds")

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> OidcConfig:
        unknown = unknown_keys(dict(table), field_names(cls))
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} in [oidc]; known keys: {', '.join(sorted(field_names(cls)))}")
        for key in ("issuer", "client_id"):
            if key not in table:
                raise ConfigError(f"[oidc] needs {key}")
        return cls(**table)

    def secret(self) -> str:
        if self.client_secret_file:
            try:
                return Path(self.client_secret_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"[oidc] client_secret_file {self.client_secret_file}: {exc.strerror}") from exc
        return self.client_secret

    @property
    def label(self) -> str:
        from urllib.parse import urlsplit

        return self.display_name or urlsplit(self.issuer).hostname or self.issuer


@dataclass
class PendingLogin:
    """What the browser keeps (HttpOnly cookie) between leaving for the provider and coming back."""

    state: str
    nonce: str
    code_verifier: str
    next: str
    created_at: float

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "nonce": self.nonce, "code_verifier": self.code_verifier,
                "next": self.next, "created_at": self.created_at}

    @classmethod
    def from_dict(cls, data: Any) -> PendingLogin:
        try:
            return cls(str(data["state"]), str(data["nonce"]), str(data["code_verifier"]), str(data["next"]),
                       float(data["created_at"]))
        except (KeyError, TypeError, ValueError):
            raise OidcError("the sign-in was not started here or has expired; please sign in again", 400,
                            "no pending sign-in") from None


@dataclass
class SignedIn:
    """A user the provider vouched for, with the edgefleet role their claims grant (None: nothing)."""

    issuer: str
    subject: str
    username: str
    role: Role | None
    claim_values: list[str]


class OidcClient:
    """One provider: its discovery document and keys (cached per process), the code flow and checks."""

    def __init__(self, config: OidcConfig, redirect_url: str, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.redirect_url = redirect_url
        self.clock = clock
        self._lock = threading.Lock()
        self._metadata: dict[str, Any] | None = None
        self._metadata_at = 0.0
        self._jwks: dict[str, Any] | None = None
        self._jwks_at = 0.0

    # ------------------------------------------------------------------ provider documents

    def _session(self) -> Any:
        from authlib.integrations.requests_client import OAuth2Session

        session = OAuth2Session(
            client_id=self.config.client_id, client_secret=self.config.secret(),
            scope=" ".join(self.config.scopes), redirect_uri=self.redirect_url,
            code_challenge_method="S256", token_endpoint_auth_method="client_secret_basic",
        )
        session.verify = self.config.ca_file or True
        return session

    def _get_json(self, url: str) -> dict[str, Any]:
        import requests

        try:
            response = requests.get(url, timeout=HTTP_TIMEOUT_S, verify=self.config.ca_file or True)
            response.raise_for_status()
            data = response.json()
        except (requests.RequestException, ValueError) as exc:
            raise OidcError(f"the identity provider cannot be reached ({url}): {exc}", 502,
                            "provider unreachable") from exc
        if not isinstance(data, dict):
            raise OidcError(f"the identity provider's {url} is not a JSON object", 502, "bad provider document")
        return data

    def metadata(self) -> dict[str, Any]:
        """The discovery document, whose issuer must be the configured one (OIDC Discovery §4.3)."""
        with self._lock:
            if self._metadata is not None and self.clock() - self._metadata_at < METADATA_TTL_S:
                return self._metadata
        data = self._get_json(self.config.issuer + DISCOVERY_PATH)
        if str(data.get("issuer", "")).rstrip("/") != self.config.issuer:
            raise OidcError(f"the provider's discovery document names issuer {data.get('issuer')!r}, "
                            f"not {self.config.issuer!r}: check [oidc] issuer", 502, "issuer mismatch")
        for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            if not isinstance(data.get(key), str):
                raise OidcError(f"the provider's discovery document has no {key}", 502, "bad provider document")
        with self._lock:
            self._metadata, self._metadata_at = data, self.clock()
        return data

    def _key_set(self, kid: str | None) -> Any:
        from joserfc.jwk import KeySet

        with self._lock:
            jwks, fetched_at = self._jwks, self._jwks_at
        known = jwks is not None and (kid is None or any(k.get("kid") == kid for k in jwks.get("keys", [])))
        if not known and (jwks is None or self.clock() - fetched_at >= JWKS_REFRESH_MIN_S):
            jwks = self._get_json(self.metadata()["jwks_uri"])
            with self._lock:
                self._jwks, self._jwks_at = jwks, self.clock()
        try:
            return KeySet.import_key_set(jwks or {"keys": []})  # type: ignore[arg-type]
        except Exception as exc:
            raise OidcError(f"the provider's keys cannot be read: {exc}", 502, "bad provider keys") from exc

    # ------------------------------------------------------------------ the flow

    def begin(self, next_url: str) -> tuple[str, PendingLogin]:
        """The provider's authorization URL and what the browser must bring back."""
        from authlib.common.security import generate_token

        pending = PendingLogin(state=secrets.token_urlsafe(32), nonce=secrets.token_urlsafe(32),
                               code_verifier=generate_token(64), next=next_url, created_at=self.clock())
        url, _ = self._session().create_authorization_url(
            self.metadata()["authorization_endpoint"], state=pending.state, nonce=pending.nonce,
            code_verifier=pending.code_verifier,
        )
        return url, pending

    def finish(self, pending: PendingLogin, params: Mapping[str, str]) -> SignedIn:
        """Check the callback against the pending sign-in, exchange the code, verify the ID token."""
        if self.clock() - pending.created_at > PENDING_LIFETIME_S:
            raise OidcError("the sign-in took too long; please sign in again", 400, "pending sign-in expired")
        if not secrets.compare_digest(params.get("state", ""), pending.state):
            raise OidcError("the sign-in response does not belong to this browser's sign-in; please sign in again",
                            400, "state mismatch")
        if params.get("error"):
            raise OidcError(f"the identity provider refused the sign-in: {params.get('error')} "
                            f"{params.get('error_description', '')}".strip(), 401, "provider error")
        code = params.get("code", "")
        if not code:
            raise OidcError("the identity provider sent no authorization code", 400, "no code")
        from authlib.integrations.base_client import OAuthError

        try:
            token = self._session().fetch_token(
                self.metadata()["token_endpoint"], grant_type="authorization_code", code=code,
                code_verifier=pending.code_verifier, redirect_uri=self.redirect_url, timeout=HTTP_TIMEOUT_S,
            )
        except OAuthError as exc:
            raise OidcError(f"the identity provider refused the code: {exc.error} {exc.description or ''}".strip(),
                            401, "token request refused") from exc
        except Exception as exc:  # requests' errors, a non-JSON answer
            raise OidcError(f"the token request failed: {exc}", 502, "token request failed") from exc
        id_token = token.get("id_token")
        if not id_token:
            raise OidcError("the identity provider sent no ID token (is \"openid\" among the scopes?)", 401,
                            "no id_token")
        claims = self.verify_id_token(id_token, pending.nonce, token.get("access_token"))
        return self.signed_in(claims)

    def verify_id_token(self, id_token: str, nonce: str, access_token: str | None = None) -> dict[str, Any]:
        """The ID token's claims once its signature (the provider's published keys), issuer, audience,
        azp, expiry, issue time, nonce and at_hash are right; OidcError otherwise."""
        from authlib.oidc.core import CodeIDToken
        from joserfc import jws, jwt
        from joserfc.errors import JoseError

        try:
            header = jws.extract_compact(id_token.encode()).protected
        except (JoseError, ValueError) as exc:
            raise OidcError("the ID token is not a signed JWT", 401, "malformed id_token") from exc
        if header.get("alg") not in ALGORITHMS:
            raise OidcError(f"the ID token's algorithm {header.get('alg')!r} is not accepted", 401, "bad alg")
        keys = self._key_set(header.get("kid"))
        try:
            token = jwt.decode(id_token, keys, algorithms=ALGORITHMS)
        except (JoseError, ValueError) as exc:
            raise OidcError("the ID token's signature is not the identity provider's", 401, "bad signature") from exc
        options = {"iss": {"essential": True, "value": self.config.issuer},
                   "aud": {"essential": True, "value": self.config.client_id},
                   "exp": {"essential": True}, "iat": {"essential": True}, "sub": {"essential": True}}
        params = {"nonce": nonce, "client_id": self.config.client_id}
        if access_token:
            params["access_token"] = access_token
        claims = CodeIDToken(token.claims, token.header, options=options, params=params)  # type: ignore[arg-type]
        try:
            claims.validate(now=int(self.clock()), leeway=int(self.config.leeway_s))
        except JoseError as exc:
            claim = getattr(exc, "claim", "") or ""
            what = {"iss": "was issued by another provider", "aud": "was issued for another client",
                    "exp": "has expired", "iat": "is not valid yet", "nbf": "is not valid yet",
                    "nonce": "does not answer this sign-in (nonce)", "azp": "was issued for another client",
                    "at_hash": "does not match its access token"}.get(claim, f"is not valid ({exc})")
            raise OidcError(f"the ID token {what}", 401, f"bad {claim or 'claims'}") from exc
        if "nonce" not in claims:  # CodeIDToken checks it only when present; we always send one
            raise OidcError("the ID token does not answer this sign-in (nonce)", 401, "bad nonce")
        return dict(claims)

    # ------------------------------------------------------------------ who and which role

    def claim_values(self, claims: Mapping[str, Any]) -> list[str]:
        """The role claim's values; a dotted name reaches into objects (`realm_access.roles`)."""
        value: Any = claims
        for part in self.config.role_claim.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        if value is None:
            return []
        values = value if isinstance(value, list) else [value]
        return [str(v) for v in values]

    def role_for(self, values: list[str]) -> Role | None:
        granted = [Role(self.config.roles[v]) for v in values if v in self.config.roles]
        return max(granted, key=ROLE_ORDER.index) if granted else None

    def signed_in(self, claims: Mapping[str, Any]) -> SignedIn:
        values = self.claim_values(claims)
        username = str(claims.get(self.config.username_claim) or claims.get("sub") or "")
        return SignedIn(issuer=str(claims["iss"]), subject=str(claims["sub"]), username=username,
                        role=self.role_for(values), claim_values=values)
