"""Console single sign-on against a real OpenID Connect provider in its own process on loopback
(tests/oidc_provider.py, built on Authlib's server components): the code flow with PKCE through
real HTTP, the role claim's mapping, and every ID token that must be refused (signed by another
key, for another client, expired, with another nonce), a user whose groups grant nothing, a
callback that does not belong to the browser, and a local account that SSO must not take over."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from edge_agent.config_file import ConfigError
from fleet_server.auth import token_hash
from fleet_server.config import load_config
from fleet_server.console.accounts import create_operator
from fleet_server.oidc import OidcConfig
from fleet_server.service import FleetServer
from tests.brokers import wait_until
from tests.server_fixtures import make_config

pytest_plugins = ["tests.console_fixtures"]  # the Chromium fixture

ROOT = Path(__file__).resolve().parent.parent
CLIENT_ID, CLIENT_SECRET = "edgefleet-console", "a-test-client-secret"
ROLES = {"fleet-viewers": "viewer", "fleet-ops": "operator"}
LOCAL_PASSWORD = "a-long-enough-password"


class Provider:
    """The test provider's process: its issuer URL and its switch for the next tokens."""

    def __init__(self, workdir: Path) -> None:
        port_file = workdir / "provider.port"
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "oidc_provider.py"), "--client-id", CLIENT_ID,
             "--client-secret", CLIENT_SECRET, "--port-file", str(port_file)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        wait_until(lambda: port_file.exists() or self.proc.poll() is not None, timeout=30,
                   message="the OIDC provider's port file")
        if self.proc.poll() is not None:
            raise RuntimeError(f"the OIDC provider exited: {self.proc.stderr.read().decode()[-2000:]}")
        self.issuer = f"http://127.0.0.1:{int(port_file.read_text())}"

    def configure(self, *, mode: str = "normal", user: dict | None = None, redirect_uri: str | None = None,
                  rotate_key: bool = False) -> None:
        body: dict = {"mode": mode, "rotate_key": rotate_key}
        if user is not None:
            body["user"] = user
        if redirect_uri is not None:
            body["redirect_uri"] = redirect_uri
        requests.post(self.issuer + "/test/config", json=body, timeout=10).raise_for_status()

    def state(self) -> dict:
        return requests.get(self.issuer + "/test/state", timeout=10).json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def provider(tmp_path_factory):
    p = Provider(tmp_path_factory.mktemp("oidc-provider"))
    yield p
    p.stop()


@pytest.fixture
def fleet(tmp_path, provider):
    oidc = OidcConfig(issuer=provider.issuer, client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
                      scopes=["openid", "profile", "groups"], roles=dict(ROLES), display_name="Test IdP")
    config = make_config(tmp_path / "server", oidc=oidc)
    server = FleetServer(config, mqtt=False, ingest=False, loops=False).start()
    provider.configure(mode="normal", redirect_uri=server.url + "/console/login/oidc/callback",
                       user={"sub": "u-alice", "preferred_username": "alice", "groups": ["fleet-ops"]})
    yield server
    server.stop()


def sign_in(server: FleetServer, next_path: str = "/console/devices") -> tuple[requests.Session, requests.Response]:
    """A browser's sign-in: the login link, the provider (auto-approving), the callback."""
    browser = requests.Session()
    page = browser.get(server.url + "/console/login", timeout=10)
    assert "Sign in with Test IdP" in page.text
    link = re.search(r'href="(/console/login/oidc[^"]*)"', page.text).group(1).replace("&amp;", "&")
    assert parse_qs(urlsplit(link).query)["next"] == ["/console/"]  # the login page's own `next`
    response = browser.get(server.url + urlsplit(link).path, params={"next": next_path}, timeout=10)
    return browser, response


def audit_rows(server: FleetServer, action: str = "login") -> list[dict]:
    return [r for r in server.svc.storage.list_audit(limit=100) if r["action"] == action]


def session_role(server: FleetServer, browser: requests.Session) -> str | None:
    sid = browser.cookies.get("ef_session")
    found = server.svc.storage.find_session(token_hash(sid), server.svc.clock()) if sid else None
    return found["role"] if found else None


def test_sign_in_through_the_provider_opens_an_operator_session(fleet, provider):
    before = provider.state()["token_requests"]
    browser, response = sign_in(fleet)
    assert response.status_code == 200, response.text
    # The browser went to the provider and came back with a code, state and the PKCE challenge sent.
    authorize = next(r for r in response.history if r.url.startswith(provider.issuer + "/authorize"))
    sent = parse_qs(urlsplit(authorize.url).query)
    assert sent["code_challenge_method"] == ["S256"] and sent["code_challenge"][0]
    assert sent["nonce"][0] and sent["state"][0] and sent["client_id"] == [CLIENT_ID]
    assert provider.state()["token_requests"] == before + 1
    assert 'content="0;url=/console/devices"' in response.text
    assert session_role(fleet, browser) == "operator"
    page = browser.get(fleet.url + "/console/devices", timeout=10, allow_redirects=False)
    assert page.status_code == 200 and "Log in" not in page.text
    row = fleet.svc.storage.get_operator("alice")
    assert row["role"] == "operator" and row["password_hash"].startswith("!oidc ")
    ok = [r for r in audit_rows(fleet) if r["outcome"] == "ok"]
    assert ok and ok[0]["actor"] == "alice" and ok[0]["detail"]["method"] == "oidc"
    assert ok[0]["detail"]["subject"] == "u-alice"
    # The pending sign-in cookie is single-use: replaying the callback URL finds nothing to finish.
    callback = response.url
    again = browser.get(callback, timeout=10)
    assert again.status_code == 400 and "sign in again" in again.text
    # The SSO operator has no password that a local login could use.
    form = requests.Session()
    login_page = form.get(fleet.url + "/console/login", timeout=10)
    token = re.search(r'name="login_token" value="([^"]+)"', login_page.text).group(1)
    refused = form.post(fleet.url + "/console/login", timeout=10, allow_redirects=False,
                        data={"login_token": token, "name": "alice", "password": "!oidc anything"})
    assert refused.status_code == 401


@pytest.mark.parametrize("groups,role", [
    (["fleet-viewers"], "viewer"),
    (["fleet-ops"], "operator"),
    (["other", "fleet-viewers", "fleet-ops"], "operator"),  # the most any value grants
])
def test_the_groups_claim_maps_to_a_role(fleet, provider, groups, role):
    provider.configure(user={"sub": "u-bob", "preferred_username": "bob", "groups": groups})
    browser, response = sign_in(fleet)
    assert response.status_code == 200, response.text
    assert session_role(fleet, browser) == role
    # A viewer's session is refused an operator's action.
    acted = browser.post(fleet.url + "/api/v1/webhooks", json={"url": "http://127.0.0.1:9/x"}, timeout=10,
                         headers={"X-CSRF-Token": fleet.svc.storage.find_session(
                             token_hash(browser.cookies["ef_session"]), fleet.svc.clock())["csrf_token"]})
    assert (acted.status_code == 403) == (role == "viewer")


def test_changed_groups_change_the_role_at_the_next_sign_in(fleet, provider):
    provider.configure(user={"sub": "u-carol", "preferred_username": "carol", "groups": ["fleet-ops"]})
    first, _ = sign_in(fleet)
    assert session_role(fleet, first) == "operator"
    provider.configure(user={"sub": "u-carol", "preferred_username": "carol", "groups": ["fleet-viewers"]})
    second, _ = sign_in(fleet)
    assert session_role(fleet, second) == "viewer"
    assert session_role(fleet, first) is None  # a changed role ends the older sessions


@pytest.mark.parametrize("mode,says", [
    ("forged", "signature is not the identity provider"),
    ("wrong_audience", "issued for another client"),
    ("expired", "has expired"),
    ("bad_nonce", "does not answer this sign-in"),
])
def test_bad_id_tokens_are_refused(fleet, provider, mode, says):
    provider.configure(mode=mode)
    browser, response = sign_in(fleet)
    assert response.status_code == 401, response.text
    assert says in response.text
    assert "ef_session" not in browser.cookies
    assert fleet.svc.storage.get_operator("alice") is None
    failed = [r for r in audit_rows(fleet) if r["outcome"] == "failed"]
    assert failed and failed[0]["detail"]["method"] == "oidc"


def test_a_user_whose_groups_grant_nothing_is_refused_with_a_clear_page(fleet, provider):
    provider.configure(user={"sub": "u-dave", "preferred_username": "dave", "groups": ["marketing"]})
    browser, response = sign_in(fleet)
    assert response.status_code == 403
    assert "none of your groups values grants a role" in response.text
    assert "Sign in with Test IdP" in response.text  # the login page, with both ways in
    assert "ef_session" not in browser.cookies
    assert fleet.svc.storage.get_operator("dave") is None
    denied = [r for r in audit_rows(fleet) if r["outcome"] == "denied"]
    assert denied and denied[0]["actor"] == "dave" and denied[0]["detail"]["claim_values"] == ["marketing"]


def test_a_callback_that_is_not_this_browsers_is_refused(fleet, provider):
    browser = requests.Session()
    leave = browser.get(fleet.url + "/console/login/oidc", timeout=10, allow_redirects=False)
    assert leave.status_code == 302 and leave.headers["Location"].startswith(provider.issuer + "/authorize")
    assert "SameSite=Lax" in leave.headers["Set-Cookie"] and "HttpOnly" in leave.headers["Set-Cookie"]
    back = browser.get(leave.headers["Location"], timeout=10, allow_redirects=False)
    callback = back.headers["Location"]
    assert callback.startswith(fleet.url + "/console/login/oidc/callback")
    # Another browser (no pending sign-in) and this browser with a changed state are both refused.
    stranger = requests.get(callback, timeout=10)
    assert stranger.status_code == 400 and "not started here" in stranger.text
    tampered = browser.get(re.sub(r"state=[^&]+", "state=forged", callback), timeout=10)
    assert tampered.status_code == 400 and "does not belong to this browser" in tampered.text
    assert "ef_session" not in browser.cookies


def test_a_local_account_of_the_same_name_is_not_taken_over(fleet, provider):
    create_operator(fleet.svc, "alice", "viewer", LOCAL_PASSWORD)
    browser, response = sign_in(fleet)
    assert response.status_code == 403 and "belongs to another account" in response.text
    assert "ef_session" not in browser.cookies
    # The local account keeps working (break-glass).
    form = requests.Session()
    page = form.get(fleet.url + "/console/login", timeout=10)
    token = re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)
    ok = form.post(fleet.url + "/console/login", timeout=10, allow_redirects=False,
                   data={"login_token": token, "name": "alice", "password": LOCAL_PASSWORD})
    assert ok.status_code == 303 and "ef_session" in form.cookies


def test_the_oidc_table_of_server_toml(tmp_path):
    data = tmp_path / "server"
    data.mkdir()
    (tmp_path / "secret").write_text("from-a-file\n")
    (data / "server.toml").write_text(
        '[oidc]\nissuer = "https://sso.example.org/realms/fleet/"\nclient_id = "edgefleet"\n'
        f'client_secret_file = "{tmp_path / "secret"}"\nrole_claim = "groups"\n'
        '[oidc.roles]\n"fleet-ops" = "operator"\n"fleet-viewers" = "viewer"\n'
    )
    config = load_config(data)
    assert config.oidc.issuer == "https://sso.example.org/realms/fleet"
    assert config.oidc.secret() == "from-a-file" and config.oidc.label == "sso.example.org"
    assert config.oidc.roles == {"fleet-ops": "operator", "fleet-viewers": "viewer"}
    assert dataclasses.replace(config).oidc == config.oidc
    with pytest.raises(ConfigError, match="the role must be one of"):
        OidcConfig(issuer="https://x", client_id="c", roles={"g": "root"})
    with pytest.raises(ConfigError, match="roles is empty"):
        OidcConfig(issuer="https://x", client_id="c")
    (data / "server.toml").write_text('[oidc]\nissuer = "https://x"\nclient_id = "c"\nrole = "groups"\n')
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['role'\] in \[oidc\]"):
        load_config(data)


def test_no_sign_in_link_without_oidc(tmp_path):
    server = FleetServer(make_config(tmp_path / "server"), mqtt=False, ingest=False, loops=False).start()
    try:
        page = requests.get(server.url + "/console/login", timeout=10)
        assert page.status_code == 200 and "Sign in with" not in page.text
        assert requests.get(server.url + "/console/login/oidc", timeout=10).status_code == 404
    finally:
        server.stop()


def test_every_oidc_key_is_documented():
    from tests.test_docs_config import section, table_keys

    documented = table_keys(section((ROOT / "docs" / "console.md").read_text(), "## Single sign-on (OpenID Connect)"))
    keys = {f.name for f in dataclasses.fields(OidcConfig)}
    assert keys == documented, f"[oidc] keys and docs/console.md's table differ: {sorted(keys ^ documented)}"


def test_provider_documents_are_cached_and_a_new_key_is_fetched(tmp_path, provider):
    offset = [0.0]
    oidc = OidcConfig(issuer=provider.issuer, client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
                      roles=dict(ROLES), display_name="Test IdP")
    server = FleetServer(make_config(tmp_path / "server", oidc=oidc), mqtt=False, ingest=False, loops=False,
                         clock=lambda: time.time() + offset[0]).start()
    try:
        provider.configure(redirect_uri=server.url + "/console/login/oidc/callback",
                           user={"sub": "u-erin", "preferred_username": "erin", "groups": ["fleet-ops"]})
        before = provider.state()
        for _ in range(3):
            _, response = sign_in(server)
            assert response.status_code == 200, response.text
        after = provider.state()
        assert after["discovery_requests"] - before["discovery_requests"] == 1
        assert after["jwks_requests"] - before["jwks_requests"] == 1
        # The provider rotates its key: a token with the new key id fetches the keys again, but at
        # most once a minute (a flood of made-up key ids cannot make the server hammer the provider).
        provider.configure(rotate_key=True)
        _, response = sign_in(server)
        assert response.status_code == 401 and provider.state()["jwks_requests"] == after["jwks_requests"]
        offset[0] = 61.0
        _, response = sign_in(server)
        assert response.status_code == 200, response.text
        assert provider.state()["jwks_requests"] == after["jwks_requests"] + 1
    finally:
        server.stop()


@pytest.mark.browser
def test_sign_in_in_chromium_keeps_the_strict_session_cookie(tmp_path, provider, browser):
    """The provider (127.0.0.1) and the console (localhost) are different sites here, as in a real
    deployment: the callback ends a redirect chain that crossed sites, and the console page after
    it must still get the new SameSite=Strict session cookie (signed in as the provider's user)."""
    from playwright.sync_api import expect

    config = make_config(tmp_path / "server")
    port = config.listen_host_port[1]
    base = f"http://localhost:{port}"
    config = dataclasses.replace(config, oidc=OidcConfig(
        issuer=provider.issuer, client_id=CLIENT_ID, client_secret=CLIENT_SECRET, roles=dict(ROLES),
        display_name="Test IdP", redirect_url=base + "/console/login/oidc/callback"))
    server = FleetServer(config, mqtt=False, ingest=False, loops=False).start()
    try:
        provider.configure(redirect_uri=base + "/console/login/oidc/callback",
                           user={"sub": "u-frank", "preferred_username": "frank", "groups": ["fleet-viewers"]})
        context = browser.new_context()
        page = context.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(base + "/console/devices")
        expect(page).to_have_url(f"{base}/console/login?next=/console/devices")
        page.get_by_role("link", name="Sign in with Test IdP").click()
        expect(page).to_have_url(re.compile(re.escape(f"{base}/console/devices") + r"(\?.*)?$"))
        expect(page.locator(".whoami .user")).to_have_text("frank")
        assert not errors, errors
        context.close()
    finally:
        server.stop()


def test_a_wrong_client_secret_is_refused_by_the_provider(tmp_path, provider):
    oidc = OidcConfig(issuer=provider.issuer, client_id=CLIENT_ID, client_secret="not-the-secret",
                      roles=dict(ROLES), display_name="Test IdP")
    server = FleetServer(make_config(tmp_path / "server", oidc=oidc), mqtt=False, ingest=False, loops=False).start()
    try:
        provider.configure(redirect_uri=server.url + "/console/login/oidc/callback")
        web, response = sign_in(server)
        assert response.status_code == 401 and "refused the code: invalid_client" in response.text
        assert "ef_session" not in web.cookies
    finally:
        server.stop()


def test_an_unreachable_provider_leaves_the_local_login(tmp_path):
    from tests.brokers import free_port

    oidc = OidcConfig(issuer=f"http://127.0.0.1:{free_port()}", client_id=CLIENT_ID, roles=dict(ROLES))
    server = FleetServer(make_config(tmp_path / "server", oidc=oidc), mqtt=False, ingest=False, loops=False).start()
    try:
        create_operator(server.svc, "root-op", "operator", LOCAL_PASSWORD)
        web = requests.Session()
        response = web.get(server.url + "/console/login/oidc", timeout=30)
        assert response.status_code == 502 and "identity provider cannot be reached" in response.text
        token = re.search(r'name="login_token" value="([^"]+)"', response.text).group(1)
        ok = web.post(server.url + "/console/login", timeout=10, allow_redirects=False,
                      data={"login_token": token, "name": "root-op", "password": LOCAL_PASSWORD})
        assert ok.status_code == 303 and "ef_session" in web.cookies  # break-glass
    finally:
        server.stop()
