"""`edgefleet demo`: the whole system on this machine in one command.

A managed Mosquitto and the fleet server (in this process, on the simulated clock), a model
trained on breast_cancer, converted, signed and registered, fifty simulated devices running it
(ten of them drifting a few simulated minutes in), a canary rollout of a second version, and a
summary read back through the REST API every few seconds. Ctrl-C or SIGTERM stops everything.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import requests

from firmware_sim.clock import SimClock
from firmware_sim.fleet import SimFleet
from firmware_sim.local import free_port
from firmware_sim.models import build_model
from firmware_sim.provision import ServicesProvisioner
from firmware_sim.scenario import load_scenario

READY_FILE = "demo.json"  # written once everything is up: URLs, login, pid (the smoke test reads it)
OPERATOR = "demo"


@dataclass
class DemoOptions:
    """What `edgefleet demo` can be told; the defaults are the newcomer's demo."""

    directory: Path = Path(".demo")
    devices: int = 50
    speed: float | None = None  # None: the scenario's (30: a simulated minute every 2 s)
    duration: float = 0.0  # real seconds; 0 runs until Ctrl-C
    api_port: int = 0  # 0: a free port
    mqtt_port: int = 0
    scenario: str = "demo"
    summary_every: float = 10.0  # real seconds between summaries
    rollout: bool = True


def stop_leftover_broker(directory: Path) -> None:
    """A demo killed with -9 leaves its Mosquitto running (it has its own session): stop it
    before the directory is recreated, or its port and files would be taken."""
    broker = directory / "server" / "broker"
    pid_file = broker / "mosquitto.pid"
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if str((broker / "mosquitto.conf").resolve()).encode() not in cmdline:
        return  # the pid was reused by something else
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


class Demo:
    """Builds, runs and tears down the demo; `start()` then `summary()` until `stop()`."""

    def __init__(self, options: DemoOptions, echo: Callable[[str], None] = click.echo) -> None:
        self.o = options
        self.echo = echo
        self.dir = options.directory.resolve()
        self.server: Any = None
        self.fleet: SimFleet | None = None
        self.token = ""
        self.login: dict[str, str] | None = None
        self.rollout_id: str | None = None
        self.http = requests.Session()

    # ------------------------------------------------------------------ setup

    def prepare_dir(self) -> None:
        """Recreate the demo directory from scratch (a rerun starts clean)."""
        stop_leftover_broker(self.dir)
        if self.dir.exists():
            shutil.rmtree(self.dir)
        (self.dir / "keys").mkdir(parents=True)

    def start(self) -> dict[str, Any]:
        from cryptography.hazmat.primitives import serialization

        from fleet_server.auth import new_token, token_hash
        from fleet_server.config import ServerConfig
        from fleet_server.registry import trust_key, upload_bundle
        from fleet_server.service import FleetServer
        from model_tools.signing import generate_keypair, save_private_key, save_public_key

        self.prepare_dir()
        scenario = load_scenario(self.o.scenario)
        clock = SimClock(self.o.speed if self.o.speed is not None else scenario.speed)
        api_port, mqtt_port = self.o.api_port or free_port(), self.o.mqtt_port or free_port()
        # Drift buckets of one simulated minute, judged 20 simulated seconds after they end;
        # background loops every half real second so that the demo moves visibly.
        config = ServerConfig(
            data_dir=self.dir / "server",
            listen=f"127.0.0.1:{api_port}",
            broker_port=mqtt_port,
            bucket_s=scenario.window_s,
            bucket_grace_s=20.0,
            alert_interval_s=0.5,
            rollout_interval_s=0.5,
            min_predictions=100,
            consecutive=3,
        )
        self.echo(f"starting Mosquitto on 127.0.0.1:{mqtt_port} and the fleet server on http://127.0.0.1:{api_port}")
        self.server = FleetServer(config, clock=clock).start()
        svc = self.server.svc

        self.echo("training on breast_cancer, converting to ONNX, checking parity, signing ...")
        private, public = generate_keypair()
        save_private_key(private, self.dir / "keys" / "signer.key")
        save_public_key(public, self.dir / "keys" / "signer.pub")
        pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        trust_key(svc, pem, "edgefleet demo signer")
        v1 = build_model(private, dataset=scenario.dataset, version="1.0.0")
        model = upload_bundle(svc, v1.bundle_bytes)
        self.echo(f"registered {model['name']} {model['version']} (accuracy {v1.accuracy:.3f} on held-out rows)")

        self.token = new_token()
        svc.storage.insert_token("demo", "operator", token_hash(self.token), svc.clock())
        self.http.headers["Authorization"] = f"Bearer {self.token}"
        self.login = self._operator(svc)

        self.echo(f"provisioning {self.o.devices} simulated devices and booting them with {model['version']} ...")
        self.fleet = SimFleet(scenario, devices=self.o.devices, provisioner=ServicesProvisioner(svc),
                              workdir=self.dir / "sim", clock=clock)
        # The first version is the devices' factory image; the second one arrives by rollout.
        self.fleet.provision().preinstall(v1.bundle_bytes).start(wait_online=60)

        if self.o.rollout:
            v2 = build_model(private, dataset=scenario.dataset, version="1.1.0", variant="logreg-strong")
            upload_bundle(svc, v2.bundle_bytes)
            self.echo(f"registered {v2.name} {v2.version} (accuracy {v2.accuracy:.3f}); starting a canary rollout "
                      "that lets its estimated accuracy fall at most one point below the control's")
            self.rollout_id = self._start_rollout(svc, v2.name, v2.version)

        info = {
            "pid": os.getpid(),
            "api_url": self.server.url,
            "console_url": f"{self.server.url}/console/" if self.login else None,
            "mqtt": f"mqtt://127.0.0.1:{mqtt_port}",
            "token": self.token,
            "login": self.login,
            "rollout_id": self.rollout_id,
            "speed": clock.speed,
            "devices": self.o.devices,
        }
        path = self.dir / READY_FILE
        path.write_text(json.dumps(info, indent=2))
        path.chmod(0o600)
        self._print_ready(info)
        return info

    def _operator(self, svc: Any) -> dict[str, str] | None:
        """A console login, when the server has operator accounts."""
        try:
            from fleet_server.console.accounts import create_operator
        except ImportError:
            return None
        password = secrets.token_urlsafe(12)
        create_operator(svc, OPERATOR, "operator", password)
        return {"user": OPERATOR, "password": password}

    def _start_rollout(self, svc: Any, name: str, version: str) -> str | None:
        """ROLLOUT HOOK: a canary of the second version to 10 %, then 50 %, then everyone.

        1.1.0 is about two points less accurate than 1.0.0 (0.956 vs 0.974 on held-out rows). No
        label comes back in the demo, so `accuracy_delta` never decides; the label-free estimate
        (about 0.953 vs 0.972 on the same traffic) does, and pauses the 10 % canary."""
        try:
            from fleet_server.rollouts import create_rollout
        except ImportError:
            self.echo("(this fleet server has no rollouts yet: the second version stays registered only)")
            return None
        row = create_rollout(svc, {
            "name": "demo canary",
            "model": name,
            "version": version,
            "target": {"all": True},
            "stages": [
                {"percent": 10, "min_soak_s": 300},
                {"percent": 50, "min_soak_s": 300},
                {"percent": 100, "min_soak_s": 0},
            ],
            # The simulated devices share this machine's CPU with the broker and the server, and a
            # canary of one device has a few hundred predictions: its p95 measures the machine's
            # scheduling (4.2 ms against under 1 ms for the control once, on a loaded 2-core
            # machine), not the model. Below 25 ms the latency gate does not compare.
            "gates": {"estimated_accuracy_delta": {"min": -0.01}, "p95_latency_ratio": {"floor_ms": 25.0}},
            "on_failure": "pause",
        }, actor="demo")
        return row.get("id") or row.get("rollout", {}).get("id")

    def _print_ready(self, info: dict[str, Any]) -> None:
        e = self.echo
        e("")
        e("edgefleet demo is ready")
        if info["console_url"]:
            e(f"  web console   {info['console_url']}  (user {self.login['user']}, password {self.login['password']})")
        e(f"  REST API      {info['api_url']}/api/v1  (Authorization: Bearer {self.token})")
        e(f"  MQTT broker   {info['mqtt']}")
        e(f"  try           curl -s -H 'Authorization: Bearer {self.token}' {info['api_url']}/api/v1/alerts?state=open")
        e(f"  data          {self.dir}  (server data dir: {self.dir / 'server'})")
        e(f"  clock         {info['speed']:g}x: one simulated minute every {60 / info['speed']:.1f} s; drift starts at minute 4")
        e("Ctrl-C stops everything.")
        e("")

    # ------------------------------------------------------------------ running

    def _get(self, path: str, **params: Any) -> Any:
        r = self.http.get(f"{self.server.url}/api/v1{path}", params=params, timeout=10)
        r.raise_for_status()
        return r.json()

    def summary(self) -> str:
        """What the operator would look at, read through the REST API."""
        assert self.fleet is not None
        stats = self.fleet.stats()
        devices = self._get("/devices", limit=10000)["devices"]
        online = sum(1 for d in devices if d.get("status") == "online")
        versions = Counter(d.get("active_version") or "none" for d in devices)
        alerts = self._get("/alerts", state="open")["alerts"]
        drifting = sorted({a["scope"].removeprefix("device:") for a in alerts
                           if a["scope"].startswith("device:") and a["severity"] == "alert"})
        features = Counter(a["target"] for a in alerts if a["severity"] == "alert")
        summary = self._get("/telemetry/summary")["summary"]
        preds = sum(int(s.get("predictions") or 0) for s in summary)
        lines = [
            f"[sim minute {stats.elapsed_s / 60:5.1f}] devices {len(devices)} ({online} online) "
            f"versions {dict(versions)}; server has {preds} predictions in telemetry; "
            f"update states {stats.states}",
        ]
        if drifting:
            lines.append(f"  drift alerts on {len(drifting)} devices ({', '.join(drifting[:10])}) "
                         f"on {', '.join(f for f, _ in features.most_common(3))}")
        else:
            lines.append("  no drift alerts (yet: drift starts at simulated minute 4, alerts need 3 windows)")
        if self.rollout_id:
            with contextlib.suppress(requests.RequestException, KeyError):
                r = self._get(f"/rollouts/{self.rollout_id}")
                r = r.get("rollout", r)
                why = f" ({r['reason']})" if r.get("state") == "paused" and r.get("reason") else ""
                lines.append(f"  rollout {self.rollout_id}: {r.get('state')}, stage {r.get('stage')}{why}")
        return "\n".join(lines)

    def run(self, stop: threading.Event) -> None:
        deadline = time.monotonic() + self.o.duration if self.o.duration else None
        while not stop.is_set():
            wait = self.o.summary_every
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            if stop.wait(wait):
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            try:
                self.echo(self.summary())
            except requests.RequestException as exc:
                self.echo(f"  (summary unavailable: {exc})")

    def stop(self) -> None:
        """Stop the fleet, then the server (which stops its broker); idempotent."""
        if self.fleet is not None:
            self.fleet.stop()
            self.fleet = None
        if self.server is not None:
            self.server.stop()
            self.server = None
        with contextlib.suppress(OSError):
            (self.dir / READY_FILE).unlink()


@click.command("demo")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=".demo",
              show_default=True, help="Working directory (recreated on every run).")
@click.option("--devices", type=click.IntRange(1, 5000), default=50, show_default=True,
              help="Simulated devices to run.")
@click.option("--speed", type=click.FloatRange(min=0.1), default=None,
              help="Simulated seconds per real second (default: the scenario's, 30).")
@click.option("--duration", type=click.FloatRange(min=0), default=0, show_default=True,
              help="Stop after this many real seconds (0: run until Ctrl-C).")
@click.option("--api-port", type=int, default=0, show_default=True, help="HTTP port of the fleet server (0: a free one).")
@click.option("--mqtt-port", type=int, default=0, show_default=True, help="Port of the managed Mosquitto (0: a free one).")
@click.option("--scenario", default="demo", show_default=True, help="Scenario file or shipped scenario name.")
@click.option("--summary-every", type=click.FloatRange(min=0.5), default=10.0, show_default=True,
              help="Real seconds between printed summaries.")
@click.option("--no-rollout", is_flag=True, help="Do not train a second version or start a canary rollout.")
def demo_command(directory: Path, devices: int, speed: float | None, duration: float, api_port: int,
                 mqtt_port: int, scenario: str, summary_every: float, no_rollout: bool) -> None:
    """Run the whole system on this machine: broker, server, model, 50 simulated devices."""
    import logging

    from firmware_sim.scenario import ScenarioError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    # Handlers first: a Ctrl-C during start-up still stops what has been started.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    demo = Demo(DemoOptions(directory, devices, speed, duration, api_port, mqtt_port, scenario,
                            summary_every, not no_rollout))
    try:
        demo.start()
        if not stop.is_set():
            demo.echo(demo.summary())
            demo.run(stop)
    except ScenarioError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        click.echo("stopping the simulated fleet, the fleet server and Mosquitto ...")
        demo.stop()
        click.echo("stopped.")
