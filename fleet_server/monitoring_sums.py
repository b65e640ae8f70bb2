"""Summed monitoring blocks of telemetry windows: the label-free performance estimate, the
multivariate reconstruction errors and the refused rows' data-quality counts. Pure.

Ingest sums a batch's windows per (model version, device, time bucket) into one row like the
feedback counts; readers add rows up per device, tag, fleet or period. Every field adds, so
the figures of any group are exact sums, never averages of averages.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from edge_agent.protocol import TelemetryWindow

__all__ = ["MonitoringMismatch", "MonitoringSums", "merge_monitoring_rows", "sum_monitoring_rows"]


class MonitoringMismatch(ValueError):
    """Blocks whose lists do not line up (another class count, other bins)."""


def _add(total: list[Any] | None, more: Sequence[Any] | None, what: str) -> list[Any] | None:
    if more is None:
        return total
    if total is None:
        return [list(v) if isinstance(v, list) else v for v in more]
    if len(total) != len(more):
        raise MonitoringMismatch(f"{what}: {len(more)} values do not line up with {len(total)}")
    for i, v in enumerate(more):
        if isinstance(v, (list, tuple)):
            _add(total[i], v, what)
        else:
            total[i] += v
    return total


def _shape(value: Any) -> Any:
    return [len(r) if isinstance(r, (list, tuple)) else None for r in value] if value is not None else None


@dataclass
class MonitoringSums:
    """Summed `estimate`, `multivariate` and `refused` blocks of one model version's windows."""

    # label-free performance estimate (protocol.PerformanceEstimate)
    est_rows: int = 0
    est_predicted: list[int] | None = None
    est_confusion: list[list[float]] | None = None  # [true][predicted], expected
    est_sq_sum: float = 0.0
    est_score_counts: list[int] | None = None
    est_score_positive: list[float] | None = None
    # reconstruction errors (protocol.ReconstructionSums)
    mv_rows: int = 0
    mv_sum: float = 0.0
    mv_sum_sq: float = 0.0
    mv_bins: list[int] | None = None
    mv_filled: int = 0
    # refused rows (protocol.RefusedRows): per feature [nan, below_min, above_max, wrong_type, unseen]
    refused_rows: int = 0
    refused_malformed: int = 0
    refused_features: list[list[int]] | None = None

    @property
    def empty(self) -> bool:
        return not (self.est_rows or self.mv_rows or self.refused_rows)

    @classmethod
    def of_window(cls, w: TelemetryWindow) -> MonitoringSums | None:
        """The window's blocks as a sum, or None when it carries none (older agents, no rows)."""
        if w.estimate is None and w.multivariate is None and w.refused is None:
            return None
        s = cls()
        if (e := w.estimate) is not None:
            s.est_rows, s.est_predicted, s.est_confusion = e.rows, list(e.predicted), [list(r) for r in e.confusion]
            s.est_sq_sum = e.confidence_sq_sum
            s.est_score_counts = list(e.score_counts) if e.score_counts is not None else None
            s.est_score_positive = list(e.score_positive) if e.score_positive is not None else None
        if (m := w.multivariate) is not None:
            s.mv_rows, s.mv_sum, s.mv_sum_sq, s.mv_bins, s.mv_filled = m.rows, m.sum, m.sum_sq, list(m.bins), m.filled
        if (r := w.refused) is not None:
            s.refused_rows, s.refused_malformed = r.rows, r.malformed
            s.refused_features = [[f.nan, f.below_min, f.above_max, f.wrong_type, f.unseen] for f in r.features]
        s.check()
        return s

    def check(self) -> None:
        """Raise MonitoringMismatch unless the lists are consistent with each other."""
        if self.est_confusion is not None:
            k = len(self.est_confusion)
            if k < 2 or any(len(r) != k for r in self.est_confusion):
                raise MonitoringMismatch("estimate confusion must be a square [true][predicted] matrix")
            if self.est_predicted is None or len(self.est_predicted) != k:
                raise MonitoringMismatch("estimate predicted counts must have one entry per class")
        if (self.est_score_counts is None) != (self.est_score_positive is None) or (
            self.est_score_counts is not None and len(self.est_score_counts) != len(self.est_score_positive or [])
        ):
            raise MonitoringMismatch("estimate score_counts and score_positive must line up")
        if self.refused_features is not None and any(len(f) != 5 for f in self.refused_features):
            raise MonitoringMismatch("refused features must have five counters each")

    def add(self, other: MonitoringSums) -> MonitoringSums:
        """Add another sum; a mismatch raises before anything changes."""
        other.check()
        for name in ("est_predicted", "est_confusion", "est_score_counts", "est_score_positive", "mv_bins",
                     "refused_features"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine is not None and theirs is not None and (len(mine) != len(theirs) or _shape(mine) != _shape(theirs)):
                raise MonitoringMismatch(f"{name} does not line up")
        for name in ("est_rows", "est_sq_sum", "mv_rows", "mv_sum", "mv_sum_sq", "mv_filled", "refused_rows",
                     "refused_malformed"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("est_predicted", "est_confusion", "est_score_counts", "est_score_positive", "mv_bins",
                     "refused_features"):
            setattr(self, name, _add(getattr(self, name), getattr(other, name), name))
        return self

    def to_row(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> MonitoringSums:
        return cls(**{f.name: row.get(f.name, f.default) for f in fields(cls)})


def sum_monitoring_rows(rows: Iterable[Mapping[str, Any] | MonitoringSums]) -> MonitoringSums:
    """Roll stored rows up (a device, a tag, the fleet, several buckets) by summing; rows that do
    not line up with the first (a bundle re-registered with other bins) are skipped."""
    total = MonitoringSums()
    for r in rows:
        try:
            total.add(r if isinstance(r, MonitoringSums) else MonitoringSums.from_row(r))
        except MonitoringMismatch:
            continue
    return total


def merge_monitoring_rows(rows: Iterable[Mapping[str, Any]]) -> MonitoringSums | None:
    """The exact sum of stored rows for a roll-up, or None when any row does not line up with the
    others (those rows are kept as they are rather than losing one)."""
    total = MonitoringSums()
    try:
        for r in rows:
            total.add(MonitoringSums.from_row(r))
    except MonitoringMismatch:
        return None
    return total
