"""A simulated fleet: N real agents in this process, one driver thread, one simulated clock.

The driver thread owns every agent's periodic work and network I/O: each step it serves the
rows due on every device (drawn in one vectorised call, sent in requests of the scenario's
`batch` rows), ticks the agents (windows, outbox,
probation, `reported`), applies faults, then polls all MQTT sockets through one selector.
Update work (download, verify, self-test) runs on a small shared thread pool, as it would on a
device. Nothing here re-implements the agent.

    fleet = SimFleet(scenario, devices=50, provisioner=ServicesProvisioner(svc), workdir=tmp,
                     clock=SimClock(speed=0)).provision().start()
    fleet.advance(600)                 # ten simulated minutes, stepped and delivered
    fleet.states()["sim-0001"]         # DeviceState: versions, update state, counters
    fleet.stop()
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.config import AgentConfig, config_from_dict
from edge_agent.store import DataDir
from firmware_sim.clock import SimClock
from firmware_sim.datagen import Dataset, DeviceStream, load_dataset
from firmware_sim.device import DeviceState, SimDevice, profile_for
from firmware_sim.faults import FaultPlan, Outage
from firmware_sim.network import FaultyDownloads, LinkPoller, cut_connection
from firmware_sim.provision import Provisioner
from firmware_sim.runtimes import RuntimeCache
from firmware_sim.scenario import Scenario, assign
from model_tools.bundle import extract_bundle, read_bundle

log = logging.getLogger("firmware_sim.fleet")


def device_ids(n: int, prefix: str = "sim-") -> list[str]:
    """`sim-0001` ... : the ids scenarios name in their `devices` lists."""
    return [f"{prefix}{i:04d}" for i in range(1, n + 1)]


@dataclass(frozen=True)
class FleetStats:
    """Counts over the whole fleet at one instant (what the progress line shows)."""

    sim_time: float
    elapsed_s: float  # simulated seconds since the fleet started
    devices: int
    running: int
    online: int
    predictions: int
    windows: int
    outbox: int
    crashes: int
    states: dict[str, int]  # update state -> devices
    versions: dict[str, int]  # active version -> devices


class SimFleet:
    """Simulated devices running real agents against a real broker and fleet server."""

    def __init__(
        self,
        scenario: Scenario,
        *,
        devices: int | list[str],
        provisioner: Provisioner | None,
        workdir: str | Path,
        clock: SimClock | None = None,
        step_s: float | None = None,
        mqtt_url: str | None = None,
        all_device_ids: list[str] | None = None,
        dataset: Dataset | None = None,
        update_workers: int = 4,
        tags: Callable[[str], dict[str, str]] | None = None,
        agent_overrides: Callable[[AgentConfig], None] | None = None,
        window_tap: Callable[[str, int, bytes], None] | None = None,
    ) -> None:
        self.scenario = scenario
        self.ids = device_ids(devices) if isinstance(devices, int) else list(devices)
        # Shares of drifts and faults are taken over the whole fleet, even when this process
        # drives only a slice of it.
        self.all_ids = list(all_device_ids or self.ids)
        self.provisioner = provisioner
        self.workdir = Path(workdir)
        self.clock = clock or SimClock(scenario.speed)
        self.step_s = step_s or min(5.0, scenario.window_s / 6)
        self.mqtt_url = mqtt_url
        self.dataset = dataset or load_dataset(scenario.dataset)
        self.tags = tags or (lambda device_id: {"hw": profile_for(device_id, scenario.seed).name})
        self.agent_overrides = agent_overrides
        self.window_tap = window_tap
        self.runtimes = RuntimeCache()
        self.executor = ThreadPoolExecutor(max_workers=update_workers, thread_name_prefix="sim-update")
        self.poller = LinkPoller()
        self.downloads: FaultyDownloads | None = None
        self.devices: dict[str, SimDevice] = {}
        self.started_at: float | None = None
        self.stepped_to = 0.0  # simulated time of the last completed step
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # ------------------------------------------------------------------ setup

    def device_dir(self, device_id: str) -> Path:
        return self.workdir / "devices" / device_id

    def provision(self) -> SimFleet:
        """Register every device not registered before (its agent config is kept in the work dir)."""
        for device_id in self.ids:
            path = self.device_dir(device_id) / "agent.toml"
            if path.exists():
                continue
            if self.provisioner is None:
                raise RuntimeError(f"{device_id} has no agent config in {path.parent} and no provisioner was given")
            text = self.provisioner.provision(device_id, self.tags(device_id), self.scenario.window_s)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            path.chmod(0o600)
        return self

    def _config(self, device_id: str) -> AgentConfig:
        data = tomllib.loads((self.device_dir(device_id) / "agent.toml").read_text())
        data["data_dir"] = str(self.device_dir(device_id) / "data")
        data.pop("http", None)  # simulated devices serve in-process, not on a port
        data.setdefault("telemetry", {})["window_s"] = float(self.scenario.window_s)
        if self.mqtt_url:
            data.setdefault("mqtt", {})["url"] = self.mqtt_url
        config = config_from_dict(data)
        # Probation judged in simulated time; a few hundred rows is minutes of device traffic.
        config.update.probation_predictions = max(50, int(self.scenario.rate_per_s * 120))
        if self.agent_overrides is not None:
            self.agent_overrides(config)
        return config

    def preinstall(self, bundle: bytes) -> SimFleet:
        """Put a model on every device before it boots, as a factory image would (no download)."""
        trusted = None
        for device_id in self.ids:
            config = self._config(device_id)
            data = DataDir(config.data_dir).create()
            if data.committed()[0]:
                continue
            if trusted is None:
                from edge_agent.agent import trusted_keys_from_config

                trusted = trusted_keys_from_config(config)
                version = read_bundle(bundle, trusted).manifest.version
            extract_bundle(bundle, data.version_dir(version), trusted)
            data.commit(version, None)
        return self

    def start(self, *, wait_online: float | None = None) -> SimFleet:
        """Boot every device and start the driver thread (optionally wait until all are online)."""
        plans = assign(self.scenario, self.all_ids)
        now = self.clock()
        self.started_at = now
        self.stepped_to = now
        wants_relay = any(f.kind in ("corrupt_download", "truncated_download") for f in self.scenario.faults)
        if wants_relay:
            self.downloads = FaultyDownloads()
        for device_id in self.ids:
            drifts, faults = plans[device_id]
            plan = FaultPlan.from_faults(faults)
            self.devices[device_id] = SimDevice(
                self._config(device_id),
                clock=self.clock,
                started_at=now,
                stream=DeviceStream(self.dataset, self.scenario.seed, device_id, drifts),
                plan=plan,
                profile=profile_for(device_id, self.scenario.seed),
                runtimes=self.runtimes,
                executor=self.executor,
                rate_per_s=self.scenario.rate_per_s,
                batch=self.scenario.batch,
                downloads=self.downloads if plan.download_fault_at(float("inf")) else None,
                seed=self.scenario.seed,
                window_tap=self.window_tap,
                label_share=self.scenario.label_share,
                label_delay_s=self.scenario.label_delay_s,
            )
        for device in self.devices.values():
            device.boot()
        self._thread = threading.Thread(target=self._drive, name="sim-driver", daemon=True)
        self._thread.start()
        if wait_online is not None:
            self.wait(lambda: self.stats().online == len(self.devices), wait_online, "every device online")
        return self

    # ------------------------------------------------------------------ driving

    def _drive(self) -> None:
        try:
            while not self._stop.is_set():
                now = self.clock()
                if now - self.stepped_to >= self.step_s or (self.clock.speed == 0 and now > self.stepped_to):
                    self._step(now)
                links = [
                    d.agent.link for d in self.devices.values()
                    if d.agent is not None and d.agent.link is not None and not d.network_down
                ]
                self.poller.poll(links, 0.005 if self.clock.speed == 0 else 0.02)
                # Acks, connects and update events wake an agent between steps, as on a device.
                now = self.clock()
                for d in self.devices.values():
                    if d.agent is None:
                        continue
                    if d.crash_pending:
                        with self._cond:
                            self._kill(d, now)
                    elif d.agent.wakeup_event.is_set():
                        d.agent.wakeup_event.clear()
                        d.agent.tick(now)
        except BaseException as exc:  # surface driver bugs to the caller instead of hanging
            log.exception("the simulation driver stopped")
            self._error = exc
            with self._cond:
                self._cond.notify_all()

    def _step(self, now: float) -> None:
        # Under the lock: observers (states, stats, delivered) never see an agent half killed
        # or half booted.
        with self._cond:
            self._step_locked(now)

    def _step_locked(self, now: float) -> None:
        for device in self.devices.values():
            if device.agent is not None and device.crash_pending:
                self._kill(device, now)
                continue
            self._apply_network(device, now)
            device.step(now)
        self.stepped_to = now
        self._cond.notify_all()

    def _kill(self, device: SimDevice, now: float) -> None:
        assert device.agent is not None
        if device.agent.link is not None:
            self.poller.forget(device.agent.link)
        device.kill(now)

    def _apply_network(self, device: SimDevice, now: float) -> None:
        down = device.plan.outage_at(device.elapsed(now)) is not None
        if down == device.network_down:
            return
        device.network_down = down
        link = device.agent.link if device.agent is not None else None
        if down and link is not None:
            self.poller.forget(link)
            cut_connection(link)
            link.client.loop_read()  # paho sees the reset now and marks the link disconnected

    def power_cut(self, device_id: str) -> bool:
        """Kill one running device as a power cut would (no flush, no `offline`); it boots again
        on its data dir after the usual restart delay. False when it is down already."""
        with self._cond:
            device = self.devices[device_id]
            if device.agent is None:
                return False
            device.crash_pending = True  # the driver pulls the plug at its next pass
            return True

    def cut_off(self, device_id: str, seconds: float) -> None:
        """Take one device's network away for `seconds` of simulated time from now."""
        device = self.devices[device_id]
        start = device.elapsed(self.clock())
        with self._cond:
            device.plan.outages.append(Outage(start, start + seconds, "cut_off"))
            device.plan.outages.sort(key=lambda o: o.start)

    def advance(self, seconds: float, *, timeout: float = 120.0) -> float:
        """Move a hand-driven clock (speed 0) forward step by step, each step served by every
        device before the next; returns the new simulated time."""
        if self.clock.speed != 0:
            raise RuntimeError("advance() drives a clock with speed 0; this one runs by itself")
        end = self.clock() + seconds
        while self.clock() < end - 1e-9:
            target = self.clock.advance(min(self.step_s, end - self.clock()))
            self.wait(lambda t=target: self.stepped_to >= t, timeout, f"the driver to reach t={target:.0f}")
        return self.clock()

    def wait(self, predicate: Callable[[], object], timeout: float, what: str = "") -> object:
        """Wait (real time) until `predicate()` is true; raise TimeoutError saying what for."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self._error is not None:
                    raise RuntimeError("the simulation driver failed") from self._error
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}")
                self._cond.wait(min(left, 0.05))

    def delivered(self) -> bool:
        """Every running device that has a network is online with an empty outbox (the server
        acknowledged everything it queued, on `ack`)."""
        with self._cond:
            return self._delivered()

    def _delivered(self) -> bool:
        for d in self.devices.values():
            if d.agent is None or d.network_down:
                continue
            if not d.online or (d.agent.outbox is not None and d.agent.outbox.count()):
                return False
        return True

    def ingested(self, seq_stats: list[dict[str, Any]]) -> bool:
        """The server stored every message of every running device that has a network: given the
        server's `seq_stats()`, each such device's newest seq is in and its outbox is empty."""
        stats = {s["device"]: s for s in seq_stats}
        with self._cond:
            for device_id, d in self.devices.items():
                outbox = d.agent.outbox if d.agent is not None else None
                if outbox is None or d.network_down or outbox.next_seq == outbox.first_seq:
                    continue  # no network: it keeps its outbox until it is back; or nothing made yet
                s = stats.get(device_id)
                if s is None or s["max_seq"] < outbox.next_seq - 1 or outbox.count():
                    return False
        return True

    # ------------------------------------------------------------------ looking at it

    def states(self) -> dict[str, DeviceState]:
        with self._cond:
            return {device_id: d.state() for device_id, d in self.devices.items()}

    def stats(self) -> FleetStats:
        with self._cond:
            return self._stats()

    def _stats(self) -> FleetStats:
        now = self.clock()
        states = Counter()
        versions = Counter()
        running = online = predictions = windows = outbox = crashes = 0
        for d in self.devices.values():
            a = d.agent
            predictions += d.counters.predictions
            windows += d.windows
            crashes += d.counters.crashes
            if a is None:
                states["down"] += 1
                continue
            running += 1
            online += d.online
            states[a.machine.ctx.state.value] += 1
            versions[a.active_version() or "none"] += 1
        return FleetStats(
            sim_time=now,
            elapsed_s=now - (self.started_at or now),
            devices=len(self.devices),
            running=running,
            online=online,
            predictions=predictions,
            windows=windows,
            outbox=outbox,
            crashes=crashes,
            states=dict(states),
            versions=dict(versions),
        )

    # ------------------------------------------------------------------ teardown

    def stop(self) -> None:
        """Stop the driver, shut every agent down cleanly (window flushed, `offline` sent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        for device in self.devices.values():
            try:
                device.stop()
            except Exception:
                log.exception("stopping %s failed", device.device_id)
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.poller.close()
        if self.downloads is not None:
            self.downloads.close()

    def remove(self) -> None:
        """Delete the work dir (device configs and data)."""
        shutil.rmtree(self.workdir, ignore_errors=True)
