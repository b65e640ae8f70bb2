"""The chaos plan: which devices get which standing fault, and the driver's timeline of kills and
cut-offs, all drawn from one seed so that a run can be replayed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from firmware_sim.scenario import Fault, Scenario

MODEL = "tumour"
CURRENT, TARGET = "1.0.0", "2.0.0"
BROKER_RESTART_BACKOFF_S = 2.0  # the server's broker_restart_backoff_s in a chaos run
# States a device may be killed in during its update (Idle is not an update).
UPDATE_STATES = ("Download", "Verify", "Install", "SelfTest", "Activate", "Probation")


class ChaosError(RuntimeError):
    """The chaos run could not be set up or did not settle; the message says what and where."""



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
    # Password rotations: one during every broker or server outage, the rest while the device
    # itself is failing (just before a power cut or a cut-off of that device).
    rotations_per_min: float = 4.0


@dataclass(frozen=True)
class ChaosEvent:
    """One thing the driver does, `at` seconds after the chaos starts."""

    at: float
    kind: str  # broker_kill | server_kill | power_cut | cut_off | rotate
    target: str  # a device id, or "broker" / "server"
    duration: float = 0.0  # a broker kill: the supervisor's backoff, the least it stays down


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
    stages: tuple[int, ...] = (10, 50, 100)  # the rollout's live stages, percent of the fleet

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
        apart), power cuts and cut-offs of random devices at random times, and password rotations
        during those faults (each device rotated once at most)."""
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
            # The server's supervisor restarts a killed broker after its backoff (or longer).
            down = rng.uniform(*r.process_down_s) if kind == "server_kill" else BROKER_RESTART_BACKOFF_S
            start = i * slot + rng.uniform(0.0, max(0.0, slot - down - 10.0))
            out.append(ChaosEvent(round(start, 2), kind, kind.split("_")[0], round(down, 2)))
        ids = self.device_ids
        for _ in range(round(r.power_cuts_per_min * minutes)):
            out.append(ChaosEvent(round(rng.uniform(0, self.duration), 2), "power_cut", rng.choice(ids)))
        for _ in range(round(r.cut_offs_per_min * minutes)):
            out.append(ChaosEvent(round(rng.uniform(0, self.duration), 2), "cut_off", rng.choice(ids),
                                  round(rng.uniform(*r.cut_off_s), 2)))
        out += self._rotations(out, rng)
        return sorted(out, key=lambda e: (e.at, e.kind, e.target))

    def _rotations(self, faults: list[ChaosEvent], rng: random.Random) -> list[ChaosEvent]:
        """Rotations that meet a fault: half a second into each process outage (a random device),
        then a second before a device's own power cut or cut-off, as many as the rate asks."""
        wanted = max(1, round(self.rates.rotations_per_min * self.duration / 60.0))
        ids = self.device_ids
        rotated: set[str] = set()
        out: list[ChaosEvent] = []
        for e in (e for e in sorted(faults, key=lambda e: e.at) if e.kind.endswith("_kill")):
            device = rng.choice(sorted(set(ids) - rotated))
            rotated.add(device)
            out.append(ChaosEvent(round(e.at + 0.5, 2), "rotate", device))
        device_faults = [e for e in faults if e.kind in ("power_cut", "cut_off")]
        rng.shuffle(device_faults)
        for e in device_faults:
            if len(out) >= wanted:
                break
            if e.target not in rotated:
                rotated.add(e.target)
                out.append(ChaosEvent(max(0.0, round(e.at - 1.0, 2)), "rotate", e.target))
        return out

    def final_rotation_device(self) -> str:
        """The device rotated after the chaos while it is cut off across a broker kill that rewinds
        the broker's state (a device no event of the timeline rotates)."""
        taken = {e.target for e in self.events() if e.kind == "rotate"}
        return self._rng("final-rotation").choice(sorted(set(self.device_ids) - taken))

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
        """Live stages with short soaks; gates wide enough for the planted faults."""
        return {
            "model": MODEL, "version": TARGET, "target": {"all": True}, "on_failure": "pause",
            "device_timeout_s": 45,
            "stages": [{"percent": p, "min_soak_s": 5} for p in self.stages],
            # Every planted fault fails or delays an update on purpose: the gates must not stop
            # the rollout for the faults the run plants itself.
            "gates": {"update_failure_rate": {"max": 0.5}, "timeout_share": {"max": 0.5},
                      # Latency of real runtimes on a machine busy with a whole fleet, a server and
                      # its kills measures the machine (a canary of a few devices paused the run at
                      # a p95 ratio of 3.2 on a loaded host), not the model: not what this suite checks.
                      "p95_latency_ratio": {"enabled": False}},
        }
