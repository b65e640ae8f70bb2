"""The agent on an emulated arm64 Debian device (qemu-user), capped at 512 MB by a memory cgroup:
installed from the aarch64 wheelhouse, `edgefleet agent run` against a real fleet server (TLS,
managed Mosquitto) on loopback serving predictions over HTTP, telemetry the server stores, a
signed update from a rollout (SelfTest, Probation, Commit); the bundle self-test and
`edgefleet agent predict` on a batch file. The first run builds the Debian root (minutes; cached
outside the clone, tests/arm64_fixtures.py)."""

from __future__ import annotations

import csv
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import requests

from fleet_server.service import FleetServer
from fleet_server.tls import init_tls
from tests.agent_fixtures import (
    bundle_bytes,
    config_toml,
    dataset,
    install_active,
    make_config,
    onnx_predict,
    public_pem,
)
from tests.arm64_fixtures import (
    VENV,
    Device,
    MemoryCgroup,
    agent_wheelhouse,
    build_root,
    install_agent,
    stop,
)
from tests.brokers import free_port, wait_until
from tests.server_fixtures import ServerHandle
from tests.server_fixtures import make_config as server_config

# The first run builds the Debian root under emulation (20+ minutes on 2 cores; cached after).
pytestmark = [pytest.mark.slow, pytest.mark.broker, pytest.mark.timeout(3600)]

CAP_BYTES = 512 * 2**20
# qemu-user runs a model 5-30x slower than the host: the latency floors keep SelfTest and
# Probation judging correctness here, not the emulator's speed (docs/device.md#configuration-reference).
SLOW_DEVICE_UPDATE = (
    "\n[update]\n"
    "probation_predictions = 30\n"
    "probation_s = 3.0\n"
    "selftest_latency_floor_ms = 200.0\n"
    "probation_latency_floor_ms = 200.0\n"
)
GATES = {"error_rate_delta": {"min_sample": 50}, "p95_latency_ratio": {"max": 10.0, "min_sample": 50},
         "prediction_js": {"min_sample": 50}, "input_drift_psi": {"max": 0.5, "min_sample": 50}}


@pytest.fixture(scope="module")
def arm64_root():
    return build_root()


@pytest.fixture(scope="module")
def arm64_wheelhouse(tmp_path_factory):
    return agent_wheelhouse(tmp_path_factory.mktemp("wheelhouse"))


@pytest.fixture(scope="module")
def arm64_device(arm64_root, arm64_wheelhouse, tmp_path_factory):
    """A device with the agent installed in /opt/edgefleet/venv (from the wheelhouse, by host pip)."""
    device = Device.create(arm64_root, tmp_path_factory.mktemp("device"))
    try:
        install_agent(device, arm64_wheelhouse)
        yield device
    finally:
        device.cleanup()


def _log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else "(no log)"


def test_bundle_selftest_and_batch_predict_on_arm64(arm64_device, tmp_path):
    device = arm64_device
    assert device.machine() == "aarch64"
    data_dir = "/var/lib/edgefleet-batch"
    data = bundle_bytes("rf", "1.0.0")
    install_active(device.host(data_dir), data)
    config = make_config(tmp_path)
    device.host("/etc/edgefleet-batch").mkdir(parents=True, exist_ok=True)
    device.host("/etc/edgefleet-batch/agent.toml").write_text(
        config_toml(config).replace(f'data_dir = "{config.data_dir}"', f'data_dir = "{data_dir}"'))

    # The bundle's own self-test (golden set within tolerance) with aarch64 onnxruntime.
    script = (
        "import json, sys\n"
        "from edge_agent.agent import trusted_keys_from_config\n"
        "from edge_agent.config import load_config\n"
        "from edge_agent.runtime import ModelRuntime\n"
        "from model_tools.bundle import load_extracted\n"
        "config = load_config('/etc/edgefleet-batch/agent.toml')\n"
        f"bundle = load_extracted('{data_dir}/versions/1.0.0', trusted_keys_from_config(config))\n"
        "result = ModelRuntime(bundle).self_test(latency_floor_ms=200.0)\n"
        "print(json.dumps({'ok': result.ok, 'reason': result.reason, 'p50': result.latency_ms_p50}))\n"
    )
    out = device.run([f"{VENV}/bin/python", "-c", script]).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["ok"], result

    # A batch file scored by `edgefleet agent predict`, against onnxruntime on the host.
    X, _ = dataset()
    rows = X[:200]
    names = [f.name for f in config_inputs(data)]
    with open(device.host("/etc/edgefleet-batch/rows.csv"), "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(names)
        writer.writerows(rows.tolist())
    run = device.run([f"{VENV}/bin/edgefleet", "agent", "predict", "--config", "/etc/edgefleet-batch/agent.toml",
                      "--input", "/etc/edgefleet-batch/rows.csv", "--output", "/etc/edgefleet-batch/out.csv"])
    assert "200 of 200 rows scored" in run.stdout, run.stdout
    with open(device.host("/etc/edgefleet-batch/out.csv"), newline="") as fh:
        scored = list(csv.DictReader(fh))
    expected = onnx_predict(data, rows)
    assert [int(float(r["prediction"])) for r in scored] == [int(v) for v in expected]


def config_inputs(data: bytes):
    from tests.agent_fixtures import manifest_of

    return manifest_of(data).inputs


def test_agent_run_on_arm64_under_512mb_with_server_and_rollout(arm64_device, tmp_path):
    device = arm64_device
    server_dir = tmp_path / "server"
    init_tls(server_dir)
    server = FleetServer(server_config(server_dir, tls=True, broker_tls_listen=f"127.0.0.1:{free_port()}",
                                       rollout_interval_s=0.2)).start()
    handle = ServerHandle(server)
    agent_proc = None
    cgroup = MemoryCgroup(CAP_BYTES)
    stop_traffic = threading.Event()
    log = tmp_path / "agent.log"
    try:
        wait_until(lambda: server.ingest.connected.is_set(), 10, message="ingest connected")
        ca = server.config.tls_files[2]
        api = requests.Session()
        api.trust_env = False  # a REQUESTS_CA_BUNDLE in the environment would replace the pinned CA
        api.verify = str(ca)
        api.headers["Authorization"] = f"Bearer {handle.token('operator')}"
        url = server.url
        assert api.post(f"{url}/api/v1/keys", json={"pem": public_pem()}, timeout=30).status_code == 201
        for version in ("1.0.0", "2.0.0"):
            r = api.post(f"{url}/api/v1/models", data=bundle_bytes("lr", version), timeout=60)
            assert r.status_code == 201, r.text

        # Provisioned through the API as an operator would; the config names mqtts:// and https://.
        port = free_port()
        r = api.post(f"{url}/api/v1/devices", timeout=30, json={
            "id": "pi-arm64", "data_dir": "/var/lib/edgefleet", "listen": f"127.0.0.1:{port}", "window_s": 1.0})
        assert r.status_code == 201, r.text
        text = r.json()["agent_config"]
        assert "mqtts://" in text and "https://" in text
        etc = device.host("/etc/edgefleet")
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "agent.toml").write_text(text + SLOW_DEVICE_UPDATE)
        shutil.copyfile(ca, etc / "edgefleet-ca.pem")
        install_active(device.host("/var/lib/edgefleet"), bundle_bytes("lr", "1.0.0"))

        with open(log, "wb") as out:
            agent_proc = device.popen([f"{VENV}/bin/edgefleet", "agent", "run", "--config", "/etc/edgefleet/agent.toml"],
                                      cgroup=cgroup, stdout=out, stderr=out)
        base = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            assert agent_proc.poll() is None, f"the agent exited {agent_proc.returncode}:\n{_log_tail(log)}"
            try:
                return requests.get(f"{base}/v1/health", timeout=5).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(healthy, 300, interval=0.5, message=lambda: f"the emulated agent serves\n{_log_tail(log)}")
        # The agent (under qemu-aarch64) is in the capped cgroup.
        assert cgroup.limit_bytes() == CAP_BYTES
        assert cgroup.pids(), "no process in the 512 MB cgroup"

        # Predictions over the HTTP API match onnxruntime on the host.
        X, _ = dataset()
        rows = X[:40]
        answer = requests.post(f"{base}/v1/predict", json={"rows": rows.tolist()}, timeout=30).json()
        assert answer["version"] == "1.0.0"
        assert answer["predictions"] == onnx_predict(bundle_bytes("lr", "1.0.0"), rows)
        np.testing.assert_allclose(answer["probabilities"], _host_probabilities(rows), atol=1e-5)

        # Telemetry reaches the server and is stored; the device reports aarch64.
        def device_row():
            return api.get(f"{url}/api/v1/devices/pi-arm64", timeout=30).json()["device"]

        wait_until(lambda: (device_row().get("delivery") or {}).get("received", 0) >= 1, 120, interval=0.5,
                   message=lambda: f"telemetry stored: {device_row()}\n{_log_tail(log)}")
        row = device_row()
        assert row["active_version"] == "1.0.0" and row["status"] == "online"
        assert "aarch64" in json.dumps(row), row

        # A rollout of 2.0.0: downloaded over HTTPS, verified, SelfTest, Activate, Probation, Commit.
        def traffic() -> None:
            i = 0
            while not stop_traffic.is_set():
                batch = X[(i * 10) % 1000:(i * 10) % 1000 + 10].tolist()
                i += 1
                try:
                    requests.post(f"{base}/v1/predict", json={"rows": batch}, timeout=30)
                except requests.RequestException:
                    stop_traffic.wait(0.2)

        threading.Thread(target=traffic, daemon=True).start()
        r = api.post(f"{url}/api/v1/rollouts", timeout=30, json={
            "model": "demo", "version": "2.0.0", "target": {"all": True}, "gates": GATES,
            "stages": [{"percent": 100, "mode": "live", "min_soak_s": 0.5}]})
        assert r.status_code == 201, r.text
        rid = r.json()["rollout"]["id"]

        def rollout_state() -> str:
            return api.get(f"{url}/api/v1/rollouts/{rid}", timeout=30).json()["rollout"]["state"]

        wait_until(lambda: rollout_state() in ("completed", "paused", "aborted"), 600, interval=1.0,
                   message=lambda: f"rollout finished: {rollout_state()}\n{_log_tail(log)}")
        assert rollout_state() == "completed"
        model = wait_until(lambda: (m := requests.get(f"{base}/v1/model", timeout=30).json())["version"] == "2.0.0"
                           and m, 120, interval=0.5, message="the agent serves 2.0.0")
        assert model["update_outcome"] == "success", model
        events = api.get(f"{url}/api/v1/devices/pi-arm64/events", timeout=30).json()
        states = json.dumps(events)
        for state in ("SelfTest", "Probation", "Commit"):
            assert state in states, f"{state} missing from the device's events"
        stop_traffic.set()
        assert stop(agent_proc) == 0, _log_tail(log)
        peak = cgroup.peak_bytes()
        assert peak is None or peak <= CAP_BYTES
    finally:
        stop_traffic.set()
        if agent_proc is not None:
            stop(agent_proc)
        cgroup.remove()
        server.stop()


def _host_probabilities(rows: np.ndarray):
    import onnxruntime as ort

    from model_tools.bundle import read_bundle

    bundle = read_bundle(bundle_bytes("lr", "1.0.0"), require_signature=False)
    sess = ort.InferenceSession(bundle.model_bytes, providers=["CPUExecutionProvider"])
    spec = bundle.manifest.onnx_inputs[0]
    return sess.run([bundle.manifest.outputs.probabilities], {spec.name: rows.astype(np.float32)})[0]


@pytest.mark.timeout(1800)  # pip under emulation installs the 13 wheels in several minutes
def test_install_command_from_add_device_installs_the_agent_on_arm64(arm64_root, arm64_wheelhouse, tmp_path):
    """The line `edgefleet server add-device` prints, run on a fresh arm64 device: curl fetches
    the installer over HTTPS with the pinned CA, the installer downloads and checks the aarch64
    wheelhouse, creates /opt/edgefleet/venv and installs with pip --no-index under emulation."""
    from fleet_server.device_install import install_command, wheelhouse_dir

    server_dir = tmp_path / "server"
    init_tls(server_dir)
    shutil.copytree(arm64_wheelhouse, wheelhouse_dir(server_config(server_dir)) / arm64_wheelhouse.name)
    server = FleetServer(server_config(server_dir, tls=True, broker_tls_listen=f"127.0.0.1:{free_port()}")).start()
    device = Device.create(arm64_root, tmp_path)
    try:
        handle = ServerHandle(server)
        wait_until(lambda: server.ingest.connected.is_set(), 10, message="ingest connected")
        api = requests.Session()
        api.trust_env = False
        api.verify = str(server.config.tls_files[2])
        api.headers["Authorization"] = f"Bearer {handle.token('operator')}"
        r = api.post(f"{server.url}/api/v1/devices", json={"id": "pi-new"}, timeout=30)
        assert r.status_code == 201, r.text
        body = r.json()
        etc = device.host("/etc/edgefleet")
        etc.mkdir(parents=True)
        (etc / "agent.toml").write_text(body["agent_config"])
        shutil.copyfile(server.config.tls_files[2], etc / "edgefleet-ca.pem")
        # The device's user is root here: sudo runs the command as it is.
        sudo = device.host("/usr/local/bin/sudo")
        sudo.write_text('#!/bin/sh\nexec "$@"\n')
        sudo.chmod(0o755)
        command = install_command(server.config, "pi-new", body["password"])
        result = device.run(["/bin/sh", "-c", command], timeout=1800)
        assert "sha256 checked" in result.stdout and "installed: /opt/edgefleet/venv/bin/edgefleet" in result.stdout
        keys = device.run(["/opt/edgefleet/venv/bin/edgefleet", "agent", "config-keys"])
        assert "mqtt.url" in keys.stdout
        arch = device.run(["/opt/edgefleet/venv/bin/python", "-c",
                           "import platform, onnxruntime; print(platform.machine(), onnxruntime.__version__)"])
        assert arch.stdout.startswith("aarch64 ")
    finally:
        device.cleanup()
        server.stop()
