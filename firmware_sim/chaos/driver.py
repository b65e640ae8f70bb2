"""Running a chaos plan: set up a server and a fleet, carry out the timeline, settle, check."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.update.events import State
from firmware_sim.chaos.invariants import check_invariants, read_server_db
from firmware_sim.chaos.plan import CURRENT, MODEL, TARGET, ChaosError, ChaosEvent, ChaosPlan
from firmware_sim.chaos.processes import ServerProcess, wait_for
from firmware_sim.chaos.recorder import WindowRecorder
from firmware_sim.chaos.report import ChaosReport
from firmware_sim.clock import SimClock
from firmware_sim.fleet import SimFleet
from firmware_sim.local import free_port
from firmware_sim.provision import ServicesProvisioner

log = logging.getLogger("firmware_sim.chaos")

FINAL = ("completed", "paused", "aborted")
RESEND_AFTER_S = 5.0  # the devices' outbox.resend_after_s (the server acknowledges every 0.5 s)


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
        rid = rollouts.create_rollout(svc, plan.rollout(), actor="chaos")["id"]
        say(f"rollout {rid} of {MODEL} {TARGET} created; {plan.duration:.0f} s of chaos")
        driver = _Driver(plan, server, fleet, say)
        driver.run()
        say("chaos over: waiting for the rollout to finish and the fleet to settle")
        wait_for(lambda: svc.storage.get_rollout(rid)["state"] in FINAL, settle_timeout_s,
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
