"""Broker accounts through Mosquitto's dynamic-security plugin, on the managed broker and on an
external one, with real Mosquitto, real paho clients and the real server: a device added by
another process connects within seconds without a reload; a revoked device is disconnected at
once; a device's credentials with another client id (another device's, or the server's ingest
session's) are refused while the victim stays connected; the password-file mode still works."""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fleet_server.broker import DYNSEC_FILE, broker_material
from fleet_server.broker_accounts import find_plugin
from fleet_server.devices import provision_device, revoke_device
from fleet_server.service import FleetServer, bootstrap
from tests.brokers import Broker
from tests.server_fixtures import DeviceClient, connected, make_config, shifted_window, wait_until

pytest_plugins = ["tests.server_fixtures"]
pytestmark = [pytest.mark.broker]

EDGES = [[-1.0, 0.0, 1.0]] * 3


class Probe:
    """A paho MQTT 5 client that records how its connection attempts end and every disconnect."""

    def __init__(self, host: str, port: int, username: str, password: str, client_id: str) -> None:
        self.results: list[str] = []
        self.disconnects: list[str] = []
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = lambda c, u, f, rc, p: self.results.append(str(rc))
        self.client.on_disconnect = lambda c, u, f, rc, p: self.disconnects.append(str(rc))
        self.client.connect_async(host, port)
        self.client.loop_start()

    def wait_result(self, timeout: float = 5.0) -> str:
        return wait_until(lambda: self.results and self.results[0], timeout, message="a CONNACK")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def stored_seqs(svc, device: str) -> set[int]:
    return {r["seq"] for r in svc.storage.db.query("SELECT seq FROM windows WHERE device = ?", [device])}


def test_foreign_client_ids_are_refused_and_the_victims_stay_connected(fleet):
    """Device A's credentials with device B's client id, or with the server's ingest or publisher
    client id: refused, while B, ingest and the publisher keep their sessions and every one of B's
    windows is stored."""
    svc, config = fleet.svc, fleet.config
    pw_a, pw_b = fleet.provision("take-a"), fleet.provision("take-b")
    victim = Probe(config.broker_host, config.broker_port, "take-b", pw_b, "take-b")
    assert victim.wait_result() == "Success"
    ingest = fleet.server.ingest
    ingest_drops: list[str] = []
    on_disconnect = ingest.client.on_disconnect

    def counting(client, userdata, flags, reason_code, properties):
        ingest_drops.append(str(reason_code))
        on_disconnect(client, userdata, flags, reason_code, properties)

    ingest.client.on_disconnect = counting
    publisher_connects = svc.publisher.connects
    foreign_ids = ["take-b", f"ef-ingest-{config.worker_id}", f"ef-server-pub-{config.worker_id}"]
    try:
        for seq in range(24):  # the attack from outside: B's windows interleaved with takeovers
            b_info = victim.client.publish(f"ef/{config.fleet}/d/take-b/telemetry",
                                           _encode(shifted_window("take-b", seq, EDGES)), qos=1)
            if seq % 4 == 0:
                attacker = Probe(config.broker_host, config.broker_port, "take-a", pw_a,
                                 foreign_ids[(seq // 4) % len(foreign_ids)])
                try:
                    assert attacker.wait_result() == "Not authorized"
                finally:
                    attacker.close()
            b_info.wait_for_publish(5)
        wait_until(lambda: stored_seqs(svc, "take-b") == set(range(24)), 20,
                   message=lambda: f"B's windows stored: {sorted(stored_seqs(svc, 'take-b'))}")
        assert victim.disconnects == [] and victim.results == ["Success"]
        assert ingest_drops == [] and ingest.connected.is_set()
        assert svc.publisher.connects == publisher_connects and svc.publisher.connected
        # A's own id still works: the binding refuses only other ids.
        own = Probe(config.broker_host, config.broker_port, "take-a", pw_a, "take-a")
        assert own.wait_result() == "Success"
        own.close()
    finally:
        ingest.client.on_disconnect = on_disconnect
        victim.close()


def _encode(window) -> bytes:
    from edge_agent.protocol import encode

    return encode(window)


def test_revoke_disconnects_the_device_at_once_and_refuses_it_after(fleet):
    pw = fleet.provision("gone-1")
    dev = Probe(fleet.config.broker_host, fleet.config.broker_port, "gone-1", pw, "gone-1")
    assert dev.wait_result() == "Success"
    try:
        revoke_device(fleet.svc, "gone-1")
        wait_until(lambda: dev.disconnects, 5, message="the revoked device disconnected by the broker")
        wait_until(lambda: len(dev.results) >= 2, 5, message="its reconnect answered")
        assert dev.results[1:] and all(r == "Not authorized" for r in dev.results[1:]), dev.results
    finally:
        dev.close()


def test_a_device_added_by_another_process_connects_within_seconds(fleet, tmp_path):
    """`edgefleet server add-device` in its own process, while the server runs: no reload, no
    restart of the broker; the device connects at once."""
    broker_pid = fleet.svc.broker.pid
    # What `server run` would have read: the same server.toml (the test's server was configured in code).
    (fleet.config.data_dir / "server.toml").write_text(f"broker_port = {fleet.config.broker_port}\n")
    started = time.monotonic()
    out = subprocess.run(
        [str(Path(sys.executable).with_name("edgefleet")), "server", "add-device", "--data-dir",
         str(fleet.config.data_dir), "other-proc-1"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    cli_done = time.monotonic()
    password = tomllib.loads(out)["mqtt"]["password"]
    dev = DeviceClient(fleet.config, "other-proc-1", password).wait_connected(5)
    try:
        assert not dev.refused and dev.connected.is_set()
        assert fleet.svc.broker.pid == broker_pid and fleet.svc.broker.restarts == 0
        print(f"add-device process ran {cli_done - started:.2f}s; the device connected "
              f"{time.monotonic() - cli_done:.3f}s after it exited")
    finally:
        dev.close()


def test_a_device_whose_account_never_reached_the_broker_gets_it_from_the_registry(fleet):
    """The plugin takes only plaintext passwords: a device registered while its creator could
    not reach the broker is given its account by a restart of the managed broker from the
    registry's hashes (after a short grace for the creator's own push)."""
    from fleet_server.auth import hash_password, mosquitto_hash, new_device_password

    password = new_device_password()
    fleet.svc.storage.insert_device("late-1", fleet.config.fleet, {}, hash_password(password),
                                    mosquitto_hash(password), time.time())  # registered, never pushed
    pid = fleet.svc.broker.pid
    assert not _connects(fleet, "late-1", password)
    wait_until(lambda: _connects(fleet, "late-1", password), 20, message="the managed broker to take late-1's account")
    assert fleet.svc.broker.pid != pid  # started again from the registry


def _connects(fleet, device: str, password: str) -> bool:
    probe = Probe(fleet.config.broker_host, fleet.config.broker_port, device, password, device)
    try:
        return probe.wait_result() == "Success"
    finally:
        probe.close()


def test_password_file_mode_provisions_and_revokes(tmp_path):
    """The other account mode, for brokers without the plugin: the password file and ACL re-read
    on SIGHUP."""
    server = FleetServer(make_config(tmp_path / "server", broker_accounts="password_file")).start()
    try:
        svc = server.svc
        assert "password_file" in server.svc.broker.conf_path.read_text()
        password = provision_device(svc, "pf-1").password
        dev = DeviceClient(server.config, "pf-1", password).wait_connected(5)
        assert dev.connected.is_set()
        dev.close()
        revoke_device(svc, "pf-1")
        again = DeviceClient(server.config, "pf-1", password).wait_connected(5)
        assert again.refused
        again.close()
    finally:
        server.stop()


def external_broker(config, broker_dir: Path) -> tuple[Broker, str]:
    """An external Mosquitto with the plugin on `config`'s MQTT port, seeded with `broker-config`'s
    file for a registry holding one device, `ext-pre` (registered before the broker existed);
    returns the broker and that device's password."""
    svc = bootstrap(config)
    pre = provision_device(svc, "ext-pre")
    material = broker_material(config, svc.storage)
    svc.close()
    broker_dir.mkdir()
    dynsec_file = broker_dir / DYNSEC_FILE
    dynsec_file.write_text(material.dynsec_file)
    os.chmod(dynsec_file, 0o600)
    port = int(config.broker_url.rsplit(":", 1)[1])
    broker = Broker(broker_dir, port=port, extra_config=(
        f"user {getpass.getuser()}\nallow_anonymous false\nplugin {find_plugin()}\n"
        f"plugin_opt_config_file {dynsec_file}\n"
    )).start()
    return broker, pre.password


@pytest.fixture
def external_dynsec(tmp_path):
    """An external Mosquitto with the plugin, seeded with `broker-config`'s file, and a server
    pointed at it (no managed broker)."""
    config = make_config(tmp_path / "server", mqtt_url=f"mqtt://127.0.0.1:{_free_port()}")
    broker, pre_password = external_broker(config, tmp_path / "external")
    server = FleetServer(config).start()
    try:
        wait_until(lambda: server.ingest.connected.is_set(), 10, message="ingest connected to the external broker")
        yield server, broker, pre_password
    finally:
        server.stop()
        broker.stop()


def test_an_external_broker_with_the_plugin_follows_the_registry(external_dynsec):
    server, broker, pre_password = external_dynsec
    svc = server.svc
    assert svc.broker is None  # nothing managed: the accounts go over $CONTROL
    pre = Probe("127.0.0.1", broker.port, "ext-pre", pre_password, "ext-pre")  # seeded from broker-config
    assert pre.wait_result() == "Success"
    pw = provision_device(svc, "ext-1").password
    dev = Probe("127.0.0.1", broker.port, "ext-1", pw, "ext-1")
    assert dev.wait_result() == "Success"
    thief = Probe("127.0.0.1", broker.port, "ext-1", pw, "ext-pre")
    assert thief.wait_result() == "Not authorized"
    thief.close()
    dev.client.publish(f"ef/{server.config.fleet}/d/ext-1/telemetry", _encode(shifted_window("ext-1", 0, EDGES)), qos=1)
    wait_until(lambda: stored_seqs(svc, "ext-1") == {0}, 10, message="ext-1's window stored")
    revoke_device(svc, "ext-1")
    wait_until(lambda: dev.disconnects, 5, message="the revoked device disconnected")
    dev.close()
    assert pre.disconnects == [] and pre.results == ["Success"]
    pre.close()


def _free_port() -> int:
    from tests.brokers import free_port

    return free_port()


def test_threads_starting_the_accounts_client_together_connect_it_once(fleet):
    """The sync loop and a request thread may both be first to use the plugin's client: it
    connects once (two connects on one paho client left it unconnected for 15 s), and every
    thread gets the plugin's answer."""
    import threading

    from fleet_server.broker_accounts import DynsecClient

    client = DynsecClient(fleet.config)
    connects: list[str] = []
    connect = client.client.connect

    def counting_connect(*args, **kwargs):
        connects.append(threading.current_thread().name)
        return connect(*args, **kwargs)

    client.client.connect = counting_connect  # type: ignore[method-assign]
    together = threading.Barrier(6)
    answers, errors = [], []

    def use() -> None:
        together.wait(10)
        try:
            answers.append(client.run([{"command": "listClients", "verbose": False, "count": -1}])[0])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=use) for _ in range(6)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == [] and len(connects) == 1
        assert len(answers) == 6 and all("error" not in a for a in answers), answers
    finally:
        client.close()


def test_no_disconnect_race_between_reconcile_and_a_fresh_account(fleet):
    """Many devices added at once while the sync loop reconciles: none is reported missing long
    enough to restart the broker, and all connect."""
    pid = fleet.svc.broker.pid
    passwords = {f"burst-{i}": fleet.provision(f"burst-{i}") for i in range(20)}
    clients = []
    errors: list[str] = []

    def connect(device: str, password: str) -> None:
        probe = Probe(fleet.config.broker_host, fleet.config.broker_port, device, password, device)
        clients.append(probe)
        if probe.wait_result() != "Success":
            errors.append(device)

    threads = [threading.Thread(target=connect, args=item) for item in passwords.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    try:
        assert errors == [] and fleet.svc.broker.pid == pid
    finally:
        for c in clients:
            c.close()


def test_on_postgresql_only_the_leader_maintains_and_reconciles_an_external_broker(tmp_path, pg_url):
    """Two nodes on one database and one external broker with the plugin: the leader runs the
    maintenance pass and reconciles the broker's accounts, the follower neither; when the leader
    goes, the other node takes both over."""
    port = _free_port()
    configs = [make_config(tmp_path / name, mqtt_url=f"mqtt://127.0.0.1:{port}", storage_url=pg_url)
               for name in ("node-a", "node-b")]
    broker, _ = external_broker(configs[0], tmp_path / "external")
    shutil.copytree(configs[0].secrets_dir, configs[1].secrets_dir)  # one set of secrets per deployment
    servers: list[FleetServer] = []

    def maintained(server: FleetServer) -> int:
        with server.ingest.stats.lock:
            return server.ingest.stats.counters["maintenance_passes"]

    def sync(server: FleetServer):
        return next(loop for loop in server.loops if loop.name == "broker-sync")

    try:
        leader = connected(FleetServer(configs[0]).start())
        servers.append(leader)
        wait_until(leader.svc.leadership.is_leader, 10, message="the first node leads")
        follower = connected(FleetServer(configs[1]).start())
        servers.append(follower)
        wait_until(lambda: maintained(leader) >= 2 and sync(leader).fn.reconciled_generation is not None, 10,
                   message="the leader maintains and reconciles")
        passes = sync(follower).passes
        wait_until(lambda: sync(follower).passes >= passes + 3, 10, message="the follower's broker-sync runs")
        assert not follower.svc.leadership.is_leader()
        assert maintained(follower) == 0 and sync(follower).fn.reconciled_generation is None

        leader.stop()  # its database session ends with it, and leadership with the session
        wait_until(follower.svc.leadership.is_leader, 10, message="the other node leads")
        wait_until(lambda: maintained(follower) >= 1 and sync(follower).fn.reconciled_generation is not None, 10,
                   message="the new leader maintains and reconciles")
    finally:
        for server in servers:
            server.stop()
        broker.stop()
