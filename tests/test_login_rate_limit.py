"""Login rate limiting is shared by every server process and survives a restart: the failures
are rows in the database, not counters in one process. Two servers on one data dir, over real
HTTP, take turns being guessed at; a restart does not reset the count; an operator sees who is
locked out in the console, a viewer does not."""

from __future__ import annotations

import re

import pytest
import requests

from fleet_server.console.accounts import create_operator
from fleet_server.login_limiter import (
    FAILURE_WINDOW_S,
    MAX_FAILURES_PER_ADDRESS,
    MAX_FAILURES_PER_NAME,
)
from tests.server_fixtures import make_config

PASSWORD = "a-long-enough-password"


def _server(data_dir, clock):
    from fleet_server.service import FleetServer

    return FleetServer(make_config(data_dir), mqtt=False, ingest=False, loops=False, clock=clock).start()


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def servers(tmp_path):
    clock = Clock()
    first = _server(tmp_path / "server", clock)
    create_operator(first.svc, "olga", "operator", PASSWORD)
    create_operator(first.svc, "vera", "viewer", PASSWORD)
    second = _server(tmp_path / "server", clock)  # another process's view: its own storage connection
    yield first, second, clock
    second.stop()
    first.stop()


def login(base: str, name: str, password: str) -> requests.Response:
    s = requests.Session()
    page = s.get(f"{base}/console/login", timeout=10)
    token = re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)
    r = s.post(f"{base}/console/login", data={"name": name, "password": password, "login_token": token},
               allow_redirects=False, timeout=10)
    r.session = s  # type: ignore[attr-defined]
    return r


def test_failures_count_across_server_processes_and_restarts(servers, tmp_path):
    first, second, clock = servers
    for i in range(MAX_FAILURES_PER_NAME):  # alternate between the two servers
        server = (first, second)[i % 2]
        assert login(server.url, "olga", f"wrong password {i}").status_code == 401
    for server in (first, second):
        limited = login(server.url, "olga", PASSWORD)  # even the right password waits now
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) > 0
    # A restart does not reset it.
    second.stop()
    restarted = _server(tmp_path / "server", clock)
    try:
        assert login(restarted.url, "olga", PASSWORD).status_code == 429
        clock.now += FAILURE_WINDOW_S + 1  # the window passes
        ok = login(restarted.url, "olga", PASSWORD)
        assert ok.status_code == 303
        # A success clears the name's failures for every process.
        assert first.svc.storage.login_failures(["n:olga"], 0.0) == {"n:olga": []}
    finally:
        restarted.stop()


def test_an_address_is_limited_across_names(servers):
    first, second, clock = servers
    for i in range(MAX_FAILURES_PER_ADDRESS):
        server = (first, second)[i % 2]
        assert login(server.url, f"guess-{i % 4}", "wrong password!").status_code in (401, 429)
    # The address is locked now, also for a name it never tried and the right password.
    assert login(second.url, "vera", PASSWORD).status_code == 429


def test_operators_see_locked_logins_and_viewers_do_not(servers):
    first, second, clock = servers
    for _ in range(MAX_FAILURES_PER_NAME):
        login(second.url, "mallory", "wrong password!")
    assert login(first.url, "vera", PASSWORD).status_code == 303  # not locked: another name
    olga = login(first.url, "olga", PASSWORD).session  # type: ignore[attr-defined]
    locked = olga.get(f"{first.url}/console/api/locked-logins", timeout=10).json()["locked"]
    assert [(x["kind"], x["value"], x["failures"]) for x in locked] == [("operator", "mallory", MAX_FAILURES_PER_NAME)]
    assert locked[0]["until"] == locked[0]["last_at"] + FAILURE_WINDOW_S  # the clock stood still meanwhile
    page = olga.get(f"{first.url}/console/audit", timeout=10).text
    assert 'id="locked-table"' in page
    vera = login(second.url, "vera", PASSWORD).session  # type: ignore[attr-defined]
    assert vera.get(f"{second.url}/console/api/locked-logins", timeout=10).status_code == 403
    assert 'id="locked-table"' not in vera.get(f"{second.url}/console/audit", timeout=10).text
