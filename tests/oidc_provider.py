"""A small OpenID Connect provider for the tests, run in its own process on a loopback port.

Built on Authlib's server components: `AuthorizationServer` (Flask integration), the
authorization code grant with `CodeChallenge` (PKCE, S256 required) and `OpenIDCode` (ID tokens
signed by an RS256 key published at the JWKS URL). It approves every request for the test user
set through `POST /test/config` (no login page), and that endpoint also switches what the next
ID tokens get wrong: `forged` (signed by another key with the published key's id),
`wrong_audience`, `expired`, `bad_nonce`.

    python tests/oidc_provider.py --client-id ID --client-secret S --port-file F
"""

from __future__ import annotations

import argparse
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import grants
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oidc.core import UserInfo
from authlib.oidc.core.grants import OpenIDCode
from flask import Flask, jsonify, request
from joserfc.jwk import KeySet, RSAKey
from werkzeug.serving import make_server

KID = "test-key-1"
MODES = ("normal", "forged", "wrong_audience", "expired", "bad_nonce")


class Client:
    """The one registered client (edgefleet), a confidential client with a redirect URI."""

    def __init__(self, client_id: str, secret: str, redirect_uri: str) -> None:
        self.client_id, self.secret, self.redirect_uri = client_id, secret, redirect_uri

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_allowed_scope(self, scope: str) -> str:
        return " ".join(s for s in scope.split() if s in ("openid", "profile", "email", "groups"))

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri == self.redirect_uri

    def check_client_secret(self, client_secret: str) -> bool:
        return secrets.compare_digest(client_secret, self.secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method in ("client_secret_basic", "client_secret_post")

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "authorization_code"


class Code:
    """An issued authorization code with what the token request is checked against."""

    def __init__(self, code: str, request: Any, user: dict[str, Any]) -> None:
        self.code = code
        self.client_id = request.client.client_id
        self.redirect_uri = request.payload.redirect_uri
        self.scope = request.scope
        self.nonce = request.payload.data.get("nonce")
        self.code_challenge = request.payload.data.get("code_challenge")
        self.code_challenge_method = request.payload.data.get("code_challenge_method")
        self.user = user
        self.auth_time = int(time.time())

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope

    def get_nonce(self) -> str | None:
        return self.nonce

    def get_auth_time(self) -> int:
        return self.auth_time

    def get_acr(self) -> None:
        return None

    def get_amr(self) -> None:
        return None


class Provider:
    """The provider's state: keys, the client, issued codes, the test user and the token mode."""

    def __init__(self, issuer: str, client: Client) -> None:
        self.issuer = issuer
        self.client = client
        self.key = RSAKey.generate_key(2048, parameters={"kid": KID, "use": "sig", "alg": "RS256"})
        # Same key id, different key: what an attacker without the provider's key can sign with.
        self.rogue_key = RSAKey.generate_key(2048, parameters={"kid": KID, "use": "sig", "alg": "RS256"})
        self.codes: dict[str, Code] = {}
        self.user: dict[str, Any] = {"sub": "u-alice", "preferred_username": "alice", "groups": ["fleet-ops"]}
        self.mode = "normal"
        self.token_requests = 0
        self.jwks_requests = 0
        self.discovery_requests = 0
        self.lock = threading.Lock()


def create_app(provider: Provider) -> Flask:
    app = Flask(__name__)

    class AuthorizationCodeGrant(grants.AuthorizationCodeGrant):
        TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]

        def save_authorization_code(self, code: str, request: Any) -> None:
            provider.codes[code] = Code(code, request, dict(provider.user))

        def query_authorization_code(self, code: str, client: Client) -> Code | None:
            item = provider.codes.get(code)
            return item if item is not None and item.client_id == client.client_id else None

        def delete_authorization_code(self, authorization_code: Code) -> None:
            provider.codes.pop(authorization_code.code, None)

        def authenticate_user(self, authorization_code: Code) -> dict[str, Any]:
            return authorization_code.user

    class TestOpenIDCode(OpenIDCode):
        def exists_nonce(self, nonce: str, request: Any) -> bool:
            return any(c.nonce == nonce for c in provider.codes.values())

        def resolve_client_private_key(self, client: Client) -> RSAKey:
            return provider.rogue_key if provider.mode == "forged" else provider.key

        def get_encode_header(self, client: Client) -> dict[str, str]:
            return {"alg": "RS256", "kid": provider.key.kid}

        def get_client_algorithm(self, client: Client) -> str:
            return "RS256"

        def get_client_claims(self, client: Client) -> dict[str, Any]:
            return {"iss": provider.issuer, "aud": [client.get_client_id()]}

        def generate_user_info(self, user: dict[str, Any], scope: str) -> UserInfo:
            info = UserInfo(user)
            # The user info is applied last, so a test mode overrides the grant's own claims here.
            now = int(time.time())
            if provider.mode == "wrong_audience":
                info["aud"] = ["another-client"]
            elif provider.mode == "expired":
                info["iat"], info["exp"] = now - 7200, now - 3600
            elif provider.mode == "bad_nonce":
                info["nonce"] = "not-the-nonce-that-was-sent"
            return info

    server = AuthorizationServer(app, query_client=lambda cid: provider.client if cid == provider.client.client_id
                                 else None, save_token=lambda token, req: None)
    server.register_grant(AuthorizationCodeGrant, [TestOpenIDCode(require_nonce=True), CodeChallenge(required=True)])

    @app.get("/.well-known/openid-configuration")
    def discovery():
        provider.discovery_requests += 1
        return jsonify({
            "issuer": provider.issuer,
            "authorization_endpoint": provider.issuer + "/authorize",
            "token_endpoint": provider.issuer + "/token",
            "jwks_uri": provider.issuer + "/jwks",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        })

    @app.get("/jwks")
    def jwks():
        provider.jwks_requests += 1
        return jsonify(KeySet([provider.key]).as_dict(private=False))

    @app.get("/authorize")
    def authorize():
        user = dict(provider.user)  # auto-approved: the test user has "logged in" already
        grant = server.get_consent_grant(end_user=user)
        return server.create_authorization_response(grant_user=user, grant=grant)

    @app.post("/token")
    def token():
        with provider.lock:
            provider.token_requests += 1
            return server.create_token_response()

    @app.post("/test/config")
    def configure():
        body = request.get_json(force=True)
        mode = body.get("mode", "normal")
        if mode not in MODES:
            return jsonify({"error": f"mode must be one of {MODES}"}), 400
        provider.mode = mode
        if "user" in body:
            provider.user = dict(body["user"])
        if body.get("rotate_key"):  # a new signing key with a new id; only it is published then
            kid = f"test-key-{secrets.token_hex(4)}"
            provider.key = RSAKey.generate_key(2048, parameters={"kid": kid, "use": "sig", "alg": "RS256"})
        if "redirect_uri" in body:
            provider.client.redirect_uri = str(body["redirect_uri"])
        return jsonify({"mode": provider.mode, "user": provider.user})

    @app.get("/test/state")
    def state():
        return jsonify({"mode": provider.mode, "token_requests": provider.token_requests,
                        "jwks_requests": provider.jwks_requests, "discovery_requests": provider.discovery_requests,
                        "kid": provider.key.kid, "codes": len(provider.codes)})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--client-secret", required=True)
    parser.add_argument("--redirect-uri", default="", help="also settable later through /test/config")
    parser.add_argument("--port-file", required=True)
    args = parser.parse_args()
    # Port 0: the kernel picks a free one; the issuer URL is known once the socket is bound.
    holder: dict[str, Provider] = {}
    client = Client(args.client_id, args.client_secret, args.redirect_uri)
    srv = make_server("127.0.0.1", 0, lambda environ, start: holder["app"](environ, start), threaded=True)
    issuer = f"http://127.0.0.1:{srv.server_port}"
    provider = Provider(issuer, client)
    holder["app"] = create_app(provider)  # type: ignore[assignment]
    tmp = Path(args.port_file + ".tmp")
    tmp.write_text(str(srv.server_port))
    tmp.replace(args.port_file)
    srv.serve_forever()


if __name__ == "__main__":
    main()
