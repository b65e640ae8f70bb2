"""Running a chaos plan: set up a server and a fleet, carry out the timeline, settle, check."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.update.events import State
from firmware_sim.chaos.invariants import (
    check_invariants,
    read_server_db,
    retained_desired_invariant,
)
from firmware_sim.chaos.plan import (
    BROKER_RESTART_BACKOFF_S,
    CURRENT,
    MODEL,
    TARGET,
    ChaosError,
    ChaosEvent,
    ChaosPlan,
)
from firmware_sim.chaos.processes import ServerProcess, wait_for
from firmware_sim.chaos.recorder import WindowRecorder
from firmware_sim.chaos.report import ChaosReport
from firmware_sim.chaos.rotations import Rotations
from firmware_sim.clock import SimClock
from firmware_sim.fleet import SimFleet
from firmware_sim.local import free_port
from firmware_sim.provision import ServicesProvisioner

log = logging.getLogger("firmware_sim.chaos")

FINAL = ("completed", "paused", "aborted")
FINAL_CUT_OFF_S = 15.0  # the last rotated device is cut off across the last broker kill
ROTATION_TIMEOUT_S = 90.0
RESEND_AFTER_S = 5.0  # the devices' outbox.resend_after_s (the server acknowledges every 0.5 s)


class _Driver:
    """Carries out a plan's events on time: infrastructure in one thread, devices in another."""

    def __init__(self, plan: ChaosPlan, server: ServerProcess, fleet: SimFleet, rotations: Rotations,
                 say: Callable[[str], None]) -> None:
        self.plan, self.server, self.fleet, self.rotations, self.say = plan, server, fleet, rotations, say
        self.executed: list[str] = []
        self.broker_restarts = 0  # by the server's supervisor: this driver never starts a broker
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
            self.kill_broker(e)
        elif e.kind == "rotate":
            self._log(e, f"password rotation {self.rotations.rotate(e.target)}")
        elif e.kind == "power_cut":
            self._log(e, "power cut" if self.fleet.power_cut(e.target) else "already down")
        elif e.kind == "cut_off":
            self.fleet.cut_off(e.target, e.duration)
            self._log(e, f"no network for {e.duration:.1f} s")

    def kill_broker(self, e: ChaosEvent, rewind_to: Path | None = None) -> None:
        """kill -9 of the broker; the server's supervisor starts it again (after its backoff) and
        the server republishes every desired state: the driver only waits for that."""
        killed_at = time.monotonic()
        pid = self.server.kill_broker(rewind_to)
        if pid is None:
            self._log(e, "no broker running")
            return
        self._log(e, "kill -9" + (", its saved state rewound to before the rollout" if rewind_to else ""))
        self.server.wait_broker_restarted(pid)
        self.broker_restarts += 1
        self._log(e, f"restarted by the server's supervisor after {time.monotonic() - killed_at:.1f} s")

    def rewound_broker_kill(self, device_id: str, saved: Path) -> None:
        """The worst broker crash, once the rollout is over: its state comes back from before the
        rollout (no desired retained, nor the notice of a rotation announced just before). The
        server's supervisor must start it and the server republish every desired and announce the
        rotation again, which the device, cut off meanwhile, finds when it is back."""
        cut = ChaosEvent(time.monotonic() - self.t0, "cut_off", device_id, FINAL_CUT_OFF_S)
        self.fleet.cut_off(device_id, FINAL_CUT_OFF_S)
        self._log(cut, f"no network for {FINAL_CUT_OFF_S:.1f} s")
        self.fleet.wait(lambda: not self.fleet.states()[device_id].online, 30, f"{device_id} to go offline")
        self._do(ChaosEvent(time.monotonic() - self.t0, "rotate", device_id))
        wait_for(lambda: self.rotations.announced(device_id), 30, f"the server to announce {device_id}'s rotation")
        self.kill_broker(ChaosEvent(time.monotonic() - self.t0, "broker_kill", "broker"), rewind_to=saved)

    def run(self) -> None:
        events = self.plan.events()
        self.t0 = time.monotonic()
        # Rotations go with the device events: a kill's thread is busy for the whole outage.
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
            "broker_sync_interval_s = 1.0\nack_interval_s = 0.5\n"
            f"broker_restart_backoff_s = {BROKER_RESTART_BACKOFF_S}\n")


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
    http_port, broker_port = free_port(), free_port()
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
        wait_for(lambda: all((svc.storage.get_device(d) or {}).get("active_version") == CURRENT for d in fleet.ids),
                  60, f"the server to see every device on {CURRENT}")
        # What the broker holds before the rollout: the state a last broker kill rewinds it to.
        before_rollout = workdir / "broker-before-rollout.db"
        server.save_broker_state(before_rollout)
        rid = rollouts.create_rollout(svc, plan.rollout(), actor="chaos")["id"]
        say(f"rollout {rid} of {MODEL} {TARGET} created; {plan.duration:.0f} s of chaos")
        rotations = Rotations(svc, fleet)
        driver = _Driver(plan, server, fleet, rotations, say)
        phases = {"setup": time.monotonic() - real_start}
        driver.run()
        phases["chaos"] = time.monotonic() - real_start - sum(phases.values())
        say("chaos over: waiting for the rollout to finish and the fleet to settle")
        wait_for(lambda: svc.storage.get_rollout(rid)["state"] in FINAL, settle_timeout_s,
                  "the rollout to finish", 0.5)
        _settle(svc, fleet, settle_timeout_s)
        phases["settle"] = time.monotonic() - real_start - sum(phases.values())
        driver.rewound_broker_kill(plan.final_rotation_device(), before_rollout)
        _settle(svc, fleet, settle_timeout_s)
        with contextlib.suppress(ChaosError):  # what did not happen, the invariants show
            wait_for(rotations.settled, ROTATION_TIMEOUT_S, "every rotation confirmed and in force", 0.5)
        states = fleet.states()
        credentials = rotations.observe()
        fleet.stop()
        _wait_quiet(data_dir)
        phases["last broker kill"] = time.monotonic() - real_start - sum(phases.values())
        invariants = [*check_invariants(svc, plan, fleet, states, recorder, rid, [pem]),
                      retained_desired_invariant(svc, fleet),
                      *rotations.invariants(credentials, broker_port)]
        status = rollouts.rollout_status(svc, rid)
        facts = {
            "rollout": f"{status['state']}",
            "server_starts": server.starts,
            "broker_restarts": f"{driver.broker_restarts} (by the server's supervisor)",
            "rotations": len(rotations.requested),
            "crashes": sum(s.crashes for s in states.values()),
            "windows_sent": len(recorder.windows),
            "phases_s": "/".join(f"{k} {v:.0f}" for k, v in phases.items()),
        }
        return ChaosReport(plan, invariants, driver.executed, facts, time.monotonic() - real_start)
    finally:
        if fleet is not None:
            fleet.stop()
        server.stop()
        svc.storage.close()


def _settle(svc: Any, fleet: SimFleet, timeout: float) -> None:
    fleet.wait(lambda: _settled_fleet(fleet), timeout, "every device up, online and idle")
    fleet.wait(fleet.delivered, timeout, "every outbox acknowledged by the server")
    fleet.wait(lambda: fleet.ingested(svc.storage.seq_stats()), timeout, "the server to store every message")


def _wait_quiet(data_dir: Path, quiet_s: float = 2.0, timeout: float = 60.0) -> None:
    """Wait until the server has stored nothing new for `quiet_s` (the last messages of the
    fleet's clean shutdown are in)."""
    db = read_server_db(data_dir)
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
