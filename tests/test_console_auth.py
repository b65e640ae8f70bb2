"""Console security without a browser: accounts, login rate limiting, cookie flags, CSRF on every
cookie-authorized change (Bearer calls exempt), roles, audit rows, headers, paging at 10,000."""

from __future__ import annotations

import gzip
import re
import time

import pytest
from click.testing import CliRunner

from fleet_server.app import create_app
from fleet_server.auth import SESSION_COOKIE, new_token, token_hash
from fleet_server.cli import server
from fleet_server.console import CSP
from fleet_server.console.accounts import AccountError, create_operator
from fleet_server.login_limiter import MAX_FAILURES_PER_NAME
from fleet_server.service import bootstrap
from tests.postgres_fixtures import db_execute_many, every_backend, server_storage_url  # noqa: F401 - every backend
from tests.server_fixtures import make_config

PASSWORD = "a-long-enough-password"


@pytest.fixture
def svc(request, tmp_path, backend):
    services = bootstrap(make_config(tmp_path / "server", storage_url=server_storage_url(request, backend)))
    create_operator(services, "olga", "operator", PASSWORD)
    create_operator(services, "vera", "viewer", PASSWORD)
    yield services
    services.close()


@pytest.fixture
def app(svc):
    return create_app(svc.config, services=svc)


def login(client, name: str, password: str = PASSWORD, next_: str = "/console/"):
    page = client.get("/console/login")
    token = re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)
    return client.post("/console/login", data={"name": name, "password": password, "login_token": token, "next": next_})


def csrf(client) -> str:
    return re.search(r'name="csrf-token" content="([^"]+)"', client.get("/console/").text).group(1)


def test_pages_need_a_login_and_the_login_sets_a_strict_httponly_cookie(app):
    client = app.test_client()
    response = client.get("/console/devices")
    assert response.status_code == 302 and "/console/login?next=/console/devices" in response.headers["Location"]
    assert client.get("/console/api/overview").status_code == 401
    response = login(client, "olga", next_="/console/drift")
    assert response.status_code == 303 and response.headers["Location"] == "/console/drift"
    cookie = next(c for c in response.headers.getlist("Set-Cookie") if c.startswith(SESSION_COOKIE))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie
    for path in ("/console/", "/console/devices", "/console/devices/x", "/console/models", "/console/drift",
                 "/console/rollouts", "/console/rollouts/new", "/console/rollouts/r-1", "/console/audit"):
        assert client.get(path).status_code == 200, path


def test_cookie_is_secure_over_tls(app):
    client = app.test_client()
    page = client.get("/console/login", base_url="https://console.local")
    token = re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)
    response = client.post("/console/login", base_url="https://console.local",
                           data={"name": "olga", "password": PASSWORD, "login_token": token})
    cookie = next(c for c in response.headers.getlist("Set-Cookie") if c.startswith(SESSION_COOKIE))
    assert "Secure" in cookie


def test_wrong_passwords_are_rate_limited_and_audited(app, svc):
    client = app.test_client()
    for _ in range(MAX_FAILURES_PER_NAME):
        assert login(client, "olga", "wrong password!").status_code == 401
    limited = login(client, "olga")  # even the right password waits now
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) > 0
    outcomes = [a["outcome"] for a in svc.storage.list_audit(limit=10) if a["action"] == "login"]
    assert outcomes[:2] == ["denied", "failed"]
    assert login(client, "nobody", "whatever-it-is").status_code == 401


def test_open_redirects_and_forged_login_forms_are_refused(app):
    client = app.test_client()
    assert login(client, "olga", next_="https://evil.example/").headers["Location"] == "/console/"
    other = app.test_client()
    response = other.post("/console/login", data={"name": "olga", "password": PASSWORD, "login_token": "guess"})
    assert response.status_code == 400 and SESSION_COOKIE not in str(response.headers.getlist("Set-Cookie"))


def test_session_changes_need_the_csrf_token_and_bearer_calls_do_not(app, svc):
    client = app.test_client()
    login(client, "olga")
    assert client.post("/api/v1/alerts/1/ack").status_code == 403
    assert client.post("/api/v1/alerts/1/ack", headers={"X-CSRF-Token": "forged"}).status_code == 403
    assert client.post("/api/v1/alerts/1/ack", headers={"X-CSRF-Token": csrf(client)}).status_code == 404
    token = new_token()
    svc.storage.insert_token("ci", "operator", token_hash(token), time.time())
    bearer = app.test_client().post("/api/v1/alerts/1/ack", headers={"Authorization": f"Bearer {token}"})
    assert bearer.status_code == 404  # authorized (no alert 1), no CSRF token needed
    rows = svc.storage.list_audit(limit=10)
    assert [r["outcome"] for r in rows if r["action"] == "alerts.acknowledge"][:4] == ["failed", "failed", "denied", "denied"]


def test_a_viewer_is_refused_actions_and_sees_no_buttons(app, svc):
    client = app.test_client()
    login(client, "vera")
    token = csrf(client)
    assert client.post("/api/v1/alerts/1/ack", headers={"X-CSRF-Token": token}).status_code == 403
    assert client.get("/console/rollouts/new").status_code == 403
    assert 'id="actions"' not in client.get("/console/rollouts/r-1").text
    assert 'id="new-rollout"' not in client.get("/console/rollouts").text
    denied = [a for a in svc.storage.list_audit(limit=10) if a["actor"] == "vera" and a["outcome"] == "denied"]
    assert {a["action"] for a in denied} == {"alerts.acknowledge", "console_rollouts.new"}


def test_logout_ends_the_session_server_side(app):
    client = app.test_client()
    login(client, "olga")
    sid = client.get_cookie(SESSION_COOKIE).value
    assert client.post("/console/logout", data={"csrf_token": csrf(client)}).status_code == 303
    replay = app.test_client()
    replay.set_cookie(SESSION_COOKIE, sid)
    assert replay.get("/console/api/overview").status_code == 401


def test_security_headers_and_gzip_static_files(app):
    client = app.test_client()
    login(client, "olga")
    for path in ("/console/", "/console/login", "/api/v1/health"):
        headers = client.get(path).headers
        assert headers["Content-Security-Policy"] == CSP
        assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP and "frame-ancestors 'none'" in CSP
        assert headers["X-Content-Type-Options"] == "nosniff" and headers["X-Frame-Options"] == "DENY"
        assert headers["Referrer-Policy"] == "same-origin"
    page = client.get("/console/drift").text
    # No inline scripts or event handler attributes: CSP script-src 'self' would block them.
    assert not re.search(r"<script(?![^>]*\bsrc=)", page) and not re.search(r"\son[a-z]+\s*=", page)
    response = client.get("/console/static/vendor/chart.umd.min.js", headers={"Accept-Encoding": "gzip"})
    assert response.headers["Content-Encoding"] == "gzip" and len(response.data) < 90_000
    assert gzip.decompress(response.data).startswith(b"/*")
    again = client.get("/console/static/vendor/chart.umd.min.js", headers={"Accept-Encoding": "gzip",
                                                                            "If-None-Match": response.headers["ETag"]})
    assert again.status_code == 304
    assert client.get("/console/static/../app.py").status_code == 404


def test_device_list_pages_10000_devices_on_the_server(app, svc):
    db_execute_many(
        svc.storage,
        "INSERT INTO devices(id, fleet, created_at, password_hash, broker_hash, status, active_version, last_seen) "
        "VALUES (?,?,?,?,?,?,?,?)",
        [(f"dev-{i:05d}", "default", 0.0, "x", "x", "online" if i % 3 else "offline", f"1.{i % 4}.0", time.time())
         for i in range(10_000)],
    )
    db_execute_many(svc.storage, "INSERT INTO device_tags(device, key, value) VALUES (?,?,?)",
                    [(f"dev-{i:05d}", "site", "berlin" if i % 2 else "paris") for i in range(10_000)])
    client = app.test_client()
    login(client, "olga")
    started = time.perf_counter()
    page = client.get("/console/api/devices?q=dev-0&tag=site=berlin&version=1.1.0&state=online&page=2&per_page=50").json
    elapsed = time.perf_counter() - started
    assert page["total"] == len([i for i in range(10_000) if i % 2 and i % 4 == 1 and i % 3 and i < 10_000])
    assert len(page["devices"]) == 50 and page["devices"][0]["tags"] == {"site": "berlin"}
    assert elapsed < 0.5, f"one page took {elapsed:.3f} s"
    assert client.get("/console/api/devices?per_page=7").status_code == 400
    overview = client.get("/console/api/overview").json
    assert overview["devices"]["total"] == 10_000 and len(overview["versions"]) == 4


def test_create_operator_cli_prompts_and_validates(tmp_path):
    runner = CliRunner()
    data_dir = str(tmp_path / "d")
    result = runner.invoke(server, ["create-operator", "--data-dir", data_dir, "ops", "--role", "operator"],
                           input=f"{PASSWORD}\n{PASSWORD}\n")
    assert result.exit_code == 0 and "operator ops (operator) created" in result.output
    result = runner.invoke(server, ["create-operator", "--data-dir", data_dir, "ops", "--password", PASSWORD])
    assert result.exit_code != 0 and "already exists" in result.output
    result = runner.invoke(server, ["create-operator", "--data-dir", data_dir, "ops", "--password", "short"])
    assert result.exit_code != 0 and "at least 10 characters" in result.output
    result = runner.invoke(server, ["create-operator", "--data-dir", data_dir, "ops", "--role", "viewer",
                                    "--password", PASSWORD + "!", "--update"])
    assert result.exit_code == 0 and "(viewer) updated" in result.output


def test_operator_names_and_roles_are_validated(svc):
    with pytest.raises(AccountError, match="role 'admin'"):
        create_operator(svc, "x1", "admin", PASSWORD)
    with pytest.raises(AccountError, match="not valid"):
        create_operator(svc, "../x", "viewer", PASSWORD)
