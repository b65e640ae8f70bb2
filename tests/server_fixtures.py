"""Fixtures and builders for fleet server tests: a whole server in-process, device clients, bundles.

Import the fixtures into a test module with `from tests.server_fixtures import *  # noqa`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import requests
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.protocol import (
    LATENCY_EDGES_MS,
    FeatureCounts,
    Histogram,
    TelemetryWindow,
    encode,
    topic,
)
from fleet_server.auth import new_token, token_hash
from fleet_server.config import ServerConfig
from fleet_server.devices import provision_device
from fleet_server.service import FleetServer
from model_tools.binning import count_numeric, quantile_edges
from model_tools.bundle import write_bundle
from model_tools.manifest import (
    BinnedDistribution,
    FeatureProfile,
    FeatureSpec,
    Manifest,
    OnnxInput,
    OutputSpec,
    ReferenceProfile,
    RuntimeBudget,
)
from model_tools.signing import generate_keypair, save_public_key
from tests.brokers import free_port, wait_until
from tests.postgres_fixtures import server_storage_url

__all__ = [
    "DeviceClient",
    "ServerHandle",
    "fleet",
    "make_bundle",
    "make_config",
    "shifted_window",
    "signing_key",
    "wait_until",
]


def make_config(data_dir: Path, **overrides: Any) -> ServerConfig:
    """A config for tests: free ports, one-second buckets, fast loops, a small alert policy."""
    values: dict[str, Any] = {
        "listen": f"127.0.0.1:{free_port()}",
        "broker_port": free_port(),
        "bucket_s": 1.0,
        "bucket_grace_s": 0.3,
        "alert_interval_s": 0.2,
        "broker_sync_interval_s": 0.2,
        "stats_interval_s": 0.2,
        "ack_interval_s": 0.1,
        "min_predictions": 100,
        "consecutive": 2,
        "webhook_retries": 1,
        "threads": 4,
    }
    values.update(overrides)
    return ServerConfig(data_dir=data_dir, **values)


def connected(server: FleetServer, what: str = "ingest connected") -> FleetServer:
    """`server` (started) once its ingest is connected to the broker; stopped if it never is, so
    that a failed setup leaves nothing running."""
    try:
        wait_until(lambda: server.ingest.connected.is_set(), 10, message=what)
    except BaseException:
        server.stop()
        raise
    return server


@dataclass
class ServerHandle:
    """A running FleetServer plus helpers: tokens, provisioning, an HTTP session."""

    server: FleetServer
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def svc(self):
        return self.server.svc

    @property
    def config(self) -> ServerConfig:
        return self.server.config

    @property
    def url(self) -> str:
        return self.server.url

    def token(self, role: str = "operator") -> str:
        if role not in self.tokens:
            t = new_token()
            self.svc.storage.insert_token(f"test-{role}", role, token_hash(t), time.time())
            self.tokens[role] = t
        return self.tokens[role]

    def api(self, method: str, path: str, role: str = "operator", **kwargs: Any) -> requests.Response:
        headers = kwargs.pop("headers", {})
        if role:
            headers["Authorization"] = f"Bearer {self.token(role)}"
        return requests.request(method, self.url + path, headers=headers, timeout=10, **kwargs)

    def provision(self, device_id: str, tags: dict[str, str] | None = None) -> str:
        """Create a device; returns its password."""
        return provision_device(self.svc, device_id, tags or {}).password


@pytest.fixture
def fleet(request, tmp_path, backend):
    """The whole server (managed Mosquitto, API, ingest, loops) on free ports, for one test, on the
    `backend` fixture's storage."""
    storage_url = server_storage_url(request, backend)
    if storage_url:  # CLI commands a test runs on the data dir open the same database
        request.getfixturevalue("monkeypatch").setenv("EDGEFLEET_STORAGE_URL", storage_url)
    config = make_config(tmp_path / "server", storage_url=storage_url)
    server = FleetServer(config).start()
    try:  # stopped when its setup fails too: a server left running loads every later test
        handle = ServerHandle(server)
        wait_until(lambda: server.ingest.connected.is_set(), 10, message="ingest connected")
        yield handle
    finally:
        server.stop()


class DeviceClient:
    """A paho MQTT 5 client logged in with a device's credentials (what an agent does)."""

    def __init__(self, config: ServerConfig, device_id: str, password: str, fleet_name: str = "") -> None:
        self.device_id = device_id
        self.fleet = fleet_name or config.fleet
        self.received: list[mqtt.MQTTMessage] = []
        self.connected = threading.Event()
        self.refused: list[str] = []
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5
        )
        self.client.username_pw_set(device_id, password)
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, m: self.received.append(m)
        self.client.connect(config.broker_host, config.broker_port)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.refused.append(str(reason_code))
        else:
            self.connected.set()

    def wait_connected(self, timeout: float = 5.0) -> DeviceClient:
        wait_until(lambda: self.connected.is_set() or self.refused, timeout, message="device connect")
        return self

    def topic(self, kind: str, device: str | None = None) -> str:
        return topic(self.fleet, device or self.device_id, kind)  # type: ignore[arg-type]

    def publish(self, kind: str, payload: bytes | Any, device: str | None = None, retain: bool = False):
        data = payload if isinstance(payload, bytes) else encode(payload)
        info = self.client.publish(self.topic(kind, device), data, qos=1, retain=retain)
        info.wait_for_publish(5)
        return info

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# ------------------------------------------------------------------ bundles and windows

FEATURES = ("temperature", "temp/humidity ratio", "vibration")


def reference_data(rows: int = 5000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(rows, len(FEATURES)))


@pytest.fixture
def signing_key(tmp_path):
    private, public = generate_keypair()
    path = save_public_key(public, tmp_path / "signer.pub")
    return private, path


def make_bundle(private_key, name: str = "pump", version: str = "1.0.0", rows: int = 5000) -> bytes:
    """A signed bundle with a real reference profile (the ONNX member is a placeholder: the server
    never runs models)."""
    ref = reference_data(rows)
    features, inputs = [], []
    for i, fname in enumerate(FEATURES):
        col = ref[:, i]
        edges = quantile_edges(col)
        dist = count_numeric(col, edges, float(col.min()), float(col.max()))
        features.append(
            FeatureProfile(
                name=fname, kind="numeric", distribution=dist, min=float(col.min()), max=float(col.max()),
                mean=float(col.mean()), std=float(col.std()),
            )
        )
        inputs.append(FeatureSpec(name=fname, kind="numeric", dtype="float32", min=float(col.min()), max=float(col.max())))
    pred = count_numeric(ref[:, 0] > 0, [0.5])
    pred = BinnedDistribution(categories=["0", "1"], counts=[pred.counts[0], pred.counts[1], 0])
    manifest = Manifest(
        name=name,
        version=version,
        created_at="2026-01-01T00:00:00Z",
        task="classification",
        inputs=inputs,
        onnx_inputs=[OnnxInput(name="X", dtype="float32", columns=[0, 1, 2])],
        outputs=OutputSpec(label="label", classes=["0", "1"]),
        files={},
        profile=ReferenceProfile(rows=rows, features=features, prediction=pred),
        budget=RuntimeBudget(model_bytes=10, latency_ms_p50=0.1, latency_ms_p99=0.2, peak_memory_bytes=1000),
    )
    return write_bundle(None, manifest, b"not-really-onnx", {"input:X": ref[:4].astype(np.float32)}, private_key)


def window_from_rows(
    device: str, seq: int, rows: np.ndarray, edges: list[list[float]], *, model: str = "pump",
    version: str = "1.0.0", start: float | None = None, length: float = 0.2,
) -> TelemetryWindow:
    """A telemetry window counting `rows` into the given per-feature edges, as an agent would."""
    start = time.time() - length if start is None else start
    feats = []
    for i, e in enumerate(edges):
        d = count_numeric(rows[:, i], e)
        feats.append(FeatureCounts(bins=d.counts, nan=d.nan))
    positive = int((rows[:, 0] > 0).sum())
    latency = [0] * (len(LATENCY_EDGES_MS) + 1)
    latency[4] = len(rows)
    return TelemetryWindow(
        device=device,
        seq=seq,
        model=model,
        model_version=version,
        window_start=start,
        window_end=start + length,
        sent_at=time.time(),
        predictions=len(rows),
        requests=len(rows),
        latency=Histogram(counts=latency, sum_ms=0.3 * len(rows)),
        features=feats,
        prediction=FeatureCounts(bins=[len(rows) - positive, positive, 0]),
    )


def profile_edges(bundle_manifest: dict[str, Any]) -> list[list[float]]:
    return [f["distribution"]["edges"] for f in bundle_manifest["profile"]["features"]]


def shifted_window(device: str, seq: int, edges: list[list[float]], *, shift: float = 0.0, n: int = 300,
                   seed: int = 0, **kw: Any) -> TelemetryWindow:
    rng = np.random.default_rng(seed + seq)
    rows = rng.normal(size=(n, len(FEATURES)))
    rows[:, 0] += shift
    rows[:, 2] += shift
    return window_from_rows(device, seq, rows, edges, **kw)
