"""Two server nodes on one PostgreSQL database: what one node stores, the other serves.

Each node is a bootstrap with its own data dir (its own disk) and the same storage_url; the HTTP
side is each node's Flask app. No broker is needed for these.
"""

from __future__ import annotations

import hashlib
import re

import pytest

from fleet_server.app import create_app
from fleet_server.auth import SESSION_COOKIE, new_token, token_hash
from fleet_server.console.accounts import create_operator
from fleet_server.registry import bundle_file, trust_key, upload_bundle
from fleet_server.service import bootstrap
from tests.agent_fixtures import bundle_bytes, public_pem
from tests.server_fixtures import make_config

PASSWORD = "a-long-enough-password"


@pytest.fixture
def nodes(tmp_path, pg_url):
    """Two nodes: separate data dirs, one database."""
    built = [bootstrap(make_config(tmp_path / f"node-{n}", storage_url=pg_url)) for n in "ab"]
    yield built
    for svc in built:
        svc.storage.close()


def test_a_bundle_uploaded_on_one_node_downloads_from_the_other_with_range(nodes):
    a, b = nodes
    trust_key(a, public_pem("trusted"))
    data = bundle_bytes("lr", "1.0.0")
    summary = upload_bundle(a, data)
    name, version = summary["name"], summary["version"]
    path, row = bundle_file(b, name, version)  # b's disk never saw it: fetched from the database
    assert path.is_relative_to(b.config.data_dir) and path.read_bytes() == data
    assert row["sha256"] == hashlib.sha256(data).hexdigest()
    token = new_token()
    a.storage.insert_token("ci", "viewer", token_hash(token), 0.0)  # a token made on node a
    client = create_app(b.config, services=b).test_client()
    headers = {"Authorization": f"Bearer {token}", "Range": "bytes=10-19"}
    response = client.get(f"/api/v1/models/{name}/{version}/bundle", headers=headers)
    assert response.status_code == 206 and response.data == data[10:20]


def test_a_console_session_from_one_node_works_on_the_other(nodes):
    a, b = nodes
    create_operator(a, "olga", "operator", PASSWORD)
    app_a, app_b = (create_app(svc.config, services=svc) for svc in nodes)
    on_a = app_a.test_client()
    page = on_a.get("/console/login")
    login_token = re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)
    response = on_a.post("/console/login", data={"name": "olga", "password": PASSWORD, "login_token": login_token,
                                                 "next": "/console/"})
    assert response.status_code == 303
    on_b = app_b.test_client()
    assert on_b.get("/console/api/overview").status_code == 401
    on_b.set_cookie(SESSION_COOKIE, on_a.get_cookie(SESSION_COOKIE).value)
    assert on_b.get("/console/api/overview").status_code == 200
    # Logging out on b ends the session on a too: it is one row in the shared database.
    csrf = b.storage.find_session(hashlib.sha256(on_a.get_cookie(SESSION_COOKIE).value.encode()).hexdigest(),
                                  a.clock())
    assert csrf is not None
    assert on_b.post("/console/logout", data={"csrf_token": csrf["csrf_token"]}).status_code == 303
    assert on_a.get("/console/api/overview").status_code == 401
