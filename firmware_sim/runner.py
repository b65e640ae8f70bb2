"""`edgefleet sim run` as a function: find or start the server, provision, boot, show progress.

Two ways to meet a server:
- attached (`server_url`): a running server; devices are provisioned through its data dir or
  its REST API. The server keeps its own clock, so with a speed above 1 the windows carry
  simulated timestamps ahead of its clock and its drift buckets are judged late.
- embedded (no `server_url`): a fleet server is started in this process on `data_dir`, with a
  managed Mosquitto on free loopback ports, sharing the simulated clock (buckets, alerts and
  rollout soak times follow simulated time).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from firmware_sim.clock import SimClock
from firmware_sim.fleet import SimFleet
from firmware_sim.progress import Progress
from firmware_sim.provision import (
    DataDirProvisioner,
    Provisioner,
    RestProvisioner,
    ServicesProvisioner,
)
from firmware_sim.scenario import Scenario


class SimRunError(RuntimeError):
    """Something the user can fix: a missing option, no model registered, an unreachable server."""


@dataclass
class RunOptions:
    devices: int
    scenario: Scenario
    server_url: str | None = None
    data_dir: Path | None = None
    token: str | None = None
    mqtt_url: str | None = None
    model_ref: str | None = None
    speed: float | None = None
    duration_min: float | None = None
    workdir: Path = Path(".sim")
    progress_every: float = 2.0


def _pick(models: list[dict[str, Any]], ref: str | None) -> tuple[str, str]:
    if ref:
        name, _, version = ref.partition(":")
        if not version:
            raise SimRunError(f"--model {ref!r} must look like NAME:VERSION, e.g. tumour:1.0.0")
        return name, version
    if not models:
        raise SimRunError("the server has no registered model: add one (edgefleet server add-model) or pass "
                          "no --server to let the simulator train and register one")
    newest = max(models, key=lambda m: m.get("uploaded_at") or 0)
    return newest["name"], newest["version"]


def _bundle_via_rest(url: str, token: str, ref: str | None) -> bytes:
    h = {"Authorization": f"Bearer {token}"}
    try:
        models = requests.get(f"{url}/api/v1/models", headers=h, timeout=30).json()["models"]
        name, version = _pick(models, ref)
        r = requests.get(f"{url}/api/v1/models/{name}/{version}/bundle", headers=h, timeout=60)
    except requests.RequestException as exc:
        raise SimRunError(f"cannot reach the fleet server at {url}: {exc}") from exc
    if r.status_code != 200:
        raise SimRunError(f"downloading {name} {version} failed: HTTP {r.status_code}")
    return r.content


def _bundle_via_services(svc: Any, ref: str | None) -> bytes:
    from fleet_server.registry import bundle_file, list_models

    name, version = _pick(list_models(svc), ref)
    path, _ = bundle_file(svc, name, version)
    return Path(path).read_bytes()


def _train_and_register(svc: Any, scenario: Scenario, workdir: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    from firmware_sim.models import build_model
    from fleet_server.registry import trust_key, upload_bundle
    from model_tools.signing import generate_keypair, save_private_key

    private, public = generate_keypair()
    workdir.mkdir(parents=True, exist_ok=True)
    save_private_key(private, workdir / "signer.key")
    trust_key(svc, public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
              "edgefleet sim signer")
    upload_bundle(svc, build_model(private, dataset=scenario.dataset).bundle_bytes)


def run_simulation(o: RunOptions, echo: Callable[[str], None] = print, stop: threading.Event | None = None) -> None:
    """Run until the scenario's (or `duration_min`) simulated minutes pass, or `stop` is set
    (SIGINT/SIGTERM set it when called from the main thread)."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    scenario = o.scenario
    clock = SimClock(o.speed if o.speed is not None else scenario.speed)
    server = None
    provisioner: Provisioner
    closers: list[Callable[[], None]] = []
    if o.server_url:
        if o.data_dir is not None:
            dp = DataDirProvisioner(o.data_dir)
            closers.append(dp.close)
            provisioner = dp
            bundle = lambda: _bundle_via_services(dp.svc, o.model_ref)  # noqa: E731
        elif o.token:
            provisioner = RestProvisioner(o.server_url, o.token)
            bundle = lambda: _bundle_via_rest(o.server_url.rstrip("/"), o.token, o.model_ref)  # noqa: E731
        else:
            raise SimRunError("with --server, pass --data-dir (the server's) or --token (an operator API token) "
                              "so that the simulator can provision its devices")
        if clock.speed > 1:
            echo(f"note: {o.server_url} keeps its own clock; at {clock.speed:g}x its drift buckets are judged "
                 "late (run without --server for a server on the simulated clock)")
    else:
        if o.data_dir is None:
            raise SimRunError("pass --server URL to attach to a running fleet server, or --data-dir DIR to "
                              "start one in this process")
        from firmware_sim.local import free_port
        from fleet_server.config import load_config
        from fleet_server.service import FleetServer

        config = load_config(o.data_dir, listen=f"127.0.0.1:{free_port()}", broker_port=free_port(),
                             bucket_s=scenario.window_s, bucket_grace_s=20.0, alert_interval_s=1.0)
        server = FleetServer(config, clock=clock).start()
        closers.append(server.stop)
        echo(f"fleet server on {server.url} (broker {config.broker_url}), data dir {o.data_dir}")
        svc = server.svc
        from fleet_server.registry import list_models

        if not list_models(svc) and not o.model_ref:
            echo("no model registered: training one on " + scenario.dataset)
            _train_and_register(svc, scenario, o.workdir)
        provisioner = ServicesProvisioner(svc)
        bundle = lambda: _bundle_via_services(svc, o.model_ref)  # noqa: E731
    fleet = None
    try:
        fleet = SimFleet(scenario, devices=o.devices, provisioner=provisioner, workdir=o.workdir,
                         clock=clock, mqtt_url=o.mqtt_url)
        echo(f"provisioning {o.devices} devices (configs kept in {o.workdir}) ...")
        fleet.provision().preinstall(bundle())
        echo(f"booting them: scenario {scenario.name} ({scenario.description})")
        fleet.start()
        progress = Progress()
        end_s = (o.duration_min if o.duration_min is not None else scenario.duration_min) * 60.0
        while not stop.wait(o.progress_every):
            stats = fleet.stats()
            echo(progress.line(stats))
            if stats.elapsed_s >= end_s:
                break
        stats = fleet.stats()
        echo(f"done: {stats.elapsed_s / 60:.1f} simulated minutes, {stats.predictions} predictions, "
             f"{stats.windows} windows, {stats.crashes} crashes")
    finally:
        if fleet is not None:
            fleet.stop()
        for close in reversed(closers):
            close()

