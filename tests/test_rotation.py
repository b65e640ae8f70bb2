"""Device password rotation with a real agent, the real server and its real Mosquitto: the agent
takes its new password over its own channels and switches without a site visit; the old one
stays valid until the device confirms and is refused afterwards, by the broker and for downloads;
a restart between taking and confirming the password resumes; CLI, API and console can start it."""

from __future__ import annotations

import json
import os
import signal
import stat
import threading
import time
import tomllib

import paho.mqtt.client as mqtt
import pytest
import requests
from click.testing import CliRunner

from edge_agent import Agent
from edge_agent.config import config_from_dict
from edge_agent.credentials import CREDENTIALS_FILE, CredentialStore
from fleet_server.devices import provision_device
from fleet_server.rotation import request_rotation, rotation_status
from tests.server_fixtures import make_bundle, wait_until

pytest_plugins = ["tests.server_fixtures"]
pytestmark = [pytest.mark.broker]


def broker_login(config, device_id: str, password: str) -> str:
    """How the broker answers a login (a client id of its own: never takes over the agent's)."""
    results: list[str] = []
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=device_id,
                         protocol=mqtt.MQTTv5)
    client.username_pw_set(device_id, password)
    client.on_connect = lambda c, u, f, rc, p: results.append(str(rc))
    client.connect(config.broker_host, config.broker_port)
    client.loop_start()
    try:
        return wait_until(lambda: results and results[0], 5, message="a CONNACK")
    finally:
        client.disconnect()
        client.loop_stop()


class RunningAgent:
    """A real agent (its MQTT link thread, ticked like `agent run`) from its provisioned config."""

    def __init__(self, agent_config: str, data_dir) -> None:
        data = tomllib.loads(agent_config)
        data["data_dir"] = str(data_dir)
        self.agent = Agent(config_from_dict(data)).start()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True)
        self._thread.start()

    def _tick(self) -> None:
        while not self._stop.wait(0.05):
            self.agent.tick()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.agent.close()


@pytest.fixture
def model(fleet, signing_key):
    private, pub = signing_key
    fleet.api("post", "/api/v1/keys", json={"pem": pub.read_text()})
    assert fleet.api("post", "/api/v1/models", data=make_bundle(private)).status_code == 201
    return fleet.url + "/api/v1/models/pump/1.0.0/bundle"


def _told(fleet, device_id: str) -> None:
    """Record that the device was told pump 1.0.0 (so it may download it), without an update."""
    fleet.svc.storage.put_device_desired(device_id, {
        "model": "pump", "version": "1.0.0", "mode": "live", "rollout_id": None, "allow_downgrade": False,
        "published_at": fleet.svc.clock(),
    })


def test_rotation_switches_a_running_agent_and_the_old_password_is_refused(fleet, model, tmp_path):
    svc, config = fleet.svc, fleet.config
    provisioned = provision_device(svc, "rot-1", window_s=0.25)
    old = provisioned.password
    _told(fleet, "rot-1")
    running = RunningAgent(provisioned.agent_config, tmp_path / "rot-1")
    agent = running.agent
    try:
        wait_until(lambda: agent.link.connected, 10, message="the agent connected")
        assert requests.get(model, auth=("rot-1", old), timeout=10).status_code == 200
        started = time.monotonic()
        rotation = request_rotation(svc, "rot-1", "test")
        assert rotation["state"] == "pending"
        wait_until(lambda: rotation["rotation_id"] in agent.rotator.completed, 20,
                   message=lambda: f"the agent switched: {rotation_status(svc, 'rot-1')}, agent: {agent.rotator.last_error}")
        switched = time.monotonic() - started
        assert rotation_status(svc, "rot-1")["state"] == "confirmed"
        new = agent.config.mqtt.password
        assert new != old
        # The agent saved it (0600) and runs on it: connected again, telemetry still stored.
        saved = tmp_path / "rot-1" / CREDENTIALS_FILE
        assert json.loads(saved.read_text())["password"] == new
        assert stat.S_IMODE(os.stat(saved).st_mode) == 0o600
        wait_until(lambda: agent.link.connected, 10, message="the agent logged in with its new password")
        seqs_before = _stored(svc, "rot-1")
        wait_until(lambda: _stored(svc, "rot-1") > seqs_before, 20, message="telemetry after the rotation")
        # The old password is refused everywhere; the new one works.
        assert broker_login(config, "rot-1", old) == "Not authorized"
        assert requests.get(model, auth=("rot-1", old), timeout=10).status_code == 401
        assert requests.get(model, auth=("rot-1", new), timeout=10).status_code == 200
        assert agent.link.connected  # the probes above never took over the agent's session
        print(f"rotation requested -> agent switched after {switched:.2f}s")
    finally:
        running.close()
    # A restarted agent uses the saved password, not the one in its config file.
    again = RunningAgent(provisioned.agent_config, tmp_path / "rot-1")
    try:
        wait_until(lambda: again.agent.link.connected, 10, message="the restarted agent connected")
        assert again.agent.config.mqtt.password == new
    finally:
        again.close()


def _stored(svc, device: str) -> int:
    return len(list(svc.storage.db.query("SELECT seq FROM windows WHERE device = ?", [device])))


def test_the_old_password_stays_valid_until_the_device_confirms(fleet, model, tmp_path):
    """An offline device: the rotation waits (retained notice); its old password still works;
    when it comes back it takes the new one."""
    svc, config = fleet.svc, fleet.config
    provisioned = provision_device(svc, "rot-2", window_s=0.25)
    old = provisioned.password
    _told(fleet, "rot-2")
    request_rotation(svc, "rot-2", "test")
    assert rotation_status(svc, "rot-2")["state"] == "pending"
    assert broker_login(config, "rot-2", old) == "Success"
    assert requests.get(model, auth=("rot-2", old), timeout=10).status_code == 200
    running = RunningAgent(provisioned.agent_config, tmp_path / "rot-2")
    try:
        wait_until(lambda: running.agent.rotator.completed, 20,  # the server answered its confirmation
                   message=lambda: f"rotation confirmed: {rotation_status(svc, 'rot-2')}")
        assert rotation_status(svc, "rot-2")["state"] == "confirmed"
        assert broker_login(config, "rot-2", old) == "Not authorized"
    finally:
        running.close()


def test_a_rotation_announced_before_a_broker_crash_reaches_the_device_that_was_offline(fleet, model, tmp_path):
    """The broker restores its retained messages from its last save: a notice published after it
    is gone when the broker dies. After the restart the server announces open rotations again,
    so a device that was offline meanwhile still rotates."""
    svc, config = fleet.svc, fleet.config
    provisioned = provision_device(svc, "rot-8", window_s=0.25)
    old = provisioned.password
    db = svc.broker.dir / "mosquitto.db"
    before = db.stat().st_mtime_ns if db.exists() else 0
    os.kill(svc.broker.pid, signal.SIGUSR1)  # the broker saves its state, as its autosave would...
    wait_until(lambda: db.exists() and db.stat().st_mtime_ns > before, 10, message="the broker saved its state")
    request_rotation(svc, "rot-8", "test")  # ...then the notice goes out (retained, rot-8 is offline)...
    assert rotation_status(svc, "rot-8")["notified_at"] is not None
    old_pid, connects = svc.broker.pid, svc.publisher.connects
    os.kill(old_pid, signal.SIGKILL)  # ...and the broker dies before its next save
    wait_until(lambda: svc.broker.alive() and svc.broker.pid != old_pid and svc.publisher.connects > connects, 30,
               message="the supervisor started the broker again and the server reconnected")
    running = RunningAgent(provisioned.agent_config, tmp_path / "rot-8")
    try:
        wait_until(lambda: running.agent.rotator.completed, 20,
                   message=lambda: f"rotation confirmed: {rotation_status(svc, 'rot-8')}")
        assert rotation_status(svc, "rot-8")["state"] == "confirmed"
        assert broker_login(config, "rot-8", old) == "Not authorized"
    finally:
        running.close()


def test_a_restart_between_taking_and_confirming_the_password_resumes(fleet, model, tmp_path):
    """The device took its new password and saved it, then lost power before confirming: the
    server still takes the old one; the restarted agent confirms and switches."""
    svc, config = fleet.svc, fleet.config
    provisioned = provision_device(svc, "rot-3", window_s=0.25)
    old = provisioned.password
    rotation_id = request_rotation(svc, "rot-3", "test")["rotation_id"]
    r = requests.post(fleet.url + "/api/v1/device/credentials", auth=("rot-3", old),
                      json={"rotation_id": rotation_id}, timeout=10)
    assert r.status_code == 200, r.text
    new = r.json()["password"]
    CredentialStore(tmp_path / "rot-3", old).save_pending(rotation_id, new)  # what the agent saves first
    assert rotation_status(svc, "rot-3")["state"] == "issued"
    assert broker_login(config, "rot-3", old) == "Success"  # not confirmed: the old one still works
    running = RunningAgent(provisioned.agent_config, tmp_path / "rot-3")
    try:
        wait_until(lambda: running.agent.rotator.completed == [rotation_id], 20,
                   message=lambda: f"rotation confirmed: {rotation_status(svc, 'rot-3')}")
        assert rotation_status(svc, "rot-3")["state"] == "confirmed"
        wait_until(lambda: running.agent.link.connected and running.agent.config.mqtt.password == new, 10)
        assert broker_login(config, "rot-3", old) == "Not authorized"
    finally:
        running.close()


def test_confirming_needs_the_issued_password_and_an_open_rotation(fleet):
    svc = fleet.svc
    old = fleet.provision("rot-4")
    other = fleet.provision("rot-5")
    rotation_id = request_rotation(svc, "rot-4", "test")["rotation_id"]
    issue = fleet.url + "/api/v1/device/credentials"
    confirm = fleet.url + "/api/v1/device/credentials/confirm"
    # Another device's credentials cannot take rot-4's password, nor an unknown rotation id.
    assert requests.post(issue, auth=("rot-5", other), json={"rotation_id": rotation_id}, timeout=10).status_code == 409
    assert requests.post(issue, auth=("rot-4", "wrong"), json={"rotation_id": rotation_id}, timeout=10).status_code == 401
    new = requests.post(issue, auth=("rot-4", old), json={"rotation_id": rotation_id}, timeout=10).json()["password"]
    # Confirming with the old password, or a guess, does not switch anything.
    assert requests.post(confirm, auth=("rot-4", old), json={"rotation_id": rotation_id}, timeout=10).status_code == 403
    assert requests.post(confirm, auth=("rot-4", new + "x"), json={"rotation_id": rotation_id}, timeout=10).status_code == 403
    assert rotation_status(svc, "rot-4")["state"] == "issued"
    r = requests.post(confirm, auth=("rot-4", new), json={"rotation_id": rotation_id}, timeout=10)
    assert r.status_code == 200 and r.json()["rotation"]["state"] == "confirmed"
    # Idempotent: a device that missed the answer confirms again.
    assert requests.post(confirm, auth=("rot-4", new), json={"rotation_id": rotation_id}, timeout=10).status_code == 200
    assert broker_login(fleet.config, "rot-4", old) == "Not authorized"
    assert broker_login(fleet.config, "rot-4", new) == "Success"


def test_an_unconfirmed_rotation_expires_and_the_old_password_stays(fleet):
    svc = fleet.svc
    svc.config.rotation_grace_s = 0.2
    old = fleet.provision("rot-6")
    rotation_id = request_rotation(svc, "rot-6", "test")["rotation_id"]
    wait_until(lambda: rotation_status(svc, "rot-6")["state"] == "expired", 5)
    r = requests.post(fleet.url + "/api/v1/device/credentials", auth=("rot-6", old),
                      json={"rotation_id": rotation_id}, timeout=10)
    assert r.status_code == 409 and "expired" in r.json()["error"]
    assert broker_login(fleet.config, "rot-6", old) == "Success"


def test_rotation_from_the_cli_and_the_api(fleet):
    from fleet_server.cli import server

    fleet.provision("rot-7")
    out = CliRunner().invoke(server, ["rotate-device-password", "--data-dir", str(fleet.config.data_dir), "rot-7"])
    assert out.exit_code == 0, out.output
    assert "rot-7" in out.output and "pending" in out.output
    # The CLI process has no MQTT connection: the running server announces it.
    wait_until(lambda: rotation_status(fleet.svc, "rot-7")["notified_at"] is not None, 10,
               message="the server announced the CLI's rotation")
    r = fleet.api("post", "/api/v1/devices/rot-7/rotate-password")
    assert r.status_code == 202 and r.json()["rotation"]["state"] == "pending"
    assert fleet.api("post", "/api/v1/devices/rot-7/rotate-password", role="viewer").status_code == 403
    assert fleet.api("post", "/api/v1/devices/nope/rotate-password").status_code == 404
    assert fleet.api("get", "/api/v1/devices/rot-7").json()["device"]["rotation"]["state"] == "pending"
    bad = CliRunner().invoke(server, ["rotate-device-password", "--data-dir", str(fleet.config.data_dir), "nope"])
    assert bad.exit_code != 0 and "no device" in bad.output
