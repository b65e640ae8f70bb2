"""Helpers for agent tests: small signed bundles, a bundle HTTP server, MQTT publish/collect,
agent configs, and the agent as a subprocess."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives import serialization
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.config import (
    AgentConfig,
    FeedbackConfig,
    HttpConfig,
    MqttConfig,
    OutboxConfig,
    TelemetryConfig,
    TrustConfig,
    UpdateConfig,
)
from edge_agent.protocol import DeliveryAck, DesiredState, decode, encode, parse_topic, topic
from tests.brokers import wait_until

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "device-secret"
N_FEATURES = 6


# ---------------------------------------------------------------- keys and bundles


_KEYS: dict[str, Any] = {}


def keypair(name: str = "trusted"):
    """A session-wide key pair per name ("trusted" is in every test config)."""
    from model_tools.signing import generate_keypair

    if name not in _KEYS:
        _KEYS[name] = generate_keypair()
    return _KEYS[name]


def public_pem(name: str = "trusted") -> str:
    return keypair(name)[1].public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


@cache
def dataset(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_classification

    return make_classification(n_samples=1200, n_features=N_FEATURES, n_informative=4, random_state=seed)


@cache
def estimator(kind: str):
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.tree import DecisionTreeClassifier

    X, y = dataset()
    if kind == "lr":
        return make_pipeline(StandardScaler(), LogisticRegression()).fit(X, y)
    if kind == "rf":
        return RandomForestClassifier(n_estimators=10, max_depth=5, random_state=0).fit(X, y)
    if kind == "stump":  # disagrees with "lr" on a sizeable, exactly computable share
        return DecisionTreeClassifier(max_depth=1, random_state=0).fit(X, y)
    raise ValueError(kind)


@cache
def bundle_bytes(kind: str = "lr", version: str = "1.0.0", signer: str | None = "trusted", name: str = "demo") -> bytes:
    """A small signed bundle built by model_tools.pipeline.build_bundle (cached per session)."""
    from model_tools.pipeline import build_bundle

    X, y = dataset()
    key = keypair(signer)[0] if signer else None
    result = build_bundle(estimator(kind), (X[:800], y[:800]), validation=(X[800:], y[800:]),
                          name=name, version=version, quantize="float32", sign_key=key)
    return result.bundle_bytes


@cache
def regression_dataset(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_regression

    return make_regression(n_samples=1200, n_features=N_FEATURES, n_informative=4, noise=10.0, random_state=seed)


@cache
def regression_bundle_bytes(version: str = "1.0.0", name: str = "demo-reg") -> bytes:
    """A small signed ridge-regression bundle (same six numeric inputs as the classifiers)."""
    from sklearn.linear_model import Ridge

    from model_tools.pipeline import build_bundle

    X, y = regression_dataset()
    result = build_bundle(Ridge(alpha=1.0).fit(X[:800], y[:800]), (X[:800], y[:800]), validation=(X[800:], y[800:]),
                          name=name, version=version, quantize="float32", sign_key=keypair()[0])
    return result.bundle_bytes


def manifest_of(data: bytes):
    from model_tools.bundle import read_bundle

    return read_bundle(data, require_signature=False).manifest


def onnx_predict(data: bytes, rows: np.ndarray) -> list[Any]:
    """Labels straight from onnxruntime (the test's independent reference)."""
    import onnxruntime as ort

    from model_tools.bundle import read_bundle

    bundle = read_bundle(data, require_signature=False)
    sess = ort.InferenceSession(bundle.model_bytes, providers=["CPUExecutionProvider"])
    spec = bundle.manifest.onnx_inputs[0]
    label = bundle.manifest.outputs.label
    return sess.run([label], {spec.name: rows.astype(np.float32 if spec.dtype == "float32" else np.float64)})[0].tolist()


def install_active(data_dir: Path, data: bytes) -> str:
    """Put a bundle in place as the committed active model (as if an update had finished)."""
    from edge_agent.store import DataDir
    from model_tools.bundle import extract_bundle

    d = DataDir(data_dir).create()
    bundle = extract_bundle(data, d.version_dir(manifest_of(data).version), [keypair()[1]])
    d.commit(bundle.manifest.version, None)
    return bundle.manifest.version


# ---------------------------------------------------------------- bundle server


@dataclass
class BundleServer:
    """A stdlib HTTP server for bundles, with Basic auth and Range, like the fleet server's."""

    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    truncate_once: set[str] = field(default_factory=set)  # first GET of these stops halfway

    def start(self) -> BundleServer:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                rng = self.headers.get("Range")
                outer.requests.append((name, rng))
                auth = self.headers.get("Authorization", "")
                expected = "Basic " + base64.b64encode(f"{name.split('/')[0]}:{PASSWORD}".encode()).decode()
                if auth != expected:
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = outer.files.get(name.split("/", 1)[1] if "/" in name else name)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                if rng and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                cut = name in outer.truncate_once
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest()[:16] + '"')
                self.end_headers()
                if cut:
                    outer.truncate_once.discard(name)
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, name: str, data: bytes) -> str:
        self.files[name] = data
        return name

    def desired(self, device: str, name: str, data: bytes | None = None, *, sha_of: bytes | None = None,
                **kw: Any) -> DesiredState:
        """Serve `data` as `name` and return a DesiredState pointing at it for `device`."""
        if data is not None:
            self.add(name, data)
        body = self.files[name]
        m = manifest_of(sha_of or body) if (sha_of or body)[:2] == b"PK" else None
        fields = dict(model=m.name if m else "demo", version=m.version if m else "9.9.9",
                      url=f"{self.base}/{device}/{name}", sha256=hashlib.sha256(sha_of or body).hexdigest(),
                      size=len(body))
        fields.update(kw)
        return DesiredState(**fields)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(name="bundle_server")
def bundle_server_fixture():
    s = BundleServer().start()
    yield s
    s.stop()


# ---------------------------------------------------------------- MQTT helpers


def _client(broker, client_id: str) -> mqtt.Client:
    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.connect(broker.host, broker.port)
    return c


def publish_desired(broker, device: str, desired: DesiredState | bytes, fleet: str = "default") -> None:
    """Publish a retained `desired` the way the fleet server does."""
    c = _client(broker, f"test-pub-{time.monotonic_ns()}")
    c.loop_start()
    payload = desired if isinstance(desired, bytes) else encode(desired)
    info = c.publish(f"ef/{fleet}/d/{device}/desired", payload, qos=1, retain=True)
    info.wait_for_publish(timeout=5)
    c.disconnect()
    c.loop_stop()


class Collector:
    """Subscribes to every device topic and keeps the decoded messages by kind."""

    def __init__(self, broker, client_id: str = "test-collector", ack: bool = False) -> None:
        self.ack = ack  # acknowledge telemetry and events as the fleet server does (DeliveryAck)
        self.messages: dict[str, list[Any]] = {"telemetry": [], "events": [], "reported": [], "status": []}
        self.lock = threading.Lock()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("ef/+/d/+/#", qos=1)
        self.subscribed = 0
        self.client.on_subscribe = self._on_subscribe
        self.broker = broker
        self.client.reconnect_delay_set(0.2, 1)
        # A persistent session: the broker queues what arrives while we are away (outage tests).
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect(broker.host, broker.port, clean_start=False, properties=props)
        self.client.loop_start()
        wait_until(lambda: self.client.is_connected(), 5, message="collector connected")

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self.subscribed += 1

    def _on_message(self, client, userdata, msg) -> None:
        fleet, device, kind = parse_topic(msg.topic)
        if kind in ("desired", "ack") or not msg.payload:
            return
        message = decode(kind, msg.payload)
        with self.lock:
            self.messages[kind].append(message)
        if self.ack and kind in ("telemetry", "events"):
            client.publish(topic(fleet, device, "ack"), encode(DeliveryAck(device=device, seqs=[message.seq])), qos=1)

    def get(self, kind: str) -> list[Any]:
        with self.lock:
            return list(self.messages[kind])

    def latest(self, kind: str):
        items = self.get(kind)
        return items[-1] if items else None

    def events(self, kind: str | None = None) -> list[Any]:
        """Update events once per seq, as the server counts them: with no server to acknowledge
        them, the agent sends unacknowledged messages again after a reconnect or restart."""
        seen: set[int] = set()
        out = []
        for e in self.get("events"):
            if e.seq not in seen and (kind is None or e.kind == kind):
                seen.add(e.seq)
                out.append(e)
        return out

    def chain(self) -> list[str]:
        """The update's state chain from transition events, deduplicated by seq."""
        seen, chain = set(), []
        for e in sorted(self.events("transition"), key=lambda e: e.seq):
            if e.seq in seen:
                continue
            seen.add(e.seq)
            if not chain:
                chain.append(e.from_state)
            chain.append(e.to_state)
        return chain

    def outcomes(self) -> list[str | None]:
        return [e.outcome for e in self.events("outcome")]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(name="collector")
def collector_fixture(broker):
    c = Collector(broker)
    yield c
    c.close()


# ---------------------------------------------------------------- agent configs and processes


def make_config(tmp_path: Path, broker=None, device: str = "dev-1", **kw: Any) -> AgentConfig:
    """A test config: short windows, quick probation, trusted test key, HTTP on a free port."""
    update = dict(probation_predictions=20, probation_s=1.0, download_timeout_s=30)
    update.update(kw.pop("update", {}))
    return AgentConfig(
        device_id=device,
        data_dir=str(tmp_path / f"agent-{device}"),
        mqtt=MqttConfig(url=broker.url if broker else "", password=PASSWORD),
        trust=TrustConfig(public_keys_pem=[public_pem()]),
        http=HttpConfig(listen=kw.pop("listen", "127.0.0.1:0"), **kw.pop("http", {})),
        telemetry=TelemetryConfig(**{"window_s": 0.5, **kw.pop("telemetry", {})}),
        update=UpdateConfig(**update),
        outbox=OutboxConfig(**kw.pop("outbox", {})),
        feedback=FeedbackConfig(**kw.pop("feedback", {})),
        **kw,
    )


def outbox_windows(agent) -> list[Any]:
    """The telemetry windows waiting in an agent's outbox (an agent without MQTT keeps them all)."""
    return [decode("telemetry", m.payload) for m in agent.outbox.pending(limit=100_000) if m.kind == "telemetry"]


def config_toml(config: AgentConfig) -> str:
    """The TOML text of a config (as the server's provisioning would print it)."""
    import dataclasses

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"""' + v + '"""' if "\n" in v else '"' + v + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines = [f"device_id = {value(config.device_id)}", f"fleet = {value(config.fleet)}",
             f"data_dir = {value(config.data_dir)}"]
    for f in dataclasses.fields(config):
        section = getattr(config, f.name)
        if dataclasses.is_dataclass(section):
            lines.append(f"\n[{f.name}]")
            lines += [f"{k} = {value(v)}" for k, v in dataclasses.asdict(section).items()]
    return "\n".join(lines) + "\n"


class AgentProcess:
    """`python -m edge_agent run --config ...` as a subprocess (kill -9 tests)."""

    def __init__(self, config: AgentConfig, path: Path) -> None:
        self.config = config
        self.path = path
        path.write_text(config_toml(config))
        self.proc: subprocess.Popen | None = None

    def start(self, fault: str | None = None) -> AgentProcess:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        env.pop("EDGEFLEET_FAULT", None)
        if fault:
            env["EDGEFLEET_FAULT"] = fault
        self.log = open(self.path.with_suffix(".log"), "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "run", "--config", str(self.path), "--log-level", "INFO"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        return self

    def wait_exit(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()
