"""Several `edgefleet server run` processes (subprocesses) on one PostgreSQL database and one broker:
one leader at a time, takeover after kill -9 mid-rollout, shared logins, ingest that loses nothing
when a node dies or the database restarts.

Node 1 manages Mosquitto; nodes 2 and 3 use it as an external broker (`--mqtt-url`). Every node
has a data dir of its own holding the same secrets (the server's MQTT password and desired-state
key), as an operator gives them to each node; `public_url` is one node's URL for all of them, as
a load balancer's would be. An `admin` bootstrap in the test process provisions devices and
uploads models through the same database.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import requests
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.protocol import parse_topic, subscription
from firmware_sim.clock import SimClock
from firmware_sim.fleet import SimFleet
from firmware_sim.provision import ServicesProvisioner
from firmware_sim.scenario import parse_scenario
from fleet_server.auth import new_token, token_hash
from fleet_server.config import SERVER_USERNAME, load_config
from fleet_server.console.accounts import create_operator
from fleet_server.desired_signing import DesiredSigner
from fleet_server.devices import loss_summary
from fleet_server.registry import trust_key, upload_bundle
from fleet_server.rollout_model import GATE_DEFAULTS
from fleet_server.service import bootstrap
from tests.brokers import free_port, wait_until
from tests.postgres import PostgresCluster
from tests.postgres_fixtures import db_rows
from tests.server_fixtures import DeviceClient

ROOT = Path(__file__).resolve().parent.parent

# Short loops so that the tests run in seconds; the ingest session of a node outlives it by
# session_expiry_s, after which devices resend what no one acknowledged (resend_after_s). Device
# accounts reach node 1's broker through its password file (one broker-sync loop, on node 1).
NODE_TOML = """\
storage_url = "{storage_url}"
public_url = "{public_url}"
bucket_s = 1.0
bucket_grace_s = 0.5
alert_interval_s = 0.5
rollout_interval_s = 0.5
broker_sync_interval_s = 0.3
stats_interval_s = 0.25
ack_interval_s = 0.2
session_expiry_s = 2
min_predictions = 100000
broker_accounts = "password_file"
"""


@dataclass
class NodeProc:
    name: str
    data_dir: Path
    port: int
    args: list[str]
    proc: subprocess.Popen | None = None
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> NodeProc:
        self.log = self.data_dir.parent / f"{self.name}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from edge_agent.entry import main; main()", "server", "run",
             "--data-dir", str(self.data_dir), "--listen", f"127.0.0.1:{self.port}", *self.args],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"),  # noqa: SIM115
        )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            pytest.fail(f"{self.name} exited: {self.log.read_text()[-3000:] if self.log else ''}")
        try:
            return requests.get(self.url + "/api/v1/ready", timeout=1).ok
        except requests.RequestException:
            return False

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Cluster:
    """Three nodes, their database, broker port and an admin view of the database."""

    root: Path
    storage_url: str
    broker_port: int
    nodes: list[NodeProc]
    admin: Any
    tokens: dict[str, str] = field(default_factory=dict)

    def token(self, role: str = "operator") -> str:
        if role not in self.tokens:
            t = new_token()
            self.admin.storage.insert_token(f"test-{role}", role, token_hash(t), 0.0)
            self.tokens[role] = t
        return self.tokens[role]

    def api(self, node: NodeProc, method: str, path: str, role: str = "operator", **kw: Any) -> requests.Response:
        headers = kw.pop("headers", {})
        if role:
            headers["Authorization"] = f"Bearer {self.token(role)}"
        return requests.request(method, node.url + path, headers=headers, timeout=10, **kw)

    def view(self) -> list[dict[str, Any]]:
        """The cluster as any live node reports it."""
        for node in self.nodes:
            if node.alive():
                try:
                    return self.api(node, "GET", "/api/v1/cluster", role="viewer").json()["nodes"]
                except (requests.RequestException, ValueError):
                    continue
        return []

    def leader(self) -> NodeProc | None:
        """The live node that says it leads (its own view, not a heartbeat row)."""
        found = []
        for node in self.nodes:
            if not node.alive():
                continue
            try:
                if self.api(node, "GET", "/api/v1/ready", role="").json().get("leader"):
                    found.append(node)
            except (requests.RequestException, ValueError):
                continue
        assert len(found) <= 1, f"two nodes lead at once: {[n.name for n in found]}"
        return found[0] if found else None

    def cli(self, node: NodeProc, *args: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "EDGEFLEET_STORAGE_URL"}
        return subprocess.run([sys.executable, "-c", "from edge_agent.entry import main; main()", "server", *args,
                               "--data-dir", str(node.data_dir)], cwd=ROOT, capture_output=True, text=True,
                              timeout=60, env=env)

    def log_tails(self) -> str:
        """Warnings and errors the nodes logged, for a failure message."""
        out = []
        for node in self.nodes:
            lines = node.log.read_text(errors="replace").splitlines() if node.log and node.log.exists() else []
            out += [f"{node.name}: {line}" for line in lines if " WARNING " in line or " ERROR " in line
                    or "Error" in line][-15:]
        return "\n".join(out)

    def broker_pid(self) -> int | None:
        path = self.nodes[0].data_dir / "broker" / "mosquitto.pid"
        try:
            return int(path.read_text())
        except (OSError, ValueError):
            return None


@pytest.fixture
def own_pg():
    """A PostgreSQL cluster of this test's own: tests here stop and restart it."""
    cluster = PostgresCluster().start()
    yield cluster
    cluster.destroy()


@pytest.fixture
def cluster3(tmp_path, own_pg):
    storage_url = own_pg.create_database("fleet")
    broker_port = free_port()
    ports = [free_port() for _ in range(3)]
    public_url = f"http://127.0.0.1:{ports[2]}"  # what a load balancer would be
    # One set of secrets for every node.
    admin_dir = tmp_path / "admin"
    admin_dir.mkdir()
    (admin_dir / "server.toml").write_text(NODE_TOML.format(storage_url=storage_url, public_url=public_url))
    admin = bootstrap(load_config(admin_dir, broker_port=broker_port))
    admin.config.server_mqtt_password()
    DesiredSigner.for_secrets_dir(admin.config.secrets_dir)
    nodes = []
    for i, port in enumerate(ports, 1):
        data_dir = tmp_path / f"node{i}"
        data_dir.mkdir()
        shutil.copytree(admin.config.secrets_dir, data_dir / "secrets")
        (data_dir / "server.toml").write_text(NODE_TOML.format(storage_url=storage_url, public_url=public_url))
        args = ["--broker-port", str(broker_port)] if i == 1 else ["--mqtt-url", f"mqtt://127.0.0.1:{broker_port}"]
        nodes.append(NodeProc(f"node{i}", data_dir, port, args))
    cluster = Cluster(tmp_path, storage_url, broker_port, nodes, admin)
    try:
        nodes[0].start()
        wait_until(nodes[0].up, 30, interval=0.1, message="node 1 up")
        for node in nodes[1:]:
            node.start()
        for node in nodes[1:]:
            wait_until(node.up, 30, interval=0.1, message=f"{node.name} up")
        yield cluster
    finally:
        broker_pid = cluster.broker_pid()
        for node in nodes:
            node.stop()
        if broker_pid is not None and Path(f"/proc/{broker_pid}").exists():  # node 1 was killed: its broker
            os.kill(broker_pid, signal.SIGTERM)
        admin.close()


def console_login(node: NodeProc, name: str, password: str) -> requests.Session:
    session = requests.Session()
    page = session.get(node.url + "/console/login", timeout=10)
    login_token = re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)
    response = session.post(node.url + "/console/login", data={"name": name, "password": password,
                            "login_token": login_token, "next": "/console/"}, allow_redirects=False, timeout=10)
    assert response.status_code == 303, response.text[:500]
    return session


# ------------------------------------------------------------------ the tests

pytestmark = [pytest.mark.broker, pytest.mark.slow]

DEVICES = 50
# Only the gates that count devices: model-quality gates need minutes of traffic.
OFF_GATES = {g: {"enabled": False} for g in GATE_DEFAULTS if g not in ("update_failure_rate", "timeout_share")}


def quick_agents(config) -> None:
    """Agents that judge an update in a second (not on latency) and resend what no one
    acknowledged after 3 s."""
    config.update.probation_s = 1.0
    config.update.probation_predictions = 5
    # Failover is under test, not latency: five predictions on a loaded 2-core machine (three
    # servers, PostgreSQL, the broker, 50 devices) took a 7.6 ms median and rolled a device back.
    config.update.probation_latency_floor_ms = 1000.0
    config.outbox.resend_after_s = 3.0


def sim_fleet(cluster: Cluster, version: str = "1.0.0") -> SimFleet:
    from cryptography.hazmat.primitives import serialization

    from tests.sim_fixtures import _signer, trained

    pem = _signer()[1].public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    trust_key(cluster.admin, pem)
    v1 = trained(version)
    upload_bundle(cluster.admin, v1.bundle_bytes)
    scenario = parse_scenario({"rate_per_s": 4.0, "window_s": 0.5}, "multinode")
    fleet = SimFleet(scenario, devices=DEVICES, provisioner=ServicesProvisioner(cluster.admin),
                     workdir=cluster.root / "sim", clock=SimClock(speed=1.0), agent_overrides=quick_agents)
    fleet.provision().preinstall(v1.bundle_bytes)
    # Node 1's managed broker learns the new accounts from the database within its sync interval.
    return fleet.start(wait_online=60)


def accounting(cluster: Cluster) -> tuple[int, int]:
    """(windows stored, windows counted in drift buckets); seq gaps past the newest stored message
    are in flight while devices keep sending, so loss is judged by `settled`."""
    # One statement: one snapshot of both tables (ingest keeps committing meanwhile).
    stored, counted = db_rows(cluster.admin.storage, "SELECT (SELECT count(*) FROM windows), "
                              "(SELECT COALESCE(sum(windows), 0) FROM buckets)")[0]
    return stored, counted


def diagnosis(cluster: Cluster, fleet: SimFleet) -> str:
    stats = {s["device"]: s for s in cluster.admin.storage.seq_stats()}
    stuck = [(d, st.online, st.outbox, {k: stats.get(d, {}).get(k) for k in ("first_seq", "max_seq", "received")})
             for d, st in fleet.states().items() if st.outbox][:6]
    workers = [(w["worker_id"], {k: w["stats"].get(k) for k in ("received", "stored_windows", "duplicates",
                                                               "connected", "acks_sent", "queue_depth")})
               for w in cluster.admin.storage.worker_stats()]
    return f"stuck {stuck}; workers {workers}; rejects {cluster.admin.storage.reject_counts()[:5]}\n{cluster.log_tails()}"


def settled(cluster: Cluster, fleet: SimFleet, timeout: float, what: str) -> None:
    """Every message each device has made so far is stored: devices keep sending in real time, so
    outboxes are never all empty at once; a mark per device (its newest seq now) is the bar."""
    with fleet._cond:
        marks = {d: dev.agent.outbox.next_seq - 1 for d, dev in fleet.devices.items()
                 if dev.agent is not None and dev.agent.outbox is not None}

    def through() -> bool:
        first = {s["device"]: s["first_seq"] for s in cluster.admin.storage.seq_stats()}
        have: dict[str, int] = {}
        for device, seq in db_rows(cluster.admin.storage, "SELECT device, seq FROM seqs"):
            if device in marks and first.get(device, seq + 1) <= seq <= marks[device]:
                have[device] = have.get(device, 0) + 1
        return all(d in first and have.get(d, 0) == mark - first[d] + 1 for d, mark in marks.items())

    try:
        fleet.wait(through, timeout, f"{what}: every message made so far stored")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: {diagnosis(cluster, fleet)}") from None


class DesiredWatcher:
    """Every desired state the broker delivers (the server account may read them all)."""

    def __init__(self, cluster: Cluster) -> None:
        self.seen: list[tuple[float, str, tuple[str, str, str | None], bool]] = []
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="test-watcher",
                                  protocol=mqtt.MQTTv5)
        self.client.username_pw_set(SERVER_USERNAME, cluster.admin.config.server_mqtt_password())
        self.ready = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: (c.subscribe(subscription("default", "desired"), qos=1),
                                                         self.ready.set())
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", cluster.broker_port)
        self.client.loop_start()
        wait_until(self.ready.is_set, 10, message="watcher connected")

    def _on_message(self, client, userdata, msg) -> None:
        if msg.payload:
            device = parse_topic(msg.topic)[1]
            doc = json.loads(msg.payload)
            self.seen.append((time.time(), device, (doc["version"], doc["mode"], doc.get("rollout_id")),
                              bool(msg.retain)))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_three_nodes_one_leader_shared_logins_and_a_rollout_that_survives_its_leader(cluster3):
    cluster = cluster3
    n1, n2, n3 = cluster.nodes
    wait_until(lambda: cluster.leader() is not None, 10, message="a leader")
    view = wait_until(lambda: (v := cluster.view()) and len(v) == 3 and v, 10, message="three nodes listed")
    assert sorted(n["role"] for n in view) == ["follower", "follower", "leader"]

    # A console login on node 1 is a session on node 2.
    create_operator(cluster.admin, "olga", "operator", "a-long-enough-password")
    session = console_login(n1, "olga", "a-long-enough-password")
    cookies = {c.name: c.value for c in session.cookies}
    assert requests.get(n2.url + "/console/api/overview", cookies=cookies, timeout=10).status_code == 200
    assert requests.get(n2.url + "/console/api/overview", timeout=10).status_code == 401

    # add-device on node 3: the device logs in to the broker node 1 manages.
    made = cluster.cli(n3, "add-device", "door-1", "--output", str(cluster.root / "door-1.toml"))
    assert made.returncode == 0, made.stderr
    password = re.search(r'password\s*=\s*"([^"]+)"', (cluster.root / "door-1.toml").read_text()).group(1)
    door = DeviceClient(cluster.admin.config, "door-1", password)
    try:
        # Refused until node 1's broker sync picks the account up from the database, then in.
        wait_until(lambda: door.connected.is_set(), 15, message="door-1 connects")
    finally:
        door.close()

    fleet = sim_fleet(cluster)
    watcher = DesiredWatcher(cluster)
    try:
        from tests.sim_fixtures import trained

        v2 = trained("2.0.0")
        assert cluster.api(n2, "POST", "/api/v1/models", data=v2.bundle_bytes,
                           headers={"Content-Type": "application/octet-stream"}).status_code in (200, 201)
        plan = {"model": "tumour", "version": "2.0.0", "target": {"all": True}, "gates": OFF_GATES,
                "device_timeout_s": 120, "stages": [{"count": 5, "min_soak_s": 1}, {"percent": 50, "min_soak_s": 1},
                                                    {"percent": 100, "min_soak_s": 1}]}
        created = cluster.api(n3, "POST", "/api/v1/rollouts", json=plan)
        assert created.status_code in (200, 201), created.text
        rid = created.json()["rollout"]["id"]

        def rollout() -> dict[str, Any]:
            return cluster.admin.storage.get_rollout(rid)

        wait_until(lambda: rollout()["stage"] >= 1, 120, interval=0.1,
                   message=lambda: f"the rollout reaches stage 2: {rollout()['gates']}; devices "
                   f"{[(st.device_id, st.update_state, st.active_version, st.last_error) for d, st in fleet.states().items() if d in {m['device'] for m in cluster.admin.storage.rollout_devices(rid)}]}; "
                   f"watched {[(d, doc) for _, d, doc, r in watcher.seen if not r][:10]}\n{cluster.log_tails()}")
        old = cluster.leader()
        assert old is not None
        old_id = next(n["node_id"] for n in cluster.view() if n["role"] == "leader")
        stage_at_kill = rollout()["stage"]
        killed_at = time.time()
        old.kill9()
        new = wait_until(cluster.leader, 30, interval=0.05, message="another node leads")
        took_over_s = time.time() - killed_at
        assert new is not old
        wait_until(lambda: any(n["node_id"] == old_id and n["role"] == "gone" for n in cluster.view()), 30,
                   message="the dead leader is shown as gone")
        done = wait_until(lambda: rollout()["state"] in ("completed", "paused", "aborted") and rollout(), 180,
                          interval=0.2, message=lambda: f"the rollout ends: {rollout()}")
        if done["state"] != "completed":
            from fleet_server.rollouts import rollout_status

            status = rollout_status(cluster.admin, rid)
            pytest.fail(f"rollout {done['state']}: {done['reason']}; gates "
                        f"{[(g['name'], g['status'], g['value']) for g in status['gates']]}; devices "
                        f"{sorted((m['device'], m['status']) for m in status['devices'] if m['status'] != 'updated')}")
        assert stage_at_kill < len(done["stages"] if isinstance(done["stages"], list) else plan["stages"])
        fleet.wait(lambda: {s.active_version for s in fleet.states().values()} == {"2.0.0"}, 60,
                   "every device runs 2.0.0")
        wait_until(lambda: {cluster.admin.storage.get_device(d)["active_version"] for d in fleet.ids} == {"2.0.0"},
                   30, message="the server knows every device runs 2.0.0")
        desired = cluster.admin.storage.device_desired()
        assert {(desired[d]["version"], desired[d]["mode"], desired[d]["rollout_id"]) for d in fleet.ids} == \
            {("2.0.0", "live", rid)}
        # door-1 (offline, never reported) is told by the fleet target in a pass after completion.
        wait_until(lambda: any(d == "door-1" and not r for _, d, _, r in watcher.seen), 30,
                   message="door-1 is told the fleet target")
        # No device was told anything but this rollout's version; a repeat of the same document
        # happens only after the takeover (the old leader died between publishing and recording).
        per_device: dict[str, list[tuple[float, tuple[str, str, str | None]]]] = {}
        for at, device, doc, retained in watcher.seen:
            if not retained:
                per_device.setdefault(device, []).append((at, doc))
        assert set(per_device) == set(fleet.ids) | {"door-1"}  # door-1 is in the fleet too (offline by then)
        assert {doc for docs in per_device.values() for _, doc in docs} == \
            {("2.0.0", "live", rid)}
        repeats = {d: docs for d, docs in per_device.items() if len(docs) > 1}
        assert all(len(docs) == 2 and docs[1][0] >= killed_at for docs in repeats.values()), repeats
        print(f"takeover after kill -9 seen by the test in {took_over_s:.2f} s; {len(repeats)} repeated desired")
    finally:
        watcher.close()
        fleet.stop()


def test_kill_9_of_an_ingest_node_and_a_database_restart_lose_nothing(cluster3, own_pg):
    cluster = cluster3
    n1, n2, n3 = cluster.nodes
    fleet = sim_fleet(cluster)
    try:
        settled(cluster, fleet, 60, "start")
        before = cluster.admin.storage.seq_stats()
        wait_until(lambda: sum(s["received"] for s in cluster.admin.storage.seq_stats()) >
                   sum(s["received"] for s in before) + 200, 30, message="ingest under load")
        # Every node ingests a share.
        workers = {w["worker_id"]: w for w in cluster.admin.storage.worker_stats()}
        assert len(workers) == 3 and all(w["stats"].get("stored_windows", 0) > 0 for w in workers.values()), workers
        n2.kill9()  # one of three ingest members, mid-stream
        # Its session expires after session_expiry_s (2 s); what it held unacknowledged is resent by
        # the devices after resend_after_s (3 s): the survivors store it.
        settled(cluster, fleet, 60, "after kill -9 of node 2")
        # settled(): every seq up to each device's mark is stored (0 lost); each stored window is
        # counted once in the drift buckets (0 counted twice; the window table's key is (device, seq)).
        stored, counted = accounting(cluster)
        assert stored == counted

        # PostgreSQL stops mid-ingest: nodes are not ready, the API says which database, nothing is
        # acknowledged (outboxes grow); when it is back everything is stored once.
        cluster.token("viewer")  # made while the database is up
        marks = {i: d.agent.outbox.next_seq for i, d in fleet.devices.items() if d.agent is not None}
        own_pg.stop()
        for node in (n1, n3):
            wait_until(lambda node=node: requests.get(node.url + "/api/v1/ready", timeout=5).status_code == 503, 15,
                       message=f"{node.name} not ready")
        down = cluster.api(n3, "GET", "/api/v1/devices", role="viewer")
        assert down.status_code == 503 and "PostgreSQL database" in down.json()["error"]
        # Devices keep making windows while the database is down (their outboxes keep them).
        wait_until(lambda: all(d.agent.outbox.next_seq >= marks[i] + 3 for i, d in fleet.devices.items()
                               if i in marks), 30, message="devices keep making windows while the database is down")
        own_pg.restart()
        for node in (n1, n3):
            wait_until(node.up, 30, interval=0.1, message=f"{node.name} ready again")
        settled(cluster, fleet, 90, "after the database restart")
        # settled(): every seq up to each device's mark is stored (0 lost); each stored window is
        # counted once in the drift buckets (0 counted twice; the window table's key is (device, seq)).
        stored, counted = accounting(cluster)
        assert stored == counted
        assert all(loss_summary(s)["dropped_by_device"] == 0 for s in cluster.admin.storage.seq_stats())
    finally:
        fleet.stop()
