"""Fixtures for simulation tests: a fleet server on the simulated clock, a trained model, and
helpers that wait for the server to have stored what the simulated devices sent.

Use with `pytest_plugins = ["tests.sim_fixtures"]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from firmware_sim.clock import SimClock
from firmware_sim.fleet import SimFleet
from firmware_sim.models import TrainedBundle, build_model
from firmware_sim.provision import ServicesProvisioner
from firmware_sim.scenario import Scenario, parse_scenario
from fleet_server.alerts_service import evaluate_closed
from fleet_server.desired import publish_desired
from fleet_server.registry import desired_state, trust_key, upload_bundle
from fleet_server.service import FleetServer
from model_tools.signing import generate_keypair
from tests.server_fixtures import make_config

START = 1_800_000_000.0  # a fixed simulated epoch, so buckets line up the same way every run


@cache
def _signer():
    return generate_keypair()


@cache
def trained(version: str = "1.0.0", variant: str = "logreg") -> TrainedBundle:
    """The breast_cancer model, built once per test session and version."""
    return build_model(_signer()[0], version=version, variant=variant)


@dataclass
class SimServer:
    """An in-process fleet server whose clock is the simulation's (hand-driven) clock."""

    server: FleetServer
    clock: SimClock
    workdir: Path

    @property
    def svc(self):
        return self.server.svc

    def add_model(self, bundle: TrainedBundle) -> dict[str, Any]:
        return upload_bundle(self.svc, bundle.bundle_bytes)

    def fleet(self, scenario: Scenario | dict[str, Any], devices: int, **kwargs: Any) -> SimFleet:
        if isinstance(scenario, dict):
            scenario = parse_scenario(scenario, "test")
        return SimFleet(scenario, devices=devices, provisioner=ServicesProvisioner(self.svc),
                        workdir=self.workdir / "sim", clock=self.clock, **kwargs).provision()

    def assign(self, fleet: SimFleet, model: dict[str, Any]) -> None:
        desired = desired_state(self.svc, model["name"], model["version"])
        for device_id in fleet.ids:
            assert publish_desired(self.svc, device_id, desired)

    def settle(self, fleet: SimFleet, timeout: float = 60.0, judge: bool = True) -> None:
        """Wait until everything sent is stored, then (optionally) judge the closed buckets."""
        fleet.wait(fleet.delivered, timeout, "every online device's outbox acknowledged")
        fleet.wait(lambda: fleet.ingested(self.svc.storage.seq_stats()), timeout, "the server to store every message")
        if judge:
            evaluate_closed(self.svc)

    def run(self, fleet: SimFleet, seconds: float, judge_every: int = 5) -> None:
        """Advance window by window, waiting after each until the server stored it; judge the
        closed buckets every `judge_every` windows (judging is in bucket order, so judging
        later changes an alert's `opened_at`, never its bucket)."""
        window = fleet.scenario.window_s
        n = 0
        left = seconds
        while left > 1e-9:
            fleet.advance(min(window, left))
            left -= window
            n += 1
            self.settle(fleet, judge=n % judge_every == 0 or left <= 1e-9)

    def device_alerts(self) -> list[dict[str, Any]]:
        return [a for a in self.svc.storage.list_alerts() if a["scope"].startswith("device:")]


@pytest.fixture
def sim_server(tmp_path):
    """Fleet server (managed Mosquitto, ingest, API) sharing a hand-driven simulated clock.

    Alert evaluation runs when the test calls `settle` (loops off), so that a bucket is only
    judged once every window in it has been stored.
    """
    clock = SimClock(speed=0, start=START)
    config = make_config(tmp_path / "server", bucket_s=60.0, bucket_grace_s=20.0, consecutive=3,
                         min_predictions=100)
    server = FleetServer(config, clock=clock, loops=False).start()
    try:  # stopped when its setup fails too
        handle = SimServer(server, clock, tmp_path)
        pem = _signer()[1].public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        trust_key(handle.svc, pem)
        from tests.brokers import wait_until

        wait_until(lambda: server.ingest.connected.is_set(), 10, message="ingest connected")
        yield handle
    finally:
        server.stop()
