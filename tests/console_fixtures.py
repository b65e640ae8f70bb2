"""Fixtures for console tests: a whole fleet server with real in-process agents, operator
accounts, and a headless Chromium (Debian's package) that records every request and error.

Import into a test module with `pytest_plugins = ["tests.console_fixtures"]`.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest

from edge_agent import Agent
from edge_agent.config import config_from_dict
from edge_agent.protocol import Hardware
from fleet_server.console.accounts import create_operator
from fleet_server.desired import publish_desired
from fleet_server.devices import provision_device
from fleet_server.registry import desired_state, trust_key, upload_bundle
from fleet_server.service import FleetServer
from tests.agent_fixtures import bundle_bytes, dataset, install_active, public_pem
from tests.server_fixtures import make_config, wait_until

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
DOC_IMAGES = ROOT / "docs" / "img"
PASSWORDS = {"alice": "alice-operates-the-fleet", "victor": "victor-only-looks"}
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
DRIFTED = "press-04"  # fed shifted inputs: the drift alert's device


@dataclass
class ConsoleFleet:
    """A server, agents serving traffic from one background thread, and the two operators."""

    server: FleetServer
    root: Path
    agents: dict[str, Agent] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    @property
    def svc(self):
        return self.server.svc

    @property
    def url(self) -> str:
        return self.server.url

    def add(self, device_id: str, tags: dict[str, str], *, preinstalled: bool = True) -> Agent:
        text = provision_device(self.svc, device_id, tags, window_s=0.2).agent_config
        data = tomllib.loads(text)
        data["data_dir"] = str(self.root / device_id)
        data["update"] = {"probation_predictions": 50, "probation_s": 1.0, "probation_latency_factor": 50.0}
        if device_id == DRIFTED:
            data["telemetry"]["sample_exclude"] = ["x1"]  # a private feature: null in sampled rows
        if preinstalled:
            install_active(Path(data["data_dir"]), bundle_bytes("lr", "1.0.0"))
        agent = Agent(config_from_dict(data), hardware=Hardware(arch="aarch64", ram_mb=4096, cpu_count=4,
                                                                cpu_model="Cortex-A72")).start()
        self.agents[device_id] = agent
        return agent

    def run(self) -> ConsoleFleet:
        X, _ = dataset()
        rng = np.random.default_rng(0)

        def loop() -> None:
            while not self.stop.wait(0.04):
                for device_id, agent in list(self.agents.items()):
                    rows = X[rng.integers(0, len(X), 40)].copy()
                    if device_id == DRIFTED:
                        rows[:, 0] += 3.0
                        rows[:, 1] += 3.0
                    with contextlib.suppress(Exception):  # mid-swap: the next call serves
                        agent.predict(rows.tolist())
                    agent.tick()

        self.thread = threading.Thread(target=loop, name="console-traffic", daemon=True)
        self.thread.start()
        return self

    def versions(self) -> dict[str, str | None]:
        return {d: a.active_version() for d, a in self.agents.items()}

    def close(self) -> None:
        self.stop.set()
        if self.thread:
            self.thread.join(5)
        for agent in self.agents.values():
            agent.close()
        self.server.stop()


@pytest.fixture(scope="module")
def console_fleet(tmp_path_factory) -> Iterator[ConsoleFleet]:
    """Five agents on model demo 1.0.0 (four pre-installed on line a, one downloaded on line b and
    fed drifted data), demo 2.0.0 registered for rollouts, an operator and a viewer account."""
    root = tmp_path_factory.mktemp("console")
    server = FleetServer(make_config(root / "server", rollout_interval_s=0.1)).start()
    fleet = ConsoleFleet(server, root)
    try:
        wait_until(lambda: server.ingest.connected.is_set(), 10, message="ingest connected")
        svc = fleet.svc
        trust_key(svc, public_pem("trusted"))
        upload_bundle(svc, bundle_bytes("lr", "1.0.0"))
        upload_bundle(svc, bundle_bytes("lr", "2.0.0"))
        for i in range(4):
            fleet.add(f"press-{i:02d}", {"line": "a", "site": "berlin"})
        fleet.add(DRIFTED, {"line": "b", "site": "berlin"}, preinstalled=False)
        assert publish_desired(svc, DRIFTED, desired_state(svc, "demo", "1.0.0"))
        create_operator(svc, "alice", "operator", PASSWORDS["alice"])
        create_operator(svc, "victor", "viewer", PASSWORDS["victor"])
        fleet.run()
        wait_until(lambda: set(fleet.versions().values()) == {"1.0.0"}, 60, interval=0.1,
                   message="every agent runs 1.0.0")
        yield fleet
    finally:
        fleet.close()


# ------------------------------------------------------------------ the browser


@dataclass
class Recorder:
    """Every request a page made, console errors and uncaught exceptions, and bytes transferred."""

    origin: str
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    transferred: dict[str, int] = field(default_factory=dict)

    def foreign(self) -> list[str]:
        return [u for u in self.requests if not (u.startswith(self.origin + "/") or u.startswith("data:"))]

    def check(self) -> None:
        assert not self.foreign(), f"requests left the server's origin: {self.foreign()}"
        assert not self.errors, f"JavaScript errors: {self.errors}"


def attach(page: Any, recorder: Recorder) -> None:
    page.on("request", lambda r: recorder.requests.append(r.url))
    page.on("console", lambda m: recorder.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: recorder.errors.append(f"uncaught: {e}"))

    def finished(request: Any) -> None:
        with contextlib.suppress(Exception):
            sizes = request.sizes()
            recorder.transferred[request.url] = sizes["responseBodySize"] + sizes["responseHeadersSize"]

    page.on("requestfinished", finished)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (make setup installs it)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@dataclass
class Session:
    """A logged-in browser context for one operator, with its recorder."""

    context: Any
    page: Any
    recorder: Recorder
    base: str

    def goto(self, path: str) -> Any:
        self.page.goto(self.base + path)
        return self.page


def login(browser: Any, base: str, name: str) -> Session:
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1440, "height": 900}, base_url=base)
    page = context.new_page()
    recorder = Recorder(origin=base)
    attach(page, recorder)
    page.goto(base + "/console/")
    expect(page).to_have_url(f"{base}/console/login?next=/console/")
    page.get_by_label("Operator").fill(name)
    page.get_by_label("Password").fill(PASSWORDS[name])
    page.get_by_role("button", name="Log in").click()
    expect(page.locator(".whoami .user")).to_have_text(name)
    return Session(context, page, recorder, base)


def shoot(page: Any, name: str) -> None:
    """Save a screenshot as a test artifact; with EDGEFLEET_DOC_SCREENSHOTS=1 also as the docs'
    picture of that page (so that an ordinary test run leaves the checkout clean)."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.evaluate("() => { document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0); }")
    data = page.screenshot(full_page=True, animations="disabled")
    (ARTIFACTS / f"console-{name}.png").write_bytes(data)
    if os.environ.get("EDGEFLEET_DOC_SCREENSHOTS") == "1":
        DOC_IMAGES.mkdir(parents=True, exist_ok=True)
        (DOC_IMAGES / f"console-{name}.png").write_bytes(data)


def record_weight(name: str, recorder: Recorder) -> int:
    """Bytes transferred for one page load (headers included); kept in test-artifacts."""
    total = sum(recorder.transferred.values())
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "page-weights.json"
    weights = json.loads(path.read_text()) if path.exists() else {}
    weights[name] = {"bytes": total, "requests": len(recorder.transferred),
                     "largest": sorted(((v, urlsplit(k).path) for k, v in recorder.transferred.items()), reverse=True)[:3]}
    path.write_text(json.dumps(weights, indent=2))
    return total
