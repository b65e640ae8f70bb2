"""Leadership, node heartbeats, readiness and the cluster API, in process on a real database.

Leadership on PostgreSQL is a session-level advisory lock on a dedicated connection: the tests end
that session from the database side (as a dead process or host would) and watch the other node
take over; the single SQLite node always leads.
"""

from __future__ import annotations

import time

import pytest
import requests

from edge_agent.protocol import DesiredState
from fleet_server.cluster import Node, cluster_view
from fleet_server.leadership import AdvisoryLockLeadership, FencedPublisher, NotLeading, SoleLeader
from fleet_server.service import Loop, ingest_config, make_leadership
from tests.postgres import PostgresCluster
from tests.postgres_fixtures import every_backend  # noqa: F401 - every backend
from tests.server_fixtures import *  # noqa: F403
from tests.server_fixtures import make_config, wait_until


def terminate_leader_sessions(pg_url: str) -> int:
    """End every `edgefleet-leader` session of the database, as the server ends a dead client's."""
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'edgefleet-leader' AND datname = current_database() "
            "AND pid IN (SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted)"
        ).fetchall()
    return len(rows)


@pytest.mark.broker
def test_the_cluster_api_lists_this_node_as_leader_and_it_is_ready(fleet, backend):
    body = fleet.api("GET", "/api/v1/cluster", role="viewer").json()
    assert body["leader"] is True
    [node] = body["nodes"]
    assert node["node_id"] == body["node"] and node["role"] == "leader" and not node["gone"]
    assert node["version"] and node["pid"] > 0
    ready = requests.get(fleet.url + "/api/v1/ready", timeout=5)
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert fleet.api("GET", "/api/v1/cluster", role="").status_code == 401
    overview = fleet.api("GET", "/console/api/overview", role="viewer").json()
    assert [n["node_id"] for n in overview["cluster"]] == [node["node_id"]]
    if backend == "postgres":  # nodes on one database never share an MQTT client id
        assert fleet.server.config.worker_id == node["node_id"]
        assert fleet.server.ingest.client._client_id.decode() == f"ef-ingest-{node['node_id']}"


def test_a_node_that_stops_heartbeating_is_shown_as_gone(tmp_path):
    from fleet_server.service import bootstrap

    svc = bootstrap(make_config(tmp_path / "server"))
    try:
        live = Node(svc.storage, SoleLeader(), "live", "http://127.0.0.1:1", 0.5)
        live.beat()
        dead = Node(svc.storage, SoleLeader(), "dead", "http://127.0.0.1:2", 0.5)
        dead.beat()
        later = time.time() + 10  # ten seconds on: neither beat since, three intervals are 1.5 s
        live.beat()
        view = {n["node_id"]: n for n in cluster_view(svc.storage, now=time.time())}
        assert view["live"]["role"] == "leader" and view["dead"]["role"] == "leader"
        view = {n["node_id"]: n for n in cluster_view(svc.storage, now=later)}
        assert view["dead"]["gone"] and view["dead"]["role"] == "gone"
    finally:
        svc.close()


def test_sqlite_keeps_the_ingest_session_and_one_leader(tmp_path):
    config = make_config(tmp_path / "server")
    assert isinstance(make_leadership(config), SoleLeader)
    assert ingest_config(config).session_expiry_s == config.session_expiry_s


def test_on_postgresql_the_ingest_session_is_short(tmp_path, pg_url):
    config = make_config(tmp_path / "server", storage_url=pg_url)
    assert ingest_config(config).session_expiry_s == 30
    assert ingest_config(make_config(tmp_path / "s2", storage_url=pg_url, session_expiry_s=5)).session_expiry_s == 5
    assert isinstance(make_leadership(config), AdvisoryLockLeadership)


def test_one_leader_of_three_and_a_takeover_when_its_session_dies(pg_url):
    nodes = [AdvisoryLockLeadership(pg_url, check_s=0.05, name=f"n{i}") for i in range(3)]
    try:
        for node in nodes:
            node.start()
        wait_until(lambda: sum(n.is_leader() for n in nodes) == 1, 5, message="one leader")
        leader = next(n for n in nodes if n.is_leader())
        for _ in range(20):  # it stays one: the others only ever try the lock
            assert sum(n.is_leader() for n in nodes) == 1
            for n in nodes:
                n.check()
        assert terminate_leader_sessions(pg_url) == 1
        wait_until(lambda: not leader.is_leader(), 5, message="the old leader notices")
        wait_until(lambda: sum(n.is_leader() for n in nodes) == 1, 5, message="a new leader")
        new = next(n for n in nodes if n.is_leader())
        assert new.terms == 1
        assert new is not leader or leader.terms == 2  # the old one may win again, in a new session
    finally:
        for node in nodes:
            node.stop()


class Recorder:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def publish_desired(self, device_id, desired) -> bool:
        self.sent.append(device_id)
        return True


def test_a_pass_that_outlives_its_leadership_publishes_nothing_more(pg_url):
    lead = AdvisoryLockLeadership(pg_url, check_s=3600, name="a")  # checks only when asked
    inner = Recorder()
    publisher = FencedPublisher(inner, lead)
    desired = DesiredState(model="m", version="1.0.0", mode="live", url="http://x", sha256="0" * 64, size=1)
    try:
        lead.check()
        assert lead.is_leader()

        def one_pass() -> None:
            publisher.publish_desired("dev-1", desired)
            terminate_leader_sessions(pg_url)
            lead.check()  # the node's check fails: it stops leading at once
            publisher.publish_desired("dev-2", desired)

        loop = Loop("rollouts", 3600, one_pass, leadership=lead)
        with pytest.raises(NotLeading):
            loop.run_once()
        assert inner.sent == ["dev-1"]
        # An operator's request (outside a pass) still publishes on a follower.
        assert publisher.publish_desired("dev-3", desired) and inner.sent == ["dev-1", "dev-3"]
        assert loop.run_once() is False  # a follower's pass does not run
    finally:
        lead.stop()


@pytest.fixture
def own_cluster():
    """A PostgreSQL cluster this test may stop (the session's is shared by every test)."""
    cluster = PostgresCluster().start()
    yield cluster
    cluster.destroy()


@pytest.mark.broker
def test_database_down_means_not_ready_and_503_naming_the_database_then_back(request, tmp_path, own_cluster):
    from fleet_server.service import FleetServer

    url = own_cluster.create_database("fleet")
    server = FleetServer(make_config(tmp_path / "server", storage_url=url, rollout_interval_s=0.2)).start()
    try:
        handle = ServerHandle(server)  # noqa: F405
        token_check = handle.api("GET", "/api/v1/devices", role="viewer")
        assert token_check.status_code == 200
        own_cluster.stop()
        wait_until(lambda: requests.get(server.url + "/api/v1/ready", timeout=5).status_code == 503, 10,
                   message="not ready")
        body = requests.get(server.url + "/api/v1/ready", timeout=5).json()
        assert "PostgreSQL database" in body["error"] and "/fleet" in body["error"]
        assert "edgefleet-test" not in body["error"]  # the password is never shown
        down = handle.api("GET", "/api/v1/devices", role="viewer")
        assert down.status_code == 503 and "PostgreSQL database" in down.json()["error"]
        assert requests.get(server.url + "/api/v1/health", timeout=5).status_code == 200  # alive
        assert not server.svc.leadership.is_leader()
        own_cluster.restart()
        wait_until(lambda: requests.get(server.url + "/api/v1/ready", timeout=5).status_code == 200, 15,
                   message="ready again")
        wait_until(lambda: handle.api("GET", "/api/v1/devices", role="viewer").status_code == 200, 15,
                   message="API answers again")
        wait_until(server.svc.leadership.is_leader, 10, message="leads again")
    finally:
        server.stop()
