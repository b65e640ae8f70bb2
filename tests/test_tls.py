"""TLS end to end with certificates generated for the test (`fleet_server.tls.init_tls`): the managed
broker's MQTT-over-TLS listener, HTTPS for API, console and downloads, and a real edge_agent Agent
provisioned with the printed config. Clients without the CA, with another CA, or reaching a
certificate for another host name are refused; plain MQTT to the TLS port gets nowhere."""

from __future__ import annotations

import logging
import re
import shutil
import socket
import ssl
import threading
import time
from dataclasses import replace

import paho.mqtt.client as mqtt
import pytest
import requests
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent import Agent
from edge_agent.config import load_config
from edge_agent.download import DownloadError, DownloadRequest, download
from edge_agent.link import MqttLink
from fleet_server.console.accounts import create_operator
from fleet_server.desired import publish_desired
from fleet_server.devices import provision_device
from fleet_server.registry import desired_state, trust_key, upload_bundle
from fleet_server.service import FleetServer
from fleet_server.tls import cert_pem, generate_ca, init_tls, issue_server_certificate
from tests.agent_fixtures import bundle_bytes, dataset, public_pem
from tests.brokers import free_port, wait_until
from tests.server_fixtures import connected, make_config

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.fixture
def tls_fleet(tmp_path):
    """A server with `tls = true`: TLS listener for devices, plain listener on loopback, HTTPS API."""
    data_dir = tmp_path / "server"
    init_tls(data_dir)
    config = make_config(data_dir, tls=True, broker_tls_listen=f"127.0.0.1:{free_port()}")
    server = connected(FleetServer(config).start())
    yield server
    server.stop()


def _paho(client_id: str = "", **tls: object) -> tuple[mqtt.Client, list[str]]:
    results: list[str] = []
    # A device's credentials connect only with its own client id (the broker binds them).
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id or f"probe-{time.monotonic_ns()}",
                         protocol=mqtt.MQTTv5)
    client.on_connect = lambda c, u, f, rc, p: results.append(str(rc))
    if tls:
        client.tls_set(**tls)
    return client, results


def test_agent_over_mqtts_and_https(tls_fleet, tmp_path):
    svc, config = tls_fleet.svc, tls_fleet.config
    ca = config.tls_files[2]
    assert tls_fleet.url.startswith("https://")
    trust_key(svc, public_pem("trusted"))
    model = upload_bundle(svc, bundle_bytes("lr"))

    # Provisioning prints mqtts:// and https:// URLs and a ca_file beside the config.
    device_dir = tmp_path / "device"
    device_dir.mkdir()
    text = provision_device(svc, "tls-0", data_dir=str(device_dir / "data"), window_s=0.25).agent_config
    tls_port = config.broker_tls_host_port[1]
    assert f'url = "mqtts://127.0.0.1:{tls_port}"' in text
    assert f'url = "{tls_fleet.url}"' in text and tls_fleet.url.startswith("https://")
    assert 'ca_file = "edgefleet-ca.pem"' in text
    (device_dir / "agent.toml").write_text(text)
    shutil.copy(ca, device_dir / "edgefleet-ca.pem")
    agent_config = load_config(device_dir / "agent.toml")
    assert agent_config.mqtt.ca_file == str(device_dir / "edgefleet-ca.pem")

    agent = Agent(agent_config).start()
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.05):
            agent.tick()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        wait_until(lambda: agent.link is not None and agent.link.connected, 15, message="agent connected over TLS")
        assert publish_desired(svc, "tls-0", desired_state(svc, model["name"], model["version"]))
        assert desired_state(svc, model["name"], model["version"]).url.startswith("https://")
        wait_until(lambda: agent.active_version() == model["version"], 30, interval=0.1,
                   message="bundle downloaded over HTTPS and activated")
        X, _ = dataset()
        agent.predict(X[:50].tolist())
        stats = wait_until(lambda: [s for s in svc.storage.seq_stats("tls-0") if s["received"] > 0], 15,
                           message="telemetry stored")
        assert stats[0]["received"] >= 1
        # The API over HTTPS, verified against the generated CA.
        token = _token(svc)

        def device() -> dict:
            r = requests.get(f"{tls_fleet.url}/api/v1/devices/tls-0", headers={"Authorization": f"Bearer {token}"},
                             verify=str(ca), timeout=10)
            assert r.status_code == 200
            return r.json()["device"]

        wait_until(lambda: device()["active_version"] == model["version"] and device()["status"] == "online", 10,
                   interval=0.1, message="reported state over MQTT, read over HTTPS")
    finally:
        stop.set()
        ticker.join(5)
        agent.close()

    # A download with another CA fails verification (and is not retried into success).
    wrong_ca = tmp_path / "wrong-ca.pem"
    wrong_ca.write_bytes(cert_pem(generate_ca("not edgefleet")[1]))
    req = DownloadRequest(url=desired_state(svc, model["name"], model["version"]).url, dest=tmp_path / "x.efb",
                          size=model["size"], sha256=model["sha256"], username="tls-0", ca_file=str(wrong_ca),
                          retries=0, min_free_disk_bytes=0, server_url=config.server_url)
    with pytest.raises(DownloadError, match="CERTIFICATE_VERIFY_FAILED"):
        download(req)
    # Plain HTTP to the HTTPS port gets no API answer.
    host, port = config.listen_host_port
    try:
        r = requests.get(f"http://{host}:{tls_fleet.https.port}/api/v1/devices", timeout=5)
        assert r.status_code == 400
    except requests.ConnectionError:
        pass


def _token(svc) -> str:
    from fleet_server.auth import new_token, token_hash

    token = new_token()
    svc.storage.insert_token("tls-test", "viewer", token_hash(token), time.time())
    return token


def test_console_cookies_are_secure_over_https(tls_fleet):
    create_operator(tls_fleet.svc, "alice", "operator", "correct horse battery")
    s = requests.Session()
    ca = str(tls_fleet.config.tls_files[2])  # per request: REQUESTS_CA_BUNDLE would override Session.verify
    form = s.get(f"{tls_fleet.url}/console/login", verify=ca, timeout=10)
    assert form.status_code == 200
    assert "secure" in form.headers["Set-Cookie"].lower()
    token = re.search(r'name="login_token" value="([^"]+)"', form.text).group(1)
    r = s.post(f"{tls_fleet.url}/console/login", data={"login_token": token, "name": "alice",
                                                         "password": "correct horse battery"},
               allow_redirects=False, verify=ca, timeout=10)
    assert r.status_code == 303
    session_cookie = [c for c in r.raw.headers.getlist("Set-Cookie") if "ef_login" not in c]
    assert session_cookie and all("Secure" in c and "HttpOnly" in c for c in session_cookie)


def test_clients_without_the_ca_or_without_tls_are_refused(tls_fleet, tmp_path):
    config = tls_fleet.config
    password = provision_device(tls_fleet.svc, "tls-1").password
    host, port = config.broker_tls_host_port

    # The system CAs do not know the fleet's CA.
    client, _ = _paho(cert_reqs=ssl.CERT_REQUIRED)
    client.username_pw_set("tls-1", password)
    with pytest.raises(ssl.SSLCertVerificationError):
        client.connect(host, port)
    # Nor does another CA.
    wrong_ca = tmp_path / "wrong-ca.pem"
    wrong_ca.write_bytes(cert_pem(generate_ca("not edgefleet")[1]))
    client, _ = _paho(ca_certs=str(wrong_ca))
    client.username_pw_set("tls-1", password)
    with pytest.raises(ssl.SSLCertVerificationError):
        client.connect(host, port)
    # With the right CA the same credentials connect.
    client, results = _paho("tls-1", ca_certs=str(config.tls_files[2]))
    client.username_pw_set("tls-1", password)
    client.connect(host, port)
    client.loop_start()
    try:
        wait_until(lambda: results, 5, message="TLS connect")
        assert results == ["Success"]
    finally:
        client.disconnect()
        client.loop_stop()
    # Plain MQTT to the TLS port: the broker never answers CONNECT.
    client, results = _paho()
    client.username_pw_set("tls-1", password)
    client.connect(host, port)
    client.loop_start()
    try:
        time.sleep(2.0)
        assert results == []
    finally:
        client.loop_stop()
        client.disconnect()


def test_a_certificate_for_another_host_is_refused(tls_fleet, tmp_path, caplog):
    """Signed by the right CA but issued to another name: both MQTT link and download refuse it."""
    from cryptography.hazmat.primitives import serialization

    tls_dir = tls_fleet.config.data_dir / "tls"
    ca_key = serialization.load_pem_private_key((tls_dir / "ca.key").read_bytes(), password=None)
    from cryptography import x509

    ca_cert = x509.load_pem_x509_certificate((tls_dir / "ca.pem").read_bytes())
    key, cert = issue_server_certificate(ca_key, ca_cert, ["fleet.invalid"])
    (tmp_path / "other.pem").write_bytes(cert_pem(cert))
    (tmp_path / "other.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "other.pem", tmp_path / "other.key")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    done = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            try:
                with ctx.wrap_socket(conn, server_side=True):
                    pass
            except OSError:
                pass

    threading.Thread(target=serve, daemon=True).start()
    try:
        device_dir = tmp_path / "device"
        device_dir.mkdir()
        text = provision_device(tls_fleet.svc, "tls-2", data_dir=str(device_dir / "data")).agent_config
        (device_dir / "agent.toml").write_text(text)
        shutil.copy(tls_dir / "ca.pem", device_dir / "edgefleet-ca.pem")
        cfg = load_config(device_dir / "agent.toml")
        cfg = replace(cfg, mqtt=replace(cfg.mqtt, url=f"mqtts://127.0.0.1:{port}"))
        link = MqttLink(cfg, on_connected=lambda: None, on_desired=lambda b: None, clock=time.monotonic,
                        will_payload=lambda: b"{}")
        caplog.set_level(logging.DEBUG, logger="edge_agent.link")
        link.service()
        assert not link.connected and link.client.socket() is None
        assert "certificate is not valid for '127.0.0.1'" in caplog.text
        req = DownloadRequest(url=f"https://127.0.0.1:{port}/bundle", dest=tmp_path / "y.efb", size=10,
                              sha256="0" * 64, ca_file=cfg.mqtt.ca_file, retries=0, min_free_disk_bytes=0,
                              server_url=f"https://127.0.0.1:{port}")
        with pytest.raises(DownloadError, match="not valid for '127.0.0.1'"):
            download(req)
    finally:
        done.set()
        listener.close()


def test_tls_init_renews_under_the_same_ca_and_keeps_host_names(tmp_path):
    from click.testing import CliRunner
    from cryptography import x509

    from fleet_server.broker import BrokerError, mosquitto_conf
    from fleet_server.cli import server

    runner = CliRunner()
    first = runner.invoke(server, ["tls-init", "--data-dir", str(tmp_path), "--hostname", "fleet.example.com"])
    assert first.exit_code == 0, first.output
    ca_before = (tmp_path / "tls" / "ca.pem").read_bytes()
    cert_before = (tmp_path / "tls" / "server.pem").read_bytes()
    again = runner.invoke(server, ["tls-init", "--data-dir", str(tmp_path)])
    assert again.exit_code == 0 and "kept CA" in again.output
    assert (tmp_path / "tls" / "ca.pem").read_bytes() == ca_before
    assert (tmp_path / "tls" / "server.pem").read_bytes() != cert_before
    cert = x509.load_pem_x509_certificate((tmp_path / "tls" / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fleet.example.com", "localhost"]
    assert (tmp_path / "tls" / "server.key").stat().st_mode & 0o077 == 0
    bad = runner.invoke(server, ["tls-init", "--data-dir", str(tmp_path), "--hostname", "no spaces"])
    assert bad.exit_code != 0 and "not a host name" in bad.output
    # tls on without certificates: the broker refuses to start and says what to run.
    with pytest.raises(BrokerError, match="tls-init"):
        mosquitto_conf(make_config(tmp_path / "empty", tls=True))
