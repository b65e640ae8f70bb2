"""Running a rehearsal: a throwaway fleet server and a simulated fleet on one hand-driven clock."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmware_sim.clock import SimClock
from firmware_sim.datagen import Dataset
from firmware_sim.fleet import SimFleet
from firmware_sim.local import free_port, wait_until
from firmware_sim.provision import ServicesProvisioner
from firmware_sim.rehearse.report import RehearsalReport, StageTracker, duration_text
from firmware_sim.rehearse.shape import (
    DeviceShape,
    FleetShape,
    RehearsalError,
    default_shape,
    device_ids,
)
from firmware_sim.scenario import Fault, Scenario, parse_scenario

log = logging.getLogger("firmware_sim.rehearse")

ACTOR = "rehearsal"
FINAL_STATES = ("completed", "aborted")
DEFAULT_INTERVAL_S = 10.0  # simulated seconds between two controller passes
DEFAULT_MAX_SIM_S = 7 * 24 * 3600.0  # a rehearsal that has not finished in a simulated week stops


@dataclass
class _Traffic:
    """Bytes the server sent devices: desired states over MQTT and bundle downloads over HTTP."""

    desired_bytes: int = 0
    download_bytes: int = 0

    def wrap_publisher(self, publisher: Any) -> None:
        # Under the leadership fence (FencedPublisher) sits the publisher that writes to MQTT.
        publisher = getattr(publisher, "unfenced", publisher)
        publish = publisher.publish

        def counting(topic: str, payload: bytes, *args: Any, **kwargs: Any) -> bool:
            ok = publish(topic, payload, *args, **kwargs)
            if ok and topic.endswith("/desired"):
                self.desired_bytes += len(payload) + len(topic)
            return ok

        publisher.publish = counting

    def wrap_app(self, app: Any) -> None:
        inner = app.wsgi_app

        def counting(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            if not environ.get("PATH_INFO", "").endswith("/bundle"):
                return inner(environ, start_response)

            def start(status: str, headers: list[tuple[str, str]], *exc: Any) -> Any:
                for k, v in headers:
                    if k.lower() == "content-length":
                        self.download_bytes += int(v)
                return start_response(status, headers, *exc)

            return inner(environ, start)

        app.wsgi_app = counting


def _target_note(plan: dict[str, Any], shapes: list[DeviceShape]) -> tuple[dict[str, Any], str | None]:
    """Explicit device lists name real devices the simulation does not have: rehearse on all."""
    target = plan.get("target") or {}
    if target.get("devices"):
        return ({**plan, "target": {"all": True}},
                f"the target lists {len(target['devices'])} real devices; rehearsed on the whole simulated fleet")
    return plan, None


# A scheduled rollout is rehearsed from a little before it may first act, not through the hours
# (or days) until then: simulated time costs real time, every device ticks through it.
SCHEDULE_LEAD_S = 300.0


def _start_time(plan: dict[str, Any], now: float, notes: list[str]) -> float:
    """When the simulated clock starts: now, or shortly before a schedule's first chance to act
    (its not_before, then its first maintenance window), so the rehearsal shows the windows."""
    from fleet_server.rollouts.schedule import ScheduleError, local_iso, parse_schedule

    try:
        schedule = parse_schedule(plan.get("schedule"))
    except ScheduleError:
        return now  # create_rollout refuses the plan with the reason
    if schedule is None:
        return now
    first = max(now, schedule.not_before or now)
    if schedule.window is not None:
        upcoming = schedule.window.upcoming(first, 1)
        if upcoming:
            first = max(first, upcoming[0][0])
    if first - now <= SCHEDULE_LEAD_S:
        return now
    start = first - SCHEDULE_LEAD_S
    tz = schedule.window.timezone if schedule.window else "UTC"
    notes.append(f"schedule: the simulated clock starts at {local_iso(start, tz)}, "
                 f"{SCHEDULE_LEAD_S / 60:g} min before the rollout may first act")
    return start


def rehearse(
    plan: dict[str, Any],
    *,
    devices: int = 200,
    scenario: Scenario | None = None,
    current_bundle: bytes,
    candidate_bundle: bytes,
    trusted_keys: list[str] | None = None,
    fleet_shape: FleetShape | None = None,
    speed: float | None = None,
    dataset: Dataset | None = None,
    interval_s: float = DEFAULT_INTERVAL_S,
    max_sim_s: float = DEFAULT_MAX_SIM_S,
    approve: bool = True,
    workdir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    settle_timeout_s: float = 120.0,
) -> RehearsalReport:
    """Run `plan` (a rollout plan as `load_plan` returns it) on `devices` simulated devices that
    run `current_bundle`, with `candidate_bundle` registered as the plan's version.

    `speed` caps simulated seconds per real second (None: as fast as the machine allows).
    `interval_s` is the simulated time between controller passes. Stages that wait for approval
    are advanced by the rehearsal when `approve` (and the report says so). Stops at completed,
    paused, aborted or after `max_sim_s` simulated seconds (`unfinished`).
    """
    from fleet_server import rollouts
    from fleet_server.config import ServerConfig
    from fleet_server.registry import RegistryError, trust_key, upload_bundle
    from fleet_server.rollout_model import RolloutError
    from fleet_server.service import FleetServer

    say = progress or (lambda message: None)
    scenario = scenario or parse_scenario({"window_s": 60.0, "rate_per_s": 1.0}, "rehearsal")
    if devices < 1:
        raise RehearsalError("--devices must be at least 1")
    shape = fleet_shape or default_shape(scenario.seed)
    shapes = shape.sample(devices)
    plan, note = _target_note(plan, shapes)
    notes = [note] if note else []
    ids = device_ids(shapes, scenario.seed)
    shape_of = dict(zip(ids, shapes, strict=True))
    offline = [d for d in ids if not shape_of[d].online]
    if offline:
        # Devices offline on the real server stay offline: the rehearsal shows them timing out.
        scenario = dataclasses.replace(scenario, faults=(*scenario.faults, Fault(
            "offline", devices=tuple(offline), duration_min=max_sim_s / 60 + 1)))
        notes.append(f"{len(offline)} devices are offline as on the registered fleet; they stay offline")

    tmp = tempfile.TemporaryDirectory(prefix="edgefleet-rehearsal-") if workdir is None else None
    root = Path(tmp.name if tmp is not None else workdir)  # type: ignore[arg-type]
    clock = SimClock(speed=0, start=_start_time(plan, float(int(time.time())), notes))
    config = ServerConfig(data_dir=root / "server", listen=f"127.0.0.1:{free_port()}",
                          broker_port=free_port(), bucket_s=max(60.0, scenario.window_s),
                          bucket_grace_s=scenario.window_s, threads=8,
                          ack_interval_s=0.2)  # each step waits for the devices' outboxes to be acknowledged
    traffic = _Traffic()
    server = FleetServer(config, clock=clock, loops=False)
    fleet: SimFleet | None = None
    real_start = time.monotonic()
    try:
        server.start()
        svc = server.svc
        traffic.wrap_publisher(svc.publisher)
        traffic.wrap_app(server.app)
        _wait(lambda: server.ingest.connected.is_set(), 15, "the rehearsal server's ingest to connect")
        try:
            for pem in trusted_keys or []:
                trust_key(svc, pem)
            current = upload_bundle(svc, current_bundle)
            candidate = upload_bundle(svc, candidate_bundle)
        except RegistryError as exc:
            raise RehearsalError(f"{exc} (pass the public key that signed the bundles with --trust-key)") from exc
        if (candidate["name"], candidate["version"]) != (plan.get("model"), plan.get("version")):
            raise RehearsalError(f"the candidate bundle is {candidate['name']} {candidate['version']} but the plan "
                                 f"rolls out {plan.get('model')} {plan.get('version')}")
        if candidate["name"] != current["name"]:
            raise RehearsalError(f"the current bundle is model {current['name']!r}, the candidate {candidate['name']!r}")
        say(f"provisioning {devices} simulated devices on {current['version']}")
        fleet = SimFleet(scenario, devices=ids, provisioner=ServicesProvisioner(svc), workdir=root / "sim",
                         clock=clock, step_s=min(interval_s, scenario.window_s / 6, 5.0), dataset=dataset,
                         tags=lambda d: shape_of[d].tags or {"hw": shape_of[d].profile})
        fleet.provision().preinstall(current_bundle).start()
        online_ids = [d for d in ids if d not in offline]
        fleet.wait(lambda: all(fleet.devices[d].online for d in online_ids), settle_timeout_s,
                   "every online simulated device to connect")
        # One window of traffic before the rollout: the server knows every device's version.
        fleet.advance(scenario.window_s)
        _settle(svc, fleet, settle_timeout_s, notes)
        _wait(lambda: all((svc.storage.get_device(d) or {}).get("active_version") == current["version"]
                          for d in online_ids), settle_timeout_s, "the server to see every device's version")
        try:
            created = rollouts.create_rollout(svc, plan, actor=ACTOR)
        except RolloutError as exc:
            raise RehearsalError(f"the plan was refused: {exc}") from exc
        rid = created["id"]
        t0 = clock()
        say(f"rollout {rid} created; rehearsing")
        passes, cpu, worst = 0, 0.0, 0.0
        last = (created["state"], created["stage"])
        tracker = StageTracker(svc, rid, t0)
        row = svc.storage.get_rollout(rid)
        while True:
            cpu0, wall0 = time.thread_time(), time.perf_counter()
            rollouts.reconcile(svc)
            cpu += time.thread_time() - cpu0
            worst = max(worst, time.perf_counter() - wall0)
            passes += 1
            row = svc.storage.get_rollout(rid)
            tracker.population = (row.get("gates") or {}).get("population") or tracker.population
            now = (row["state"], row["stage"])
            if now != last:
                tracker.capture()
                say(f"{duration_text(clock() - t0)}: stage {row['stage'] + 1}/{len(row['spec']['stages'])} {row['state']}"
                    + (f" ({row['reason']})" if row["reason"] else ""))
                last = now
            if row["state"] in FINAL_STATES or row["state"] == "paused":
                break
            waiting = (row.get("gates") or {}).get("waiting_for") or []
            if approve and row["state"] == "running" and waiting and all(w.startswith("approval") for w in waiting):
                rollouts.advance(svc, rid, actor=ACTOR)
                notes.append(f"stage {row['stage'] + 1} waits for approval: the rehearsal advanced it "
                             f"after {duration_text(clock() - t0)}")
                continue
            if clock() - t0 >= max_sim_s:
                notes.append(f"stopped after {duration_text(max_sim_s)} of simulated time")
                break
            fleet.advance(interval_s)
            _settle(svc, fleet, settle_timeout_s, notes)
            if speed:
                # Pacing, not synchronisation: never run faster than `speed` simulated s per real s.
                ahead = (clock() - t0) / speed - (time.monotonic() - real_start)
                if ahead > 0:
                    time.sleep(ahead)
        tracker.capture()
        status = rollouts.rollout_status(svc, rid)
        outcome = status["state"] if status["state"] in ("completed", "paused", "aborted") else "unfinished"
        versions = Counter(s.active_version or "none" for s in fleet.states().values())
        return RehearsalReport(
            model=status["model"], version=status["version"], current_version=current["version"],
            devices=devices, outcome=outcome, reason=status["reason"],
            stages=tracker.reports(),
            sim_s=clock() - t0, real_s=time.monotonic() - real_start, passes=passes,
            controller_cpu_s=cpu, controller_max_pass_s=worst,
            desired_bytes=traffic.desired_bytes, download_bytes=traffic.download_bytes,
            versions=dict(versions), shape=dict(Counter(s.profile for s in shapes)), offline=len(offline),
            notes=[n for n in dict.fromkeys(notes)],
            audit=[f"{duration_text(a['ts'] - t0)} {a['actor']} {a['action']}" for a in status["audit"]],
            rollout_id=rid,
        )
    finally:
        if fleet is not None:
            fleet.stop()
        server.stop()
        # The server freezes the collector's generations and collects rarely: the agents' MQTT
        # clients (two sockets each) would stay open until much later.
        gc.collect()
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.cleanup()


def _settle(svc: Any, fleet: SimFleet, timeout: float, notes: list[str]) -> None:
    """Wait until every online device's messages are stored (the pass then sees all of them)."""
    try:
        fleet.wait(fleet.delivered, timeout, "every online device's outbox acknowledged")
        fleet.wait(lambda: fleet.ingested(svc.storage.seq_stats()), timeout, "the server to store every message")
    except TimeoutError as exc:
        notes.append(f"some devices lagged behind the simulated clock ({exc})")


def _wait(predicate: Callable[[], object], timeout: float, what: str) -> None:
    wait_until(predicate, timeout, what, error=RehearsalError, interval=0.05)
