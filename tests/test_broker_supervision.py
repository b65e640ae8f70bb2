"""The managed broker under faults, with the real server, Mosquitto and paho: killed with -9 it is
started again (logged, counted in /metrics) and every retained desired state equals the database
again even where the broker restored an older one from its last save; a message larger than the
broker's limit is dropped by the broker, one at the limit passes."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import paho.mqtt.client as mqtt
import pytest
import requests

from edge_agent.protocol import MAX_PAYLOAD_BYTES, decode
from fleet_server import registry
from fleet_server.broker import MESSAGE_SIZE_LIMIT
from fleet_server.desired import publish_desired
from fleet_server.mqtt_link import make_client
from tests.server_fixtures import DeviceClient, make_bundle, wait_until

pytest_plugins = ["tests.server_fixtures"]
pytestmark = [pytest.mark.broker]


class RetainedDesired:
    """Reads the broker's retained `desired` of every device, as the server account."""

    def __init__(self, config) -> None:
        self.seen: dict[str, bytes] = {}
        self.lock = threading.Lock()
        self.client, kwargs = make_client(config, f"test-retained-{os.getpid()}-{id(self)}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"ef/{config.fleet}/d/+/desired", qos=1)
        self.client.on_message = self._on_message
        self.client.connect(**kwargs)
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        # Retained copies on subscribing, then live publishes (flagged not retained to a
        # subscriber, but each replaces the broker's retained copy).
        with self.lock:
            self.seen[message.topic.split("/")[3]] = message.payload

    def versions(self) -> dict[str, str]:
        with self.lock:
            return {d: decode("desired", p).version for d, p in self.seen.items() if p}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _saved(broker_dir, before: float) -> bool:
    db = broker_dir / "mosquitto.db"
    return db.exists() and db.stat().st_mtime_ns > before


def test_a_killed_broker_is_restarted_and_its_retained_desired_equals_the_database(fleet, signing_key, caplog):
    svc = fleet.svc
    private, pub = signing_key
    fleet.api("post", "/api/v1/keys", json={"pem": pub.read_text()})
    for version in ("1.0.0", "2.0.0"):
        assert fleet.api("post", "/api/v1/models", data=make_bundle(private, version=version)).status_code == 201
    devices = [f"kb-{i}" for i in range(3)]
    for d in devices:
        fleet.provision(d)
        assert publish_desired(svc, d, registry.desired_state(svc, "pump", "1.0.0"))
    # The broker saves its state (retained 1.0.0 everywhere), as its autosave would...
    db = svc.broker.dir / "mosquitto.db"
    before = db.stat().st_mtime_ns if db.exists() else 0
    os.kill(svc.broker.pid, signal.SIGUSR1)
    wait_until(lambda: _saved(svc.broker.dir, before), 10, message="the broker's persistence file saved")
    # ...then two devices are told 2.0.0, and the broker dies before its next save.
    for d in devices[:2]:
        assert publish_desired(svc, d, registry.desired_state(svc, "pump", "2.0.0"))
    old_pid = svc.broker.pid
    connects = svc.publisher.connects
    with caplog.at_level(logging.INFO, logger="fleet_server.broker"):
        killed = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        wait_until(lambda: svc.broker.restarts == 1 and svc.broker.alive() and svc.broker.pid != old_pid, 20,
                   message="the managed broker started again")
        listening = time.monotonic() - killed
        wait_until(lambda: svc.publisher.connects > connects, 20, message="the publisher reconnected")
        expected = {d: row["version"] for d, row in svc.storage.device_desired().items()}
        assert expected == {"kb-0": "2.0.0", "kb-1": "2.0.0", "kb-2": "1.0.0"}
        reader = RetainedDesired(fleet.config)
        try:
            wait_until(lambda: reader.versions() == expected, 20,
                       message=lambda: f"retained {reader.versions()} == database {expected}")
        finally:
            reader.close()
        wait_until(lambda: any("republished" in m for m in caplog.messages), 10)
        print(f"kill -9 -> broker listening again after {listening:.2f}s; "
              f"retained desired equal to the database after {time.monotonic() - killed:.2f}s")
    assert any("died" in m for m in caplog.messages) and any("runs again" in m for m in caplog.messages)
    metrics = requests.get(fleet.url + "/metrics", timeout=10).text
    assert "edgefleet_broker_restarts_total 1.0" in metrics, [line for line in metrics.splitlines() if "broker" in line]


def test_devices_log_in_to_a_restarted_broker(fleet):
    password = fleet.provision("kb-login")
    old_pid = fleet.svc.broker.pid
    os.kill(old_pid, signal.SIGKILL)
    wait_until(lambda: fleet.svc.broker.restarts == 1, 20, message="the managed broker listening again")
    dev = DeviceClient(fleet.config, "kb-login", password).wait_connected(10)
    assert dev.connected.is_set() and not dev.refused
    dev.close()


def test_a_message_over_the_size_limit_is_dropped_by_the_broker(fleet):
    """A device's publish one byte over the broker's limit (twice the protocol's payload limit)
    reaches nobody; the next one, exactly at the limit, reaches the server, whose ingest counts it
    as `oversized` for the device."""
    assert MESSAGE_SIZE_LIMIT == 2 * MAX_PAYLOAD_BYTES
    assert f"message_size_limit {MESSAGE_SIZE_LIMIT}" in fleet.svc.broker.conf_path.read_text()
    config = fleet.config
    password = fleet.provision("big-1")
    received: list[int] = []
    watcher, kwargs = make_client(config, "test-size-watcher")
    subscribed = threading.Event()
    watcher.on_connect = lambda c, u, f, rc, p: c.subscribe(f"ef/{config.fleet}/d/big-1/telemetry", qos=1)
    watcher.on_subscribe = lambda *a: subscribed.set()
    watcher.on_message = lambda c, u, m: received.append(len(m.payload))
    watcher.connect(**kwargs)
    watcher.loop_start()
    dev = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="big-1", protocol=mqtt.MQTTv5)
    dev.username_pw_set("big-1", password)
    connected = threading.Event()
    dev.on_connect = lambda c, u, f, rc, p: connected.set()
    dev.connect(config.broker_host, config.broker_port)
    dev.loop_start()
    topic_name = f"ef/{config.fleet}/d/big-1/telemetry"
    try:
        assert subscribed.wait(5) and connected.wait(5)
        # QoS 0: Mosquitto drops it without an answer (at QoS 1 it answers PUBACK 0x95, which
        # paho 2.1 cannot parse and disconnects on).
        dev.publish(topic_name, b"x" * (MESSAGE_SIZE_LIMIT + 1), qos=0).wait_for_publish(5)
        dev.publish(topic_name, b"y" * MESSAGE_SIZE_LIMIT, qos=1).wait_for_publish(5)
        wait_until(lambda: received, 10, message="the message at the limit")
        assert received == [MESSAGE_SIZE_LIMIT]  # in order: the larger one, sent first, never came
        wait_until(lambda: any(r["reason"] == "oversized" and r["device"] == "big-1"
                               for r in fleet.svc.storage.reject_counts()), 10, message="ingest counted it")
    finally:
        dev.disconnect()
        dev.loop_stop()
        watcher.disconnect()
        watcher.loop_stop()


def worst_case_window(features: int, classes: int = 2, rows: int = 16, bins: int = 11):
    """A telemetry window with every field filled and every number at its longest: counts of 13
    digits, full-precision floats, 16 sampled rows, feedback for four versions, shadow counts, the
    label-free estimate, reconstruction sums and refused rows."""
    import random

    from edge_agent.protocol import (
        LATENCY_EDGES_MS,
        FeatureCounts,
        Feedback,
        Histogram,
        PerformanceEstimate,
        QualityCounts,
        ReconstructionSums,
        RefusedRows,
        Resources,
        SampleRow,
        ShadowCounts,
        TelemetryWindow,
    )

    big = 2**40 + 12345
    r = random.Random(0)

    def counts(n: int) -> FeatureCounts:
        return FeatureCounts(bins=[big] * n, nan=big, below_min=big, above_max=big, unseen=big)

    def feedback() -> Feedback:
        return Feedback(version="v" * 64, joined=big, unknown_label=big, late=big, unknown=big, duplicate=big,
                        rejected=big, confusion=[[big] * classes for _ in range(classes)], abs_error_sum=1e300,
                        sq_error_sum=1e300, error_bins=[big] * 9, calibration_counts=[big] * 10,
                        calibration_hits=[big] * 10, calibration_prob_sum=[r.random() * 1e9 for _ in range(10)])

    latency = Histogram(counts=[big] * (len(LATENCY_EDGES_MS) + 1), sum_ms=1e300)
    return TelemetryWindow(
        device="d" * 64, seq=2**53, model="m" * 64, model_version="v" * 64, window_start=1.7e9 + 0.123456789,
        window_end=1.7e9 + 60.123456789, sent_at=1.7e9, predictions=big, requests=big,
        errors={k: big for k in ("validation", "runtime", "too_many_rows", "schema")}, latency=latency,
        features=[counts(bins) for _ in range(features)], prediction=counts(classes + 1),
        shadow=ShadowCounts(version="v" * 64, compared=big, agreed=big, errors=big, latency=latency,
                            prediction=counts(classes + 1)),
        sample=[SampleRow(x=[r.random() * -1e-300 for _ in range(features)], y=r.random()) for _ in range(rows)],
        feedback=feedback(), feedback_other=[feedback() for _ in range(3)],
        resources=Resources(cpu_s=1e9, rss_bytes=big, disk_free_bytes=big), dropped_total=big,
        estimate=PerformanceEstimate(rows=big, predicted=[big] * classes,
                                     confusion=[[r.random() for _ in range(classes)] for _ in range(classes)],
                                     confidence_sq_sum=1e300, score_counts=[big] * 20,
                                     score_positive=[r.random() for _ in range(20)]),
        multivariate=ReconstructionSums(rows=big, sum=1e300, sum_sq=1e300, bins=[big] * 11, filled=big),
        refused=RefusedRows(rows=big, malformed=big, features=[
            QualityCounts(nan=big, below_min=big, above_max=big, wrong_type=big, unseen=big) for _ in range(features)]),
    )


def test_the_largest_legitimate_message_fits_below_the_limits():
    """The bound docs/fleet-server.md states: a worst-case window is about 9 KB plus 0.67 KB per
    input feature, inside the protocol's 256 KiB up to some 370 features and far inside the broker's."""
    from edge_agent.protocol import encode

    sizes = {n: len(encode(worst_case_window(n))) for n in (3, 100, 370)}
    print("worst-case telemetry window bytes by feature count:", sizes)
    assert sizes[3] < 10_000 and sizes[100] < 80_000
    assert sizes[370] < MAX_PAYLOAD_BYTES < MESSAGE_SIZE_LIMIT
    per_feature = (sizes[370] - sizes[3]) / 367
    assert 600 < per_feature < 700, per_feature
