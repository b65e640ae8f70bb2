"""End to end through the real broker: three devices report, drift is computed per device, tag and
fleet, and only the device fed shifted data raises an alert (stored, on MQTT, on a signed webhook)."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from fleet_server.mqtt_link import alerts_topic, make_client
from fleet_server.webhooks import SIGNATURE_HEADER, verify_signature
from tests.postgres_fixtures import every_backend  # noqa: E402, F401 - alerts and webhooks on every backend
from tests.server_fixtures import (
    DeviceClient,
    make_bundle,
    profile_edges,
    shifted_window,
    wait_until,
)

pytest_plugins = ["tests.server_fixtures"]

pytestmark = [pytest.mark.broker, pytest.mark.slow]


class Hook(BaseHTTPRequestHandler):
    received: list[tuple[dict, bytes]] = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hook.received.append((dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook_receiver():
    Hook.received = []
    httpd = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}/hook", Hook.received
    httpd.shutdown()


def test_drift_alert_for_the_shifted_device_only(fleet, signing_key, webhook_receiver):
    private, pub = signing_key
    assert fleet.api("post", "/api/v1/keys", json={"pem": pub.read_text()}).status_code == 201
    assert fleet.api("post", "/api/v1/models", data=make_bundle(private)).status_code == 201
    manifest = fleet.api("get", "/api/v1/models/pump/1.0.0", "viewer").json()["model"]["manifest"]
    edges = profile_edges(manifest)
    hook_url, hook_calls = webhook_receiver
    secret = fleet.api("post", "/api/v1/webhooks", json={"url": hook_url}).json()["secret"]

    mqtt_alerts = []
    listener, kwargs = make_client(fleet.config, "test-alert-listener")
    listener.on_message = lambda c, u, m: mqtt_alerts.append(json.loads(m.payload))
    listener.on_connect = lambda c, u, f, rc, p: c.subscribe(alerts_topic(fleet.config.fleet), qos=1)
    listener.connect(**kwargs)
    listener.loop_start()

    devices = {"dev-0": ("a", 0.0), "dev-1": ("a", 0.0), "dev-2": ("b", 2.0)}
    clients = []
    for device_id, (site, _) in devices.items():
        clients.append(DeviceClient(fleet.config, device_id, fleet.provision(device_id, {"site": site})).wait_connected())
    try:
        # Windows dated in already-closed buckets, so the alert loop can judge them at once.
        base = math.floor(__import__("time").time()) - 10
        for k in range(4):
            for client in clients:
                shift = devices[client.device_id][1]
                w = shifted_window(client.device_id, k + 1, edges, shift=shift, n=300, seed=hash(client.device_id) % 100,
                                   start=base + k + 0.1, length=0.5)
                client.publish("telemetry", w)

        def device_alerts():
            alerts = fleet.api("get", "/api/v1/alerts", "viewer", params={"state": "open"}).json()["alerts"]
            return [a for a in alerts if a["scope"] == "device:dev-2" and a["severity"] == "alert"]

        # One pass opens the alerts one by one: wait for both shifted features, not the first.
        wait_until(lambda: {a["target"] for a in device_alerts()} >= {"temperature", "vibration"}, 15,
                   message=lambda: f"alerts for dev-2: {[a['target'] for a in device_alerts()]}")
        opened = device_alerts()
        assert "temp/humidity ratio" not in {a["target"] for a in opened}

        def scopes():
            return {a["scope"] for a in fleet.api("get", "/api/v1/alerts", "viewer").json()["alerts"]}

        wait_until(lambda: "tag:site=b" in scopes(), 10, message="alert for tag site=b")
        assert not scopes() & {"device:dev-0", "device:dev-1", "tag:site=a"}

        # Drift per cohort and over time agree: only dev-2 drifted.
        cohorts = fleet.api("get", "/api/v1/models/pump/1.0.0/drift/cohorts", "viewer").json()["cohorts"]
        psi = {c["scope"]: c["max_feature_psi"] for c in cohorts}
        assert psi["device:dev-2"] > 0.25 and psi["device:dev-0"] < 0.1 and psi["device:dev-1"] < 0.1
        by_tag = fleet.api("get", "/api/v1/models/pump/1.0.0/drift/cohorts", "viewer", params={"by": "tag:site"}).json()
        assert {c["scope"] for c in by_tag["cohorts"]} == {"tag:site=a", "tag:site=b"}
        timeline = fleet.api("get", "/api/v1/models/pump/1.0.0/drift/timeline", "viewer",
                             params={"scope": "device:dev-2"}).json()
        assert len(timeline["points"]) == 4 and timeline["features"][1]["name"] == "temp/humidity ratio"
        fleet_drift = fleet.api("get", "/api/v1/models/pump/1.0.0/drift", "viewer").json()
        assert fleet_drift["predictions"] == 4 * 3 * 300 and fleet_drift["devices"] == 3
        summary = fleet.api("get", "/api/v1/telemetry/summary", "viewer", params={"group_by": "device"}).json()
        assert {s["device"] for s in summary["summary"]} == set(devices)
        assert summary["summary"][0]["latency_ms"]["p99"] is not None

        # Notifications: a signed webhook and an MQTT message per transition.
        wait_until(lambda: any(json.loads(b)["alert"]["scope"] == "device:dev-2" for _, b in hook_calls), 10)
        headers, body = hook_calls[0]
        assert verify_signature(body, secret.encode(), headers.get(SIGNATURE_HEADER))
        wait_until(lambda: any(m["alert"]["scope"] == "device:dev-2" for m in mqtt_alerts), 10)

        ack = fleet.api("post", f"/api/v1/alerts/{opened[0]['id']}/ack").json()["alert"]
        assert ack["acknowledged_by"] == "test-operator" and ack["acknowledged_at"]
    finally:
        for c in clients:
            c.close()
        listener.loop_stop()
        listener.disconnect()
