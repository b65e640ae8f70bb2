"""Rollout rehearsal: run a rollout plan against a simulated fleet before a real device is touched.

A throwaway fleet server (own data dir, managed broker) and a `SimFleet` of real agents share one
hand-driven simulated clock. The rehearsal moves the clock one reconcile interval at a time:
every device serves its traffic and ticks, the server stores everything sent, then the rollout
controller makes one pass — so a day of rollout takes minutes and every run sees the same
sequence. It reports per stage the simulated time taken, each gate's value, threshold and sample,
timeouts and failures, and the outcome.

    report = rehearse(load_plan("plan.toml"), devices=200, current_bundle=v1, candidate_bundle=v2,
                      trusted_keys=[pem])
    print(report.table())
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import socket
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from firmware_sim.clock import SimClock
from firmware_sim.datagen import Dataset
from firmware_sim.device import PROFILES, profile_for
from firmware_sim.fleet import SimFleet
from firmware_sim.provision import ServicesProvisioner
from firmware_sim.scenario import Fault, Scenario, parse_scenario

log = logging.getLogger("firmware_sim.rehearse")

ACTOR = "rehearsal"
FINAL_STATES = ("completed", "aborted")
DEFAULT_INTERVAL_S = 10.0  # simulated seconds between two controller passes
DEFAULT_MAX_SIM_S = 7 * 24 * 3600.0  # a rehearsal that has not finished in a simulated week stops


class RehearsalError(RuntimeError):
    """A rehearsal that cannot start; the message says what was wrong and what to do."""


# ------------------------------------------------------------------ fleet shape


@dataclass(frozen=True)
class DeviceShape:
    """What a simulated device copies from a registered one: hardware, tags, whether it is online."""

    profile: str
    tags: dict[str, str] = field(default_factory=dict)
    online: bool = True


@dataclass(frozen=True)
class FleetShape:
    """The devices a simulated fleet is modelled on; `sample(n)` scales it to n devices."""

    devices: tuple[DeviceShape, ...]
    source: str = "default mix"

    def sample(self, n: int) -> list[DeviceShape]:
        """n devices in the same proportions (every k-th of the registered devices, in id order)."""
        if not self.devices:
            raise RehearsalError(f"{self.source}: no registered device to model the simulated fleet on")
        return [self.devices[i * len(self.devices) // n] for i in range(n)]

    def mix(self) -> dict[str, int]:
        return dict(Counter(d.profile for d in self.devices))


def nearest_profile(hardware: dict[str, Any] | None) -> str:
    """The simulator's hardware profile closest to a device's reported hardware: the same profile
    name if the simulator has it, else the same architecture with the nearest RAM."""
    hw = hardware or {}
    names = {p.name for p in PROFILES}
    if hw.get("profile") in names:
        return str(hw["profile"])
    ram = hw.get("ram_mb") or 0
    same_arch = [p for p in PROFILES if p.arch == hw.get("arch")] or list(PROFILES)
    return min(same_arch, key=lambda p: abs(p.ram_mb - ram)).name


def fleet_shape_from_data_dir(data_dir: str | Path) -> FleetShape:
    """The registered fleet of a real server's data dir (read only): each device's reported
    hardware mapped to a simulator profile, its tags, and whether it is online now."""
    db = _open_read_only(data_dir)
    try:
        rows = db.execute("SELECT id, status, reported FROM devices WHERE revoked_at IS NULL ORDER BY id").fetchall()
        tags: dict[str, dict[str, str]] = {}
        for device, key, value in db.execute("SELECT device, key, value FROM device_tags"):
            tags.setdefault(device, {})[key] = value
    finally:
        db.close()
    shapes = []
    for device_id, status, reported in rows:
        hw = (json.loads(reported) or {}).get("hardware") if reported else None
        shapes.append(DeviceShape(nearest_profile(hw), tags.get(device_id, {}), status == "online"))
    return FleetShape(tuple(shapes), f"the {len(shapes)} devices registered in {data_dir}")


def default_shape(seed: int = 0, n: int = 100) -> FleetShape:
    """The simulator's own mix: hardware profiles spread evenly, every device online."""
    ids = [f"sim-{i:04d}" for i in range(1, n + 1)]
    return FleetShape(tuple(DeviceShape(profile_for(d, seed).name, {}) for d in ids))


def registry_from_data_dir(data_dir: str | Path, model: str, version: str,
                           current: str | None = None) -> tuple[bytes, bytes, list[str], str]:
    """From a real server's data dir: (current bundle, candidate bundle, trusted key PEMs, current
    version). The current version is `current`, else the one most target devices run now."""
    root = Path(data_dir)
    db = _open_read_only(root)
    try:
        if current is None:
            row = db.execute(
                "SELECT active_version, COUNT(*) FROM devices WHERE revoked_at IS NULL AND model = ? "
                "AND active_version IS NOT NULL AND active_version != ? GROUP BY active_version "
                "ORDER BY COUNT(*) DESC LIMIT 1", (model, version)).fetchone()
            if row is None:
                raise RehearsalError(f"no registered device runs a version of {model!r} other than {version}: "
                                     "pass --current VERSION or --current-bundle FILE")
            current = str(row[0])
        files = {}
        for v in (current, version):
            hit = db.execute("SELECT file FROM models WHERE name = ? AND version = ?", (model, v)).fetchone()
            if hit is None:
                raise RehearsalError(f"model {model} {v} is not registered in {root}: upload it first "
                                     "or pass the bundle file")
            files[v] = (root / hit[0]).read_bytes()
        pems = [r[0] for r in db.execute("SELECT pem FROM trusted_keys")]
    finally:
        db.close()
    return files[current], files[version], pems, current


def _open_read_only(data_dir: str | Path) -> sqlite3.Connection:
    path = Path(data_dir) / "fleet.db"
    if not path.exists():
        raise RehearsalError(f"{data_dir} is not a fleet server data dir (no fleet.db); pass the server's --data-dir")
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def _device_ids(shapes: list[DeviceShape], seed: int) -> list[str]:
    """Ids `sim-NNNN` whose hardware profile (fixed by the id) is the one each shape wants: numbers
    are taken in order and skipped when their profile's quota is full."""
    wanted = Counter(s.profile for s in shapes)
    by_profile: dict[str, list[str]] = {p: [] for p in wanted}
    k = 0
    while any(len(by_profile[p]) < n for p, n in wanted.items()):
        k += 1
        device_id = f"sim-{k:04d}"
        p = profile_for(device_id, seed).name
        if p in wanted and len(by_profile[p]) < wanted[p]:
            by_profile[p].append(device_id)
    return [by_profile[s.profile].pop(0) for s in shapes]


# ------------------------------------------------------------------ the report


@dataclass
class GateReading:
    """One gate of one stage as the controller last measured it."""

    name: str
    status: str
    value: float | None
    threshold: float | None
    comparison: str
    sample: int
    min_sample: int | None
    unit: str


@dataclass
class StageReport:
    """One stage of the rehearsal: how long it took in simulated time and what it measured."""

    index: int
    mode: str
    devices: int | None
    min_soak_s: float
    started_at: float | None = None  # simulated seconds since the rollout was created
    ended_at: float | None = None
    verdict: str | None = None
    ended_by: str | None = None
    gates: list[GateReading] = field(default_factory=list)
    updated: int = 0
    failed: int = 0
    timed_out: int = 0
    waiting_for: list[str] = field(default_factory=list)

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None or self.ended_at is None:
            return None
        return self.ended_at - self.started_at

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "duration_s": self.duration_s}


@dataclass
class RehearsalReport:
    """What a rehearsal predicts: the outcome, every stage, and what it cost to run."""

    model: str
    version: str
    current_version: str
    devices: int
    outcome: str  # completed | paused | aborted | unfinished
    reason: str | None
    stages: list[StageReport]
    sim_s: float  # simulated seconds from create to the outcome
    real_s: float
    passes: int
    controller_cpu_s: float  # CPU time of the reconcile passes
    controller_max_pass_s: float
    desired_bytes: int  # MQTT desired states published (payload + topic)
    download_bytes: int  # bundle bytes served to devices
    versions: dict[str, int]  # what the simulated devices run at the end
    shape: dict[str, int]  # hardware profile -> simulated devices
    offline: int  # devices offline for the whole rehearsal
    notes: list[str] = field(default_factory=list)
    audit: list[str] = field(default_factory=list)
    rollout_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["stages"] = [s.to_dict() for s in self.stages]
        return out

    def stage(self, index: int) -> StageReport:
        return self.stages[index]

    def table(self) -> str:
        """The report as text: a summary line, one block per stage, notes."""
        lines = [
            f"rehearsal  {self.model} {self.current_version} -> {self.version}  on {self.devices} simulated "
            f"devices ({self.offline} offline)  outcome: {self.outcome.upper()}",
            f"simulated {_dur(self.sim_s)} in {self.real_s:.1f} s real; {self.passes} controller passes, "
            f"{self.controller_cpu_s:.2f} s CPU; sent {self.desired_bytes / max(self.devices, 1):.0f} B desired + "
            f"{self.download_bytes / max(self.devices, 1) / 1024:.1f} KiB bundle per device",
        ]
        if self.reason:
            lines.append(f"reason: {self.reason}")
        lines.append("")
        lines.append(f"{'stage':<14}{'devices':>8}{'soak':>9}{'took':>9}  {'verdict':<8}"
                     f"{'updated':>8}{'failed':>7}{'timeout':>8}  ended by")
        for s in self.stages:
            took = _dur(s.duration_s) if s.duration_s is not None else ("-" if s.started_at is None else "...")
            lines.append(f"{s.index + 1} {s.mode:<12}{s.devices if s.devices is not None else '-':>8}"
                         f"{_dur(s.min_soak_s):>9}{took:>9}  {s.verdict or '-':<8}{s.updated:>8}{s.failed:>7}"
                         f"{s.timed_out:>8}  {s.ended_by or ''}")
            for g in s.gates:
                value = "n/a" if g.value is None else f"{g.value:.4g}"
                bound = "" if g.threshold is None else f"{g.comparison} {g.threshold:g}"
                sample = f"{g.sample}/{g.min_sample if g.min_sample is not None else '-'} {g.unit}"
                lines.append(f"    {g.name:<22}{g.status:<9}{value:>9}  {bound:<9} {sample}")
            for w in s.waiting_for:
                lines.append(f"    waiting: {w}")
        if self.notes:
            lines.append("")
            lines += [f"note: {n}" for n in self.notes]
        lines.append("")
        lines.append("versions at the end: " + ", ".join(f"{v} {n}" for v, n in sorted(self.versions.items())))
        return "\n".join(lines)


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


# ------------------------------------------------------------------ running it


@dataclass
class _Traffic:
    """Bytes the server sent devices: desired states over MQTT and bundle downloads over HTTP."""

    desired_bytes: int = 0
    download_bytes: int = 0

    def wrap_publisher(self, publisher: Any) -> None:
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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _target_note(plan: dict[str, Any], shapes: list[DeviceShape]) -> tuple[dict[str, Any], str | None]:
    """Explicit device lists name real devices the simulation does not have: rehearse on all."""
    target = plan.get("target") or {}
    if target.get("devices"):
        return ({**plan, "target": {"all": True}},
                f"the target lists {len(target['devices'])} real devices; rehearsed on the whole simulated fleet")
    return plan, None


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
    ids = _device_ids(shapes, scenario.seed)
    shape_of = dict(zip(ids, shapes, strict=True))
    offline = [d for d in ids if not shape_of[d].online]
    if offline:
        # Devices offline on the real server stay offline: the rehearsal shows them timing out.
        scenario = dataclasses.replace(scenario, faults=(*scenario.faults, Fault(
            "offline", devices=tuple(offline), duration_min=max_sim_s / 60 + 1)))
        notes.append(f"{len(offline)} devices are offline as on the registered fleet; they stay offline")

    tmp = tempfile.TemporaryDirectory(prefix="edgefleet-rehearsal-") if workdir is None else None
    root = Path(tmp.name if tmp is not None else workdir)  # type: ignore[arg-type]
    clock = SimClock(speed=0, start=float(int(time.time())))
    config = ServerConfig(data_dir=root / "server", listen=f"127.0.0.1:{_free_port()}",
                          broker_port=_free_port(), bucket_s=max(60.0, scenario.window_s),
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
        tracker = _StageTracker(svc, rid, t0)
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
                say(f"{_dur(clock() - t0)}: stage {row['stage'] + 1}/{len(row['spec']['stages'])} {row['state']}"
                    + (f" ({row['reason']})" if row["reason"] else ""))
                last = now
            if row["state"] in FINAL_STATES or row["state"] == "paused":
                break
            waiting = (row.get("gates") or {}).get("waiting_for") or []
            if approve and row["state"] == "running" and waiting and all(w.startswith("approval") for w in waiting):
                rollouts.advance(svc, rid, actor=ACTOR)
                notes.append(f"stage {row['stage'] + 1} waits for approval: the rehearsal advanced it "
                             f"after {_dur(clock() - t0)}")
                continue
            if clock() - t0 >= max_sim_s:
                notes.append(f"stopped after {_dur(max_sim_s)} of simulated time")
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
            audit=[f"{_dur(a['ts'] - t0)} {a['actor']} {a['action']}" for a in status["audit"]],
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
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RehearsalError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


class _StageTracker:
    """Every stage the rollout has reached, as its status document shows it after each change."""

    def __init__(self, svc: Any, rid: str, t0: float) -> None:
        self.svc, self.rid, self.t0 = svc, rid, t0
        self.stages: dict[int, StageReport] = {}
        # Only a stage's live gates carry the population; between two stages keep the last seen.
        self.population = 0

    def capture(self) -> None:
        from fleet_server import rollouts
        from fleet_server.rollout_model import parse_spec

        status = rollouts.rollout_status(self.svc, self.rid)
        spec = parse_spec(status["spec"])
        self.population = status["population"] or self.population
        for st in status["stages"]:
            i = st["index"]
            size = spec.stages[i].size(self.population) if self.population else None
            report = self.stages.setdefault(i, StageReport(index=i, mode=st["mode"], devices=size,
                                                           min_soak_s=st["min_soak_s"]))
            if st["started_at"] is None or report.ended_at is not None:
                continue  # not reached, or finished: it keeps what it measured when it ended
            # A live stage's cohort: the devices taken so far that serve live (the rest of an
            # earlier, larger shadow stage stays in shadow).
            statuses = Counter(m["status"] for m in status["devices"]
                               if m["stage"] <= i and (st["mode"] == "shadow" or m["mode"] == "live"))
            report.devices = size
            report.started_at = st["started_at"] - self.t0
            report.ended_at = None if st["ended_at"] is None else st["ended_at"] - self.t0
            report.verdict = st["verdict"]
            report.ended_by = st["ended_by"]
            report.gates = [GateReading(g["name"], g["status"], g["value"], g["threshold"], g["comparison"],
                                        g["sample"], g.get("min_sample"), g["unit"]) for g in st["gates"]]
            report.updated = statuses.get("updated", 0)
            report.failed = statuses.get("failed", 0)
            report.timed_out = statuses.get("timed_out", 0)
            report.waiting_for = list(status["waiting_for"]) if report.ended_at is None else []

    def reports(self) -> list[StageReport]:
        return [self.stages[i] for i in sorted(self.stages)]


# ------------------------------------------------------------------ command line


@click.command("rehearse")
@click.option("--rollout", "plan_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Rollout plan (TOML or JSON), as 'edgefleet server rollout create --plan' takes.")
@click.option("--devices", type=click.IntRange(1, 100_000), default=200, show_default=True,
              help="Simulated devices.")
@click.option("--scenario", help="Scenario name or file: the devices' data, drift and faults "
              "(default: steady traffic from breast_cancer, one prediction a second per device).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="A real server's data dir (read only): the simulated fleet copies its hardware mix, "
                   "tags and offline devices; bundles and trusted keys come from its registry.")
@click.option("--current-bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Bundle the devices run now (default with --data-dir: the version most of them run).")
@click.option("--candidate-bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Bundle of the plan's model and version (default with --data-dir: from its registry).")
@click.option("--current", "current_version", metavar="VERSION",
              help="With --data-dir: the version the devices run now, when not the most common one.")
@click.option("--trust-key", "trust_keys", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Public key (PEM) that signed the bundles; repeatable. --data-dir adds its trusted keys.")
@click.option("--interval", type=click.FloatRange(min=1.0), default=DEFAULT_INTERVAL_S, show_default=True,
              help="Simulated seconds between two controller passes.")
@click.option("--speed", type=click.FloatRange(min=0.1),
              help="At most this many simulated seconds per real second (default: as fast as possible).")
@click.option("--max-hours", type=click.FloatRange(min=0.01), default=DEFAULT_MAX_SIM_S / 3600, show_default=True,
              help="Stop after this much simulated time (outcome 'unfinished').")
@click.option("--approve/--no-approve", default=True, show_default=True,
              help="Advance stages that wait for an operator's approval once their gates pass.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the throwaway server and devices here (default: a temporary dir, removed).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def rehearse_command(plan_path: Path, devices: int, scenario: str | None, data_dir: Path | None,
                     current_bundle: Path | None, candidate_bundle: Path | None, current_version: str | None,
                     trust_keys: tuple[Path, ...], interval: float, speed: float | None, max_hours: float,
                     approve: bool, workdir: Path | None, as_json: bool) -> None:
    """Rehearse a rollout plan on a simulated fleet before a real device is touched.

    Exits 0 when the rehearsed rollout completes, 1 when it pauses, aborts or does not finish.
    """
    from firmware_sim.scenario import ScenarioError, load_scenario
    from fleet_server.rollout_model import RolloutError
    from fleet_server.rollouts import load_plan

    try:
        plan = load_plan(plan_path)
        loaded = load_scenario(scenario) if scenario else None
        pems = [p.read_text() for p in trust_keys]
        shape = None
        current = current_bundle.read_bytes() if current_bundle else None
        candidate = candidate_bundle.read_bytes() if candidate_bundle else None
        if data_dir is not None:
            shape = fleet_shape_from_data_dir(data_dir)
            if current is None or candidate is None:
                cur, cand, keys, _ = registry_from_data_dir(data_dir, str(plan.get("model")),
                                                            str(plan.get("version")), current_version)
                current, candidate = current or cur, candidate or cand
                pems += keys
        if current is None or candidate is None:
            raise RehearsalError("give --current-bundle and --candidate-bundle, or --data-dir of the server "
                                 "whose registry holds both versions")
        report = rehearse(plan, devices=devices, scenario=loaded, current_bundle=current,
                          candidate_bundle=candidate, trusted_keys=pems, fleet_shape=shape, speed=speed,
                          interval_s=interval, max_sim_s=max_hours * 3600, approve=approve, workdir=workdir,
                          progress=None if as_json else (lambda m: click.echo(m, err=True)))
    except (RehearsalError, RolloutError, ScenarioError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.table())
    if report.outcome != "completed":
        raise SystemExit(1)

