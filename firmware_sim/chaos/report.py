"""A chaos run's report: the invariants as rows (expected, observed, pass), what the driver did."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from firmware_sim.chaos.plan import ChaosPlan


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
