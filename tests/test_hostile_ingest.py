"""Hostile MQTT payloads through the real managed Mosquitto, as an authenticated device, on every
device topic: malformed, truncated, huge, deeply nested and wrong-typed. Ingest keeps running (a
valid window sent afterwards is stored) and counts every reject by reason."""

from __future__ import annotations

import json
import random

import pytest

from edge_agent.protocol import MAX_PAYLOAD_BYTES, encode
from tests.postgres_fixtures import db_rows, every_backend  # noqa: F401 - every backend
from tests.server_fixtures import DeviceClient, shifted_window, wait_until

pytest_plugins = ["tests.server_fixtures"]
pytestmark = [pytest.mark.broker, pytest.mark.slow]

EDGES = [[-1.0, 0.0, 1.0]] * 3
TOPICS = ("telemetry", "events", "reported", "status")


def hostile_payloads(device: str) -> list[bytes]:
    """Every class of bad payload, built from a valid window so that some are nearly valid."""
    rng = random.Random(7)
    valid = encode(shifted_window(device, 1, EDGES))
    doc = json.loads(valid)
    out = [
        b"", b"{", b"null", b"[]", b"42", b'"text"', b"\xff\xfe\xfa", "{\"v\": 1, \"device\": \"\u2603\"}".encode(),
        valid[: len(valid) // 2],                                     # truncated
        b"[" * 100_000 + b"]" * 100_000,                              # deep nesting (200 KB)
        b'{"v": 1, "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b"x" * (MAX_PAYLOAD_BYTES + 1),                               # over the size limit
        b'{"v": ' + b"9" * 5000 + b"}",                               # a huge number
        json.dumps({**doc, "v": 99}).encode(),                        # unsupported version
        json.dumps({**doc, "seq": "one"}).encode(),                   # wrong types
        json.dumps({**doc, "seq": -1}).encode(),
        json.dumps({**doc, "seq": 2**70}).encode(),
        json.dumps({**doc, "predictions": 1e308, "seq": 5}).encode(),
        json.dumps({**doc, "features": "all", "seq": 6}).encode(),
        json.dumps({**doc, "features": [{"bins": [1] * 10_000}], "seq": 7}).encode(),
        json.dumps({**doc, "device": "another-device", "seq": 8}).encode(),
        json.dumps({**doc, "latency": {"counts": [-5], "sum_ms": "x"}, "seq": 9}).encode(),
        json.dumps({**doc, "window_end": float("inf"), "seq": 10}).encode().replace(b"Infinity", b"1e999"),
        json.dumps({**doc, "extra": {"nested": [[[{}]]]}, "seq": 11}).encode(),
    ]
    for _ in range(20):  # random byte flips of a valid window
        b = bytearray(valid)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        out.append(bytes(b))
    return out


def test_ingest_survives_hostile_payloads_on_every_topic_and_counts_rejects(fleet):
    pw = fleet.provision("dev-h")
    dev = DeviceClient(fleet.config, "dev-h", pw).wait_connected()
    try:
        payloads = hostile_payloads("dev-h")
        for kind in TOPICS:
            for payload in payloads:
                dev.publish(kind, payload)
        # Afterwards a valid window is stored: ingest kept running.
        dev.publish("telemetry", shifted_window("dev-h", 100, EDGES))

        def stored():
            return {r[0] for r in db_rows(fleet.svc.storage, "SELECT seq FROM windows WHERE device = 'dev-h'")}

        wait_until(lambda: 100 in stored(), 20, message="valid window after the hostile ones")
        assert fleet.server.ingest.connected.is_set()
        rejects = {}
        for r in fleet.svc.storage.reject_counts():
            if r["device"] == "dev-h":
                rejects[r["reason"]] = rejects.get(r["reason"], 0) + r["count"]
        for reason in ("malformed", "invalid", "oversized", "unsupported_version", "device_mismatch"):
            assert rejects.get(reason), (reason, rejects)
        # Nothing that was refused was stored as a window (a random flip may still be a valid one).
        assert stored() <= {1, 5, 6, 8, 11, 100} | set(range(1, 100)), stored()
        stats = fleet.api("get", "/api/v1/ingest/stats", "viewer").json()
        assert stats["workers"] and stats["rejects"]
    finally:
        dev.close()
