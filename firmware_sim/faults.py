"""What a scenario's faults mean for one device: a plan the device and the network follow.

Faults act on what surrounds the agent, never on its code: the network (connection cut, no
network), the download path (bytes corrupted or cut off in transit), the disk, the CPU, and
the process (killed in an update state through the agent's own `crash_in` hook).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_agent.update.events import State
from firmware_sim.scenario import Fault, ScenarioError

# The update states a device can be killed in (entering Idle is not an update).
CRASH_STATES = tuple(s.value for s in State if s is not State.IDLE)


@dataclass(frozen=True)
class Outage:
    """The device has no network from `start` to `end` (simulated seconds since the fleet
    started): its connection is reset at once (the broker publishes its last will) and it makes
    no reconnect attempt until the end. `kind` is the scenario's name for it."""

    start: float
    end: float
    kind: str


@dataclass
class FaultPlan:
    """Every fault that applies to one device, in simulated seconds since the fleet started."""

    outages: list[Outage] = field(default_factory=list)
    crash_in: str | None = None
    corrupt_download_from: float | None = None
    truncate_download_from: float | None = None
    full_disk_from: float | None = None
    cpu_factor: float = 1.0

    @classmethod
    def from_faults(cls, faults: list[Fault]) -> FaultPlan:
        plan = cls()
        for f in faults:
            start = f.start_min * 60.0
            if f.kind in ("disconnect", "offline"):
                plan.outages.append(Outage(start, start + f.duration_min * 60.0, f.kind))
            elif f.kind == "crash_in_state":
                if f.state not in CRASH_STATES:
                    raise ScenarioError(f"crash_in_state: state {f.state!r} is not one of {CRASH_STATES}")
                plan.crash_in = f.state
            elif f.kind == "corrupt_download":
                plan.corrupt_download_from = start
            elif f.kind == "truncated_download":
                plan.truncate_download_from = start
            elif f.kind == "full_disk":
                plan.full_disk_from = start
            elif f.kind == "slow_cpu":
                plan.cpu_factor = max(plan.cpu_factor, f.factor)
        plan.outages.sort(key=lambda o: o.start)
        return plan

    def outage_at(self, t: float) -> Outage | None:
        for o in self.outages:
            if o.start <= t < o.end:
                return o
        return None

    def download_fault_at(self, t: float) -> str | None:
        """`corrupt`, `truncate` or None: what the network does to a download started at `t`."""
        if self.corrupt_download_from is not None and t >= self.corrupt_download_from:
            return "corrupt"
        if self.truncate_download_from is not None and t >= self.truncate_download_from:
            return "truncate"
        return None

    def disk_full_at(self, t: float) -> bool:
        return self.full_disk_from is not None and t >= self.full_disk_from

    @property
    def kinds(self) -> list[str]:
        """Short names of the planned faults, for progress output and per-device state."""
        out = [o.kind for o in self.outages]
        if self.crash_in:
            out.append(f"crash_in={self.crash_in}")
        if self.corrupt_download_from is not None:
            out.append("corrupt_download")
        if self.truncate_download_from is not None:
            out.append("truncated_download")
        if self.full_disk_from is not None:
            out.append("full_disk")
        if self.cpu_factor > 1:
            out.append(f"slow_cpu x{self.cpu_factor:g}")
        return out
