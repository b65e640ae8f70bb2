"""End to end with real agents: three provisioned edge_agent Agents download a bundle from the
server, serve predictions, report telemetry over the managed broker; only the agent fed shifted
data raises a drift alert."""

from __future__ import annotations

import threading
import tomllib

import numpy as np
import pytest

from edge_agent import Agent
from edge_agent.config import config_from_dict
from fleet_server.desired import publish_desired
from fleet_server.devices import provision_device
from fleet_server.registry import desired_state, trust_key, upload_bundle
from tests.agent_fixtures import bundle_bytes, dataset, public_pem
from tests.server_fixtures import wait_until

pytest_plugins = ["tests.server_fixtures"]
pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_three_agents_report_and_only_the_shifted_one_alerts(fleet, tmp_path):
    svc = fleet.svc
    trust_key(svc, public_pem("trusted"))
    model = upload_bundle(svc, bundle_bytes("lr"))
    X, _ = dataset()
    agents: dict[str, Agent] = {}
    for i in range(3):
        device_id = f"agent-{i}"
        text = provision_device(svc, device_id, {"site": "b" if i == 2 else "a"}, window_s=0.25).agent_config
        data = tomllib.loads(text)
        data["data_dir"] = str(tmp_path / device_id)
        agents[device_id] = Agent(config_from_dict(data)).start()
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.05):
            for a in agents.values():
                a.tick()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        for device_id in agents:
            assert publish_desired(svc, device_id, desired_state(svc, model["name"], model["version"]))
        wait_until(lambda: all(a.active_version() == model["version"] for a in agents.values()), 60,
                   interval=0.1, message="agents downloaded and activated the bundle")
        rng = np.random.default_rng(0)

        def serve_until(predicate) -> None:
            while not predicate():
                for device_id, agent in agents.items():
                    rows = X[rng.integers(0, len(X), 100)].copy()
                    if device_id == "agent-2":
                        rows[:, 0] += 3.0
                        rows[:, 1] += 3.0
                    agent.predict(rows.tolist())
                stop.wait(0.05)

        def alerted():
            return [a for a in svc.storage.list_alerts(state="open") if a["scope"] == "device:agent-2"]

        serve_until(lambda: alerted())
        wait_until(lambda: any(a["scope"] == "tag:site=b" for a in svc.storage.list_alerts()), 10)
        scopes = {a["scope"] for a in svc.storage.list_alerts()}
        assert not scopes & {"device:agent-0", "device:agent-1", "tag:site=a"}
        targets = {a["target"] for a in alerted()}
        names = [f["name"] for f in model["features"]]
        assert {names[0], names[1]} & targets
        # The registry saw what the agents reported: versions, online state, update history.
        for device_id in agents:
            d = fleet.api("get", f"/api/v1/devices/{device_id}", "viewer").json()["device"]
            assert d["active_version"] == model["version"] and d["status"] == "online"
            assert d["delivery"]["lost"] == 0
            assert svc.storage.events(device_id)
    finally:
        stop.set()
        ticker.join(5)
        for a in agents.values():
            a.close()
