"""What a rehearsal reports: per stage the simulated time taken, each gate's reading, the outcome."""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


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
            f"simulated {duration_text(self.sim_s)} in {self.real_s:.1f} s real; {self.passes} controller passes, "
            f"{self.controller_cpu_s:.2f} s CPU; sent {self.desired_bytes / max(self.devices, 1):.0f} B desired + "
            f"{self.download_bytes / max(self.devices, 1) / 1024:.1f} KiB bundle per device",
        ]
        if self.reason:
            lines.append(f"reason: {self.reason}")
        lines.append("")
        lines.append(f"{'stage':<14}{'devices':>8}{'soak':>9}{'took':>9}  {'verdict':<8}"
                     f"{'updated':>8}{'failed':>7}{'timeout':>8}  ended by")
        for s in self.stages:
            took = duration_text(s.duration_s) if s.duration_s is not None else ("-" if s.started_at is None else "...")
            lines.append(f"{s.index + 1} {s.mode:<12}{s.devices if s.devices is not None else '-':>8}"
                         f"{duration_text(s.min_soak_s):>9}{took:>9}  {s.verdict or '-':<8}{s.updated:>8}{s.failed:>7}"
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


def duration_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


class StageTracker:
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
