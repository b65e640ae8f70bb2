"""Open redirect at login: `next=` is followed only to a console path on this server, however it
is encoded (percent-encoding once or twice, backslashes that browsers read as slashes, tabs and
newlines that the URL parser drops, schemes without slashes)."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest

from fleet_server.app import create_app
from fleet_server.console.accounts import create_operator
from tests.server_fixtures import make_config

PASSWORD = "a-long-enough-password"
OVERVIEW = "/console/"

HOSTILE = [
    "https://evil.example/",
    "//evil.example/",
    "///evil.example/",
    "/\\evil.example/",
    "\\\\evil.example/",
    "/%5Cevil.example/",
    "/%5cevil.example/",
    "%2F%2Fevil.example/",
    "/%2F/evil.example/",
    "/%255Cevil.example/",  # encoded twice
    "/%25255Cevil.example/",  # encoded three times
    "https:evil.example",
    "http:/evil.example",
    "javascript:alert(1)",
    "JaVaScRiPt:alert(1)",
    "data:text/html,<script>alert(1)</script>",
    "/\t/evil.example/",
    "/\n/evil.example/",
    "/\r\n/evil.example/",
    "/%09/evil.example/",
    "/%0d%0a/evil.example/",
    " //evil.example/",
    "\x00//evil.example/",
    "/%00/evil.example/",
    "evil.example",
    "@evil.example",
    "/api/v1/devices",  # same origin, but not a console page: no JSON after a login
    "/console" + "/x" * 2000,  # too long to be a real page
]
KEPT = ["/console/", "/console/devices", "/console/drift?scope=tag:site%3Dberlin", "/console/rollouts/r-1"]


@pytest.fixture
def app(tmp_path):
    from fleet_server.service import bootstrap

    svc = bootstrap(make_config(tmp_path / "server"))
    create_operator(svc, "olga", "operator", PASSWORD)
    yield create_app(svc.config, services=svc)
    svc.close()


def _login(client, next_: str):
    page = client.get("/console/login")
    token = re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)
    return client.post("/console/login",
                       data={"name": "olga", "password": PASSWORD, "login_token": token, "next": next_})


def _same_console(location: str) -> bool:
    parts = urlsplit(location.replace("\\", "/"))
    return not parts.scheme and not parts.netloc and location.startswith("/console")


@pytest.mark.parametrize("target", HOSTILE)
def test_hostile_next_goes_to_the_overview(app, target):
    client = app.test_client()
    response = _login(client, target)
    assert response.status_code == 303
    assert response.headers["Location"] == OVERVIEW, (target, response.headers["Location"])
    # Logged in, the login page redirects at once: the same rule applies.
    again = client.get("/console/login", query_string={"next": target})
    assert again.status_code == 302 and again.headers["Location"] == OVERVIEW
    # The form never carries the hostile value on to the next POST.
    form = app.test_client().get("/console/login", query_string={"next": target})
    kept = re.search(r'name="next" value="([^"]*)"', form.text).group(1)
    assert kept == OVERVIEW


@pytest.mark.parametrize("target", KEPT)
def test_console_paths_are_followed(app, target):
    response = _login(app.test_client(), target)
    assert response.headers["Location"] == target
    assert _same_console(response.headers["Location"])


def test_a_page_that_needs_a_login_comes_back_after_it(app):
    client = app.test_client()
    first = client.get("/console/rollouts")
    assert first.status_code == 302
    next_ = dict(p.split("=", 1) for p in urlsplit(first.headers["Location"]).query.split("&"))["next"]
    assert _login(client, next_).headers["Location"] == "/console/rollouts"
