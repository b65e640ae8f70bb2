"""The chaos suite: a simulated fleet in a rollout while processes die and devices misbehave.

A fleet server runs as its own process (`edgefleet server run`, managed Mosquitto) in real time;
a `SimFleet` of real agents shares that time (a `SimClock` at speed 1). A seeded `ChaosPlan`
decides, reproducibly, when the driver kills the broker (`kill -9`, restarted a few seconds later
as a supervisor would), kills the fleet server (`kill -9`, restarted), cuts a device's power,
cuts devices off the network for a while, and which devices have a full disk, receive corrupted
downloads or crash in an update state. When the chaos is over and everything is back, the run
checks the invariants and returns them as rows (name, expected, observed, pass):

- every device runs a model whose signature verifies: the rollout's target, or the previous
  version with a reason (a failed update and its error, a timeout);
- every telemetry window or event the server acknowledged to its device is stored exactly once,
  and every seq the server is missing is one the device reports as dropped (settling waits until
  every outbox is empty: acknowledged by the server, resent where a killed broker lost it);
- the rollout's stored state matches what the devices run and report;
- the server's bucket sums and drift equal a recomputation from the stored windows (as the
  devices sent them).

    report = run_chaos(ChaosPlan(seed=1, devices=200, duration=300), workdir=Path(".chaos"))
    print(report.table())
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import msgspec
import requests

from edge_agent.protocol import TelemetryWindow, decode
from edge_agent.update.events import State
from firmware_sim.clock import SimClock
from firmware_sim.fleet import SimFleet
from firmware_sim.provision import ServicesProvisioner
from firmware_sim.scenario import Fault, Scenario

log = logging.getLogger("firmware_sim.chaos")

MODEL = "tumour"
CURRENT, TARGET = "1.0.0", "2.0.0"
# States a device may be killed in during its update (Idle is not an update).
UPDATE_STATES = ("Download", "Verify", "Install", "SelfTest", "Activate", "Probation")
FINAL = ("completed", "paused", "aborted")
RESEND_AFTER_S = 5.0  # the devices' outbox.resend_after_s (the server acknowledges every 0.5 s)


class ChaosError(RuntimeError):
    """The chaos run could not be set up or did not settle; the message says what and where."""


# ------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class ChaosRates:
    """How much goes wrong: process kills and device faults per minute of chaos, fault shares."""

    broker_kills_per_min: float = 0.5
    server_kills_per_min: float = 1.0
    power_cuts_per_min: float = 8.0
    cut_offs_per_min: float = 8.0
    cut_off_s: tuple[float, float] = (5.0, 25.0)  # how long a device is cut off
    process_down_s: tuple[float, float] = (2.0, 6.0)  # how long the broker or server stays dead
    full_disk_share: float = 0.02
    corrupt_download_share: float = 0.03
    crash_in_update_share: float = 0.03


@dataclass(frozen=True)
class ChaosEvent:
    """One thing the driver does, `at` seconds after the chaos starts."""

    at: float
    kind: str  # broker_kill | server_kill | power_cut | cut_off
    target: str  # a device id, or "broker" / "server"
    duration: float = 0.0


@dataclass(frozen=True)
class ChaosPlan:
    """A reproducible chaos run: the same seed gives the same devices, faults and timeline."""

    seed: int = 1
    devices: int = 200
    duration: float = 300.0  # seconds of chaos (real time: the server runs on the real clock)
    rates: ChaosRates = field(default_factory=ChaosRates)
    window_s: float = 5.0  # telemetry window of every device
    rate_per_s: float = 2.0  # predictions per second per device
    bucket_s: float = 30.0  # the server's drift bucket

    @property
    def device_ids(self) -> list[str]:
        return [f"sim-{i:04d}" for i in range(1, self.devices + 1)]

    def _rng(self, what: str) -> random.Random:
        return random.Random(f"{self.seed}:{what}")

    def device_faults(self) -> dict[str, list[str]]:
        """Devices with a standing fault, by kind (disjoint: one standing fault per device)."""
        ids = self.device_ids
        self._rng("devices").shuffle(ids)
        out: dict[str, list[str]] = {}
        at = 0
        for kind, share in (("full_disk", self.rates.full_disk_share),
                            ("corrupt_download", self.rates.corrupt_download_share),
                            ("crash_in_state", self.rates.crash_in_update_share)):
            n = round(share * self.devices)
            out[kind] = sorted(ids[at : at + n])
            at += n
        return out

    def crash_states(self) -> dict[str, str]:
        """The update state each `crash_in_state` device loses power in."""
        rng = self._rng("crash-states")
        return {d: rng.choice(UPDATE_STATES) for d in self.device_faults()["crash_in_state"]}

    def events(self) -> list[ChaosEvent]:
        """The driver's timeline: process kills one at a time (never overlapping, ten seconds
        apart), power cuts and cut-offs of random devices at random times."""
        r = self.rates
        minutes = self.duration / 60.0
        rng = self._rng("events")
        out: list[ChaosEvent] = []
        # Infrastructure outages: spread over the first 80 % of the chaos, one at a time.
        kinds = (["server_kill"] * max(1, round(r.server_kills_per_min * minutes))
                 + ["broker_kill"] * max(1, round(r.broker_kills_per_min * minutes)))
        rng.shuffle(kinds)
        slot = 0.8 * self.duration / len(kinds)
        for i, kind in enumerate(kinds):
            down = rng.uniform(*r.process_down_s)
            start = i * slot + rng.uniform(0.0, max(0.0, slot - down - 10.0))
            out.append(ChaosEvent(round(start, 2), kind, kind.split("_")[0], round(down, 2)))
        ids = self.device_ids
        for _ in range(round(r.power_cuts_per_min * minutes)):
            out.append(ChaosEvent(round(rng.uniform(0, self.duration), 2), "power_cut", rng.choice(ids)))
        for _ in range(round(r.cut_offs_per_min * minutes)):
            out.append(ChaosEvent(round(rng.uniform(0, self.duration), 2), "cut_off", rng.choice(ids),
                                  round(rng.uniform(*r.cut_off_s), 2)))
        return sorted(out, key=lambda e: (e.at, e.kind, e.target))

    def scenario(self) -> Scenario:
        """The fleet's scenario: steady traffic plus the standing device faults."""
        faults = self.device_faults()
        crash = self.crash_states()
        fault_list = [Fault("full_disk", devices=tuple(faults["full_disk"])),
                      Fault("corrupt_download", devices=tuple(faults["corrupt_download"]))]
        for state in sorted(set(crash.values())):
            fault_list.append(Fault("crash_in_state", devices=tuple(d for d, s in crash.items() if s == state),
                                    state=state))
        return Scenario(name="chaos", description=f"chaos seed {self.seed}", rate_per_s=self.rate_per_s,
                        window_s=self.window_s, duration_min=self.duration / 60.0, speed=1.0, seed=self.seed,
                        faults=tuple(f for f in fault_list if f.devices))

    def rollout(self) -> dict[str, Any]:
        """Three live stages with short soaks; gates wide enough for the planted faults."""
        return {
            "model": MODEL, "version": TARGET, "target": {"all": True}, "on_failure": "pause",
            "device_timeout_s": 45,
            "stages": [{"percent": 10, "min_soak_s": 5}, {"percent": 50, "min_soak_s": 5},
                       {"percent": 100, "min_soak_s": 5}],
            # Every planted fault fails or delays an update on purpose: the gates must not stop
            # the rollout for the faults the run plants itself.
            "gates": {"update_failure_rate": {"max": 0.5}, "timeout_share": {"max": 0.5}},
        }


# ------------------------------------------------------------------ the processes


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # a zombie is dead, only not yet reaped


def _wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise ChaosError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class ServerProcess:
    """`edgefleet server run` in its own process, and the managed broker it starts or adopts."""

    def __init__(self, data_dir: Path, http_port: int, broker_port: int) -> None:
        self.data_dir = data_dir
        self.http_port = http_port
        self.broker_port = broker_port
        self.proc: subprocess.Popen | None = None
        self.broker_proc: subprocess.Popen | None = None  # a broker this driver restarted itself
        self.starts = 0

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    def start(self, timeout: float = 60.0) -> None:
        self.starts += 1
        log_file = open(self.data_dir / f"server-{self.starts}.log", "wb")  # noqa: SIM115 - the child owns it
        with log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from edge_agent.entry import main; main()", "server", "run",
                 "--data-dir", str(self.data_dir)],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            )
        _wait_for(self.up, timeout, f"the fleet server to answer on 127.0.0.1:{self.http_port}")

    def up(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            tail = (self.data_dir / f"server-{self.starts}.log").read_text(errors="replace")[-1500:]
            raise ChaosError(f"the fleet server exited: {tail}")
        try:
            return requests.get(f"http://127.0.0.1:{self.http_port}/api/v1/health", timeout=1).ok
        except requests.RequestException:
            return False

    def kill(self) -> None:
        """kill -9: no clean shutdown, no batch finished, no session closed."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def broker_pid(self) -> int | None:
        try:
            pid = int((self.broker_dir / "mosquitto.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _pid_alive(pid) else None

    def kill_broker(self) -> None:
        pid = self.broker_pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGKILL)
        if self.broker_proc is not None and self.broker_proc.pid == pid:
            self.broker_proc.wait()
        _wait_for(lambda: not _pid_alive(pid), 10, "the killed broker to go")

    def restart_broker(self) -> None:
        """Start Mosquitto again on the server's own configuration, as its supervisor would; a
        later server start adopts it through its pid file."""
        from fleet_server.broker import MOSQUITTO

        with open(self.broker_dir / "mosquitto.stderr", "ab") as err:
            self.broker_proc = subprocess.Popen([MOSQUITTO, "-c", str(self.broker_dir / "mosquitto.conf")],
                                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                                start_new_session=True)

        def listening() -> bool:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.broker_port), 0.2):
                return True
            return False

        _wait_for(listening, 10, "the restarted broker to listen")

    def stop(self) -> None:
        """A clean stop of the server, then of whatever broker is left."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        pid = self.broker_pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            with contextlib.suppress(ChaosError):
                _wait_for(lambda: not _pid_alive(pid), 10, "the broker to stop")
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self.broker_proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.broker_proc.wait(5)


# ------------------------------------------------------------------ what the devices sent


class WindowRecorder:
    """Every telemetry window as a device queued it, keyed by (device, seq); samples dropped."""

    def __init__(self) -> None:
        self.windows: dict[tuple[str, int], TelemetryWindow] = {}
        self._lock = threading.Lock()

    def __call__(self, device_id: str, seq: int, payload: bytes) -> None:
        w = decode("telemetry", payload)
        assert isinstance(w, TelemetryWindow)
        with self._lock:
            self.windows[(device_id, seq)] = msgspec.structs.replace(w, sample=[])


# ------------------------------------------------------------------ the report


@dataclass(frozen=True)
class Invariant:
    """One checked property: what it should be, what was observed, whether it holds."""

    name: str
    expected: str
    observed: str
    passed: bool
    details: tuple[str, ...] = ()


@dataclass
class ChaosReport:
    """The outcome of a chaos run: the invariants, what the driver did, and the run's figures."""

    plan: ChaosPlan
    invariants: list[Invariant]
    executed: list[str]
    facts: dict[str, Any]
    real_s: float

    @property
    def passed(self) -> bool:
        return all(i.passed for i in self.invariants)

    def table(self, details: int = 5) -> str:
        """The invariants as a table, then the run's figures (and a few failing details)."""
        w = max(len(i.name) for i in self.invariants)
        we = max(len("expected"), *(len(i.expected) for i in self.invariants))
        wo = max(len("observed"), *(len(i.observed) for i in self.invariants))
        lines = [f"chaos seed {self.plan.seed}: {self.plan.devices} devices, {self.plan.duration:.0f} s of chaos, "
                 f"{self.real_s:.0f} s in all",
                 "  ".join(self.facts_line()), "",
                 f"{'invariant':<{w}}  {'expected':<{we}}  {'observed':<{wo}}  pass",
                 f"{'-' * w}  {'-' * we}  {'-' * wo}  ----"]
        for i in self.invariants:
            lines.append(f"{i.name:<{w}}  {i.expected:<{we}}  {i.observed:<{wo}}  {'yes' if i.passed else 'NO'}")
        for i in self.invariants:
            if not i.passed and i.details:
                lines.append("")
                lines.append(f"{i.name}:")
                lines += [f"  {d}" for d in i.details[:details]]
                if len(i.details) > details:
                    lines.append(f"  ... {len(i.details) - details} more")
        lines.append("")
        lines.append("RESULT: " + ("every invariant holds" if self.passed else "INVARIANTS VIOLATED"))
        return "\n".join(lines)

    def facts_line(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.facts.items()]

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.plan.seed, "devices": self.plan.devices, "duration": self.plan.duration,
                "passed": self.passed, "real_s": self.real_s, "facts": self.facts, "executed": self.executed,
                "invariants": [{"name": i.name, "expected": i.expected, "observed": i.observed,
                                "pass": i.passed, "details": list(i.details)} for i in self.invariants]}


# ------------------------------------------------------------------ running it


class _Driver:
    """Carries out a plan's events on time: infrastructure in one thread, devices in another."""

    def __init__(self, plan: ChaosPlan, server: ServerProcess, fleet: SimFleet, say: Callable[[str], None]) -> None:
        self.plan, self.server, self.fleet, self.say = plan, server, fleet, say
        self.executed: list[str] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self.t0 = 0.0

    def _log(self, event: ChaosEvent, what: str) -> None:
        line = f"{time.monotonic() - self.t0:6.1f}s  {event.kind:<12} {event.target:<9} {what}"
        with self._lock:
            self.executed.append(line)
        self.say(line)

    def _run(self, events: list[ChaosEvent]) -> None:
        try:
            for e in events:
                delay = self.t0 + e.at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                self._do(e)
        except BaseException as exc:  # reported by run(): a driver that failed invalidates the run
            log.exception("the chaos driver failed")
            self.errors.append(exc)

    def _do(self, e: ChaosEvent) -> None:
        if e.kind == "server_kill":
            self.server.kill()
            self._log(e, f"kill -9, down {e.duration:.1f} s")
            time.sleep(e.duration)
            self.server.start()
            self._log(e, "restarted")
        elif e.kind == "broker_kill":
            self.server.kill_broker()
            self._log(e, f"kill -9, down {e.duration:.1f} s")
            time.sleep(e.duration)
            self.server.restart_broker()
            self._log(e, "restarted")
        elif e.kind == "power_cut":
            self._log(e, "power cut" if self.fleet.power_cut(e.target) else "already down")
        elif e.kind == "cut_off":
            self.fleet.cut_off(e.target, e.duration)
            self._log(e, f"no network for {e.duration:.1f} s")

    def run(self) -> None:
        events = self.plan.events()
        self.t0 = time.monotonic()
        infra = [e for e in events if e.kind in ("server_kill", "broker_kill")]
        devices = [e for e in events if e not in infra]
        threads = [threading.Thread(target=self._run, args=(x,), name=f"chaos-{n}", daemon=True)
                   for n, x in (("infra", infra), ("devices", devices))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self.errors:
            raise ChaosError(f"the chaos driver failed: {self.errors[0]!r}") from self.errors[0]


def _server_toml(http_port: int, broker_port: int, plan: ChaosPlan) -> str:
    return (f'listen = "127.0.0.1:{http_port}"\nbroker_port = {broker_port}\nbucket_s = {plan.bucket_s}\n'
            f"bucket_grace_s = {plan.window_s}\nalert_interval_s = 2.0\nrollout_interval_s = 1.0\n"
            # Acknowledge deliveries within a second; devices resend after 5 s (RESEND_AFTER_S).
            "broker_sync_interval_s = 1.0\nack_interval_s = 0.5\n")


def _agent_overrides(config: Any) -> None:
    # Probation in seconds, not minutes: the chaos is real time.
    config.update.probation_predictions = 20
    config.update.probation_s = 10.0
    # What a killed broker took but lost is sent again after seconds, not minutes.
    config.outbox.resend_after_s = RESEND_AFTER_S


def _settled_fleet(fleet: SimFleet) -> bool:
    """Every device running, online, with a network and no update under way."""
    for s in fleet.states().values():
        if not s.running or not s.online or s.network_down or s.update_state != State.IDLE.value:
            return False
    return True


def run_chaos(plan: ChaosPlan, workdir: Path, *, say: Callable[[str], None] = lambda m: None,
              settle_timeout_s: float = 240.0) -> ChaosReport:
    """Set up a server and a fleet in `workdir`, run the plan's chaos, settle, check the invariants."""
    from cryptography.hazmat.primitives import serialization

    from firmware_sim.models import build_model
    from fleet_server import rollouts
    from fleet_server.config import load_config
    from fleet_server.registry import trust_key, upload_bundle
    from fleet_server.service import bootstrap
    from model_tools.signing import generate_keypair

    real_start = time.monotonic()
    if (workdir / "server" / "fleet.db").exists():
        raise ChaosError(f"{workdir} holds an earlier run: pass an empty or new work dir")
    data_dir = workdir / "server"
    data_dir.mkdir(parents=True, exist_ok=True)
    http_port, broker_port = _free_port(), _free_port()
    (data_dir / "server.toml").write_text(_server_toml(http_port, broker_port, plan))
    svc = bootstrap(load_config(data_dir))
    server = ServerProcess(data_dir, http_port, broker_port)
    recorder = WindowRecorder()
    fleet: SimFleet | None = None
    try:
        say("training and signing two model versions")
        private, public = generate_keypair()
        pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        trust_key(svc, pem, "chaos signer")
        current = build_model(private, name=MODEL, version=CURRENT).bundle_bytes
        upload_bundle(svc, current)
        upload_bundle(svc, build_model(private, name=MODEL, version=TARGET, variant="logreg-strong").bundle_bytes)
        say(f"provisioning {plan.devices} devices")
        fleet = SimFleet(plan.scenario(), devices=plan.devices, provisioner=ServicesProvisioner(svc),
                         workdir=workdir / "sim", clock=SimClock(speed=1.0), agent_overrides=_agent_overrides,
                         window_tap=recorder)
        fleet.provision().preinstall(current)
        say(f"starting the fleet server (http 127.0.0.1:{http_port}, broker 127.0.0.1:{broker_port})")
        server.start()
        fleet.start(wait_online=120)
        _wait_for(lambda: all((svc.storage.get_device(d) or {}).get("active_version") == CURRENT for d in fleet.ids),
                  60, f"the server to see every device on {CURRENT}")
        rid = rollouts.create_rollout(svc, plan.rollout(), actor="chaos")["id"]
        say(f"rollout {rid} of {MODEL} {TARGET} created; {plan.duration:.0f} s of chaos")
        driver = _Driver(plan, server, fleet, say)
        driver.run()
        say("chaos over: waiting for the rollout to finish and the fleet to settle")
        _wait_for(lambda: svc.storage.get_rollout(rid)["state"] in FINAL, settle_timeout_s,
                  "the rollout to finish", 0.5)
        fleet.wait(lambda: _settled_fleet(fleet), settle_timeout_s, "every device up, online and idle")
        fleet.wait(fleet.delivered, settle_timeout_s, "every outbox acknowledged by the server")
        fleet.wait(lambda: fleet.ingested(svc.storage.seq_stats()), settle_timeout_s, "the server to store every message")
        states = fleet.states()
        fleet.stop()
        _wait_quiet(data_dir)
        invariants = check_invariants(svc, plan, fleet, states, recorder, rid, [pem])
        status = rollouts.rollout_status(svc, rid)
        facts = {
            "rollout": f"{status['state']}",
            "server_starts": server.starts,
            "crashes": sum(s.crashes for s in states.values()),
            "windows_sent": len(recorder.windows),
        }
        return ChaosReport(plan, invariants, driver.executed, facts, time.monotonic() - real_start)
    finally:
        if fleet is not None:
            fleet.stop()
        server.stop()
        svc.storage.close()


def _wait_quiet(data_dir: Path, quiet_s: float = 2.0, timeout: float = 60.0) -> None:
    """Wait until the server has stored nothing new for `quiet_s` (the last messages of the
    fleet's clean shutdown are in)."""
    db = _read_only(data_dir)
    try:
        last, since = None, time.monotonic()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now_count = db.execute("SELECT COUNT(*) FROM seqs").fetchone()[0]
            if now_count != last:
                last, since = now_count, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                return
            time.sleep(0.2)
    finally:
        db.close()


def _read_only(data_dir: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{data_dir / 'fleet.db'}?mode=ro", uri=True)


# ------------------------------------------------------------------ the invariants


def _outbox_state(path: Path) -> tuple[range, set[int], int]:
    """(the seqs the outbox made, those still queued, dropped total) of a stopped device's outbox."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        pending = {r[0] for r in db.execute("SELECT seq FROM messages")}
    finally:
        db.close()
    next_seq = max(int(meta.get("next_seq", 0)), max(pending, default=-1) + 1)
    return range(int(meta.get("first_seq", 0)), next_seq), pending, int(meta.get("dropped_total", 0))


def _row(name: str, expected: str, observed: str, problems: list[str]) -> Invariant:
    return Invariant(name, expected, observed, not problems, tuple(problems))


def check_invariants(svc: Any, plan: ChaosPlan, fleet: SimFleet, states: dict[str, Any],
                     recorder: WindowRecorder, rollout_id: str, trusted_pems: list[bytes]) -> list[Invariant]:
    """Every invariant of a settled, stopped chaos run, in the order the table shows them."""
    db = _read_only(svc.config.data_dir)
    try:
        return [*_model_invariants(svc, plan, fleet, states, rollout_id),
                *_delivery_invariants(db, fleet),
                *_sum_invariants(svc, db, plan, recorder)]
    finally:
        db.close()


def _model_invariants(svc: Any, plan: ChaosPlan, fleet: SimFleet, states: dict[str, Any],
                      rollout_id: str) -> list[Invariant]:
    from edge_agent.agent import trusted_keys_from_config
    from edge_agent.store import DataDir
    from fleet_server import rollouts
    from model_tools.bundle import BundleError, load_extracted

    status = rollouts.rollout_status(svc, rollout_id)
    members = {m["device"]: m for m in status["devices"]}
    registry = {d: svc.storage.get_device(d) or {} for d in fleet.ids}
    faults = plan.device_faults()
    standing = {d: k for k, ds in faults.items() for d in ds}

    verified, unverified = 0, []
    reasons: Counter[str] = Counter()
    unexplained: list[str] = []
    mismatched: list[str] = []
    registry_off: list[str] = []
    for device_id in fleet.ids:
        s = states[device_id]
        device = fleet.devices[device_id]
        data = DataDir(device.config.data_dir)
        active, _ = data.committed()
        version = s.active_version
        try:
            if version is None or active != version:
                raise BundleError(f"serves {version} but committed {active}")
            load_extracted(data.version_dir(version), trusted_keys_from_config(device.config))
            verified += 1
        except (BundleError, ValueError, OSError) as exc:
            unverified.append(f"{device_id}: {exc}")
        m = members.get(device_id)
        m_status = m["status"] if m else None
        if version == TARGET:
            reasons["updated"] += 1
        elif version == CURRENT:
            if m_status == "failed":
                why = s.last_error or "failed (no error recorded)"
                reasons[f"failed: {_short(why)}"] += 1
            elif m_status == "timed_out":
                reasons["timed out"] += 1
            elif status["state"] != "completed" and m is None:
                reasons["not in a stage yet"] += 1
            else:
                unexplained.append(f"{device_id}: on {version}, rollout says {m_status}, update state "
                                   f"{s.update_state}, last error {s.last_error!r}, fault {standing.get(device_id)}")
        else:
            unexplained.append(f"{device_id}: runs {version!r}, neither {TARGET} nor {CURRENT}")
        # What the rollout stored about the device against what it runs.
        if m_status == "updated" and version != TARGET:
            mismatched.append(f"{device_id}: rollout says updated, device runs {version}"
                              f" ({_update_story(svc, rollout_id, device_id, m)})")
        if m_status == "failed" and version == TARGET:
            mismatched.append(f"{device_id}: rollout says failed, device runs {TARGET}"
                              f" ({_update_story(svc, rollout_id, device_id, m)})")
        if m is None and status["state"] == "completed":
            mismatched.append(f"{device_id}: the completed rollout never took it")
        reg = registry[device_id]
        if reg.get("active_version") != version or reg.get("update_state") != s.update_state:
            registry_off.append(f"{device_id}: server has {reg.get('active_version')}/{reg.get('update_state')}, "
                                f"device {version}/{s.update_state}")
    n = len(fleet.ids)
    by_status = Counter(m["status"] for m in status["devices"])
    return [
        _row("signature of the running model verifies", f"{n}/{n}", f"{verified}/{n}", unverified),
        _row("model is the target or previous, with a reason", f"{n} explained",
             f"{n - len(unexplained)} explained: " + ", ".join(f"{v} {k}" for k, v in sorted(reasons.items())),
             unexplained),
        _row("rollout finished", "completed", status["state"] + (f" ({status['reason']})" if status["reason"] else ""),
             [] if status["state"] == "completed" else [f"{status['state']}: {status['reason']}"]),
        _row("rollout state matches the devices", "0 mismatches",
             f"{len(mismatched)} mismatches ({', '.join(f'{v} {k}' for k, v in sorted(by_status.items()))})",
             mismatched),
        _row("server registry matches the devices", "0 differences", f"{len(registry_off)} differences",
             registry_off),
    ]


def _update_story(svc: Any, rollout_id: str, device_id: str, member: dict[str, Any]) -> str:
    """What a device did in the rollout, for a mismatch message: its member row and outcomes."""
    events = [e for e in svc.storage.rollout_events(rollout_id) if e["device"] == device_id
              and e["kind"] in ("outcome", "refused")]
    told = {k: member.get(k) for k in ("stage", "mode", "status_at", "desired_at", "live_at")}
    return f"member {told}; events " + "; ".join(
        f"seq {e['seq']} {e['kind']} {e.get('version')} {e.get('outcome')} {e.get('reason')!r}" for e in events[-6:])


def _short(text: str, n: int = 32) -> str:
    """A reason's head, so that equal reasons count together in the table."""
    return text.split(":")[0].split(" (")[0][:n]


def _delivery_invariants(db: sqlite3.Connection, fleet: SimFleet) -> list[Invariant]:
    from edge_agent.store import DataDir

    stored: dict[str, set[int]] = defaultdict(set)
    for device, seq in db.execute("SELECT device, seq FROM seqs"):
        stored[device].add(seq)
    server_dropped = dict(db.execute("SELECT device, dropped_total FROM seq_stats").fetchall())
    acked_total = stored_total = missing_total = dropped_total = 0
    lost, phantom, unreported = [], [], []
    for device_id in fleet.ids:
        made, pending, dropped = _outbox_state(DataDir(fleet.devices[device_id].config.data_dir).outbox_file)
        acked = set(made) - pending  # acknowledged by the server, or dropped by the device
        have = stored[device_id]
        missing = acked - have
        acked_total += len(acked) - dropped
        stored_total += len(have & acked)
        missing_total += len(missing)
        dropped_total += dropped
        if len(missing) > dropped:
            lost.append(f"{device_id}: {len(missing) - dropped} acknowledged seqs not stored "
                        f"(first {sorted(missing)[:5]}), device dropped {dropped}")
        extra = {seq for seq in have if seq not in made}
        if extra:
            phantom.append(f"{device_id}: stored seqs the device never made: {sorted(extra)[:5]}")
        if dropped != server_dropped.get(device_id, 0) and (dropped or missing):
            unreported.append(f"{device_id}: device dropped {dropped}, server was told {server_dropped.get(device_id)}")
    # A window counted twice would show in the bucket sums: each device's windows once.
    doubled = [f"{device}: buckets count {b} windows, {w} stored"
               for device, b, w in db.execute(
                   "SELECT b.device, b.n, w.n FROM (SELECT device, SUM(windows) n FROM buckets GROUP BY device) b "
                   "JOIN (SELECT device, COUNT(*) n FROM windows GROUP BY device) w USING (device) WHERE b.n != w.n")]
    return [
        _row("acknowledged messages stored (seq accounting)", f"{acked_total} of {acked_total}",
             f"{stored_total} of {acked_total}, {missing_total} missing", lost + phantom),
        _row("no window counted twice", "0 devices", f"{len(doubled)} devices", doubled),
        _row("every gap is a drop the device reported", f"{dropped_total} reported drops",
             f"{missing_total} gaps, {len(unreported)} unreported", unreported + lost),
    ]


def _sum_invariants(svc: Any, db: sqlite3.Connection, plan: ChaosPlan, recorder: WindowRecorder) -> list[Invariant]:
    from fleet_server.drift_service import drift, profile_of, report_for
    from fleet_server.registry import get_model
    from fleet_server.telemetry import BucketSums, bucket_start, sum_rows

    stored = db.execute("SELECT device, seq, model_version, predictions, requests, errors, latency, prediction "
                        "FROM windows").fetchall()
    differ: list[str] = []
    recomputed: dict[tuple[str, str, float], BucketSums] = defaultdict(BucketSums)
    totals: dict[str, BucketSums] = defaultdict(BucketSums)
    for device, seq, version, predictions, n_requests, errors, latency, prediction in stored:
        w = recorder.windows.get((device, seq))
        if w is None:
            differ.append(f"{device} seq {seq}: stored, but the device never queued it")
            continue
        sent = (w.model_version, w.predictions, w.requests, sum(w.errors.values()), list(w.latency.counts),
                msgspec.to_builtins(w.prediction))
        if sent != (version, predictions, n_requests, errors, json.loads(latency), json.loads(prediction or "null")):
            differ.append(f"{device} seq {seq}: stored {version, predictions, n_requests, errors} "
                          f"but sent {sent[:4]}")
        recomputed[(version, device, bucket_start(w, plan.bucket_s))].add_window(w)
        totals[version].add_window(w)
    windows_row = _row("stored windows are what the devices sent", f"{len(stored)} identical",
                       f"{len(stored) - len(differ)} identical", differ)
    bucket_diffs: list[str] = []
    drift_diffs: list[str] = []
    checked = 0
    for version in sorted(totals):
        rows = svc.storage.bucket_rows(MODEL, version, None, None, None)
        server: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            server[(r["device"], r["bucket_start"])].append(r)
        mine = {(d, b): s for (v, d, b), s in recomputed.items() if v == version}
        for key in sorted(set(server) | set(mine)):
            checked += 1
            got, want = sum_rows(server.get(key, [])), mine.get(key, BucketSums())
            a, b = _comparable(got), _comparable(want)
            if a != b or abs(got.latency_sum_ms - want.latency_sum_ms) > 1e-6 * max(1.0, want.latency_sum_ms):
                fields = [k for k in a if a[k] != b[k]] or ["latency_sum_ms"]
                bucket_diffs.append(f"{version} {key[0]} bucket {key[1]:.0f}: {', '.join(fields)} differ")
        # Drift the server reports for the whole fleet against drift computed from the windows.
        row = get_model(svc, MODEL, version)
        served = drift(svc, MODEL, version, "fleet")
        mine_report = report_for(profile_of(row), totals[version])
        if mine_report is None:
            continue
        theirs = {f["name"]: f for f in served["features"]}
        if served.get("prediction"):
            theirs["prediction"] = served["prediction"]
        ours = dict(mine_report.features)
        if mine_report.prediction is not None:
            ours["prediction"] = mine_report.prediction
        for name, fd in ours.items():
            t = theirs.get(name)
            for metric in ("psi", "js", "ks"):
                x, y = getattr(fd, metric, None), (t or {}).get(metric)
                if x is None and y is None:
                    continue
                if x is None or y is None or abs(x - y) > 1e-9:
                    drift_diffs.append(f"{version} {name} {metric}: server {y}, recomputed {x}")
    n_drift = sum(1 for v in totals for _ in ("psi",))
    return [
        windows_row,
        _row("bucket sums equal a recomputation", f"{checked} buckets equal", f"{checked - len(bucket_diffs)} equal",
             bucket_diffs),
        _row("drift equals a recomputation", f"{n_drift} versions, 0 differences",
             f"{len(drift_diffs)} differences", drift_diffs),
    ]


def _comparable(s: Any) -> dict[str, Any]:
    return {"windows": s.windows, "predictions": s.predictions, "requests": s.requests,
            "errors": {k: v for k, v in s.errors.items() if v}, "latency": list(s.latency),
            "features": [list(f) for f in s.features or []], "prediction": list(s.prediction or [])}


# ------------------------------------------------------------------ command line


@click.command("chaos")
@click.option("--seed", type=int, default=1, show_default=True,
              help="Seeds which devices get which faults and the whole timeline; the same seed replays the run.")
@click.option("--devices", type=click.IntRange(10, 5_000), default=200, show_default=True,
              help="Simulated devices (real agents, one MQTT connection each).")
@click.option("--duration", type=click.FloatRange(min=10.0), default=300.0, show_default=True,
              help="Seconds of chaos (real time: the fleet server runs on the real clock).")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the server's data dir and the devices here (default: a temporary dir, removed).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def chaos_command(seed: int, devices: int, duration: float, workdir: Path | None, as_json: bool) -> None:
    """Run a rollout on a simulated fleet while processes die and devices fail; check invariants.

    Exits 0 when every invariant holds, 1 when one does not.
    """
    plan = ChaosPlan(seed=seed, devices=devices, duration=duration)
    echo = (lambda m: click.echo(m, err=True)) if not as_json else (lambda m: None)
    try:
        if workdir is None:
            with tempfile.TemporaryDirectory(prefix="edgefleet-chaos-") as tmp:
                report = run_chaos(plan, Path(tmp), say=echo)
        else:
            report = run_chaos(plan, workdir, say=echo)
    except ChaosError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(report.table())
    if not report.passed:
        raise SystemExit(1)
