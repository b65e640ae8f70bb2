"""Realized model performance from ground-truth feedback counts: sums, metrics, alert policy. Pure.

Devices join truth with their predictions and send mergeable counts (`protocol.Feedback`); the
server adds them per (model version, device, time bucket) like drift counts, and everything here
is computed from such sums: accuracy, per-class precision / recall / F1, calibration (reliability
per decile, expected calibration error), MAE / RMSE, and the drop against the bundle's own
validation score that performance alerts judge. See docs/performance.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from edge_agent.protocol import CALIBRATION_EDGES, Feedback, feedback_error_edges
from fleet_server.alerts import BucketDrift, DriftPolicy, PolicyError

__all__ = [
    "FeedbackMismatch",
    "FeedbackSums",
    "PerformancePolicy",
    "baseline",
    "bucket_point",
    "metrics",
    "realized",
    "sum_feedback_rows",
]

CALIBRATION_BINS = len(CALIBRATION_EDGES) + 1
ERROR_BINS = 9  # len(feedback_error_edges(...)) + 1
NOISE_Z = 2.576  # a drop must exceed this many standard errors of the baseline accuracy
# Deciles of a normal distribution: the 10th-90th percentile span is 2 x 1.2816 sigma.
_DECILE_SPAN_SIGMAS = 2.0 * 1.2815515655446004


class FeedbackMismatch(ValueError):
    """Feedback counts whose shape does not line up (another class count, bad list lengths)."""


def _add_list(total: list[Any] | None, more: Sequence[Any] | None, what: str) -> list[Any] | None:
    if more is None:
        return total
    if total is None:
        return list(more)
    if len(total) != len(more):
        raise FeedbackMismatch(f"{what}: {len(more)} values do not line up with {len(total)}")
    for i, v in enumerate(more):
        total[i] += v
    return total


@dataclass
class FeedbackSums:
    """Summed feedback counts of one model version over any devices and buckets.

    The fields are those of `protocol.Feedback` (without the version): every one adds up.
    """

    joined: int = 0
    unknown_label: int = 0
    late: int = 0
    unknown: int = 0
    duplicate: int = 0
    rejected: int = 0
    confusion: list[list[int]] | None = None  # [true][predicted]
    abs_error_sum: float = 0.0
    sq_error_sum: float = 0.0
    error_bins: list[int] | None = None
    calibration_counts: list[int] | None = None
    calibration_hits: list[int] | None = None
    calibration_prob_sum: list[float] | None = None

    def add_block(self, fb: Feedback) -> FeedbackSums:
        """Add one window's block; a malformed one raises FeedbackMismatch and changes nothing."""
        self.add(FeedbackSums(
            joined=fb.joined, unknown_label=fb.unknown_label, late=fb.late, unknown=fb.unknown,
            duplicate=fb.duplicate, rejected=fb.rejected, confusion=fb.confusion,
            abs_error_sum=fb.abs_error_sum, sq_error_sum=fb.sq_error_sum, error_bins=fb.error_bins,
            calibration_counts=fb.calibration_counts, calibration_hits=fb.calibration_hits,
            calibration_prob_sum=fb.calibration_prob_sum,
        ))
        return self

    def check(self) -> None:
        """Raise FeedbackMismatch unless the lists have the protocol's shapes."""
        if self.confusion is not None:
            k = len(self.confusion)
            if k == 0 or any(len(row) != k for row in self.confusion):
                raise FeedbackMismatch("confusion must be a square [true][predicted] matrix")
        for name, n in (("calibration_counts", CALIBRATION_BINS), ("calibration_hits", CALIBRATION_BINS),
                        ("calibration_prob_sum", CALIBRATION_BINS), ("error_bins", ERROR_BINS)):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise FeedbackMismatch(f"{name} must have {n} bins, got {len(value)}")

    def add(self, other: FeedbackSums) -> FeedbackSums:
        """Add another sum (checked first, so a mismatch leaves this one intact)."""
        other.check()
        if self.confusion is not None and other.confusion is not None and len(self.confusion) != len(other.confusion):
            raise FeedbackMismatch(
                f"confusion of {len(other.confusion)} classes does not line up with {len(self.confusion)}"
            )
        for name in ("error_bins", "calibration_counts", "calibration_hits", "calibration_prob_sum"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine is not None and theirs is not None and len(mine) != len(theirs):
                raise FeedbackMismatch(f"{name} does not line up")
        for name in ("joined", "unknown_label", "late", "unknown", "duplicate", "rejected",
                     "abs_error_sum", "sq_error_sum"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if other.confusion is not None:
            if self.confusion is None:
                self.confusion = [list(row) for row in other.confusion]
            else:
                for total, more in zip(self.confusion, other.confusion, strict=True):
                    _add_list(total, more, "confusion")
        for name in ("error_bins", "calibration_counts", "calibration_hits", "calibration_prob_sum"):
            setattr(self, name, _add_list(getattr(self, name), getattr(other, name), name))
        return self

    @property
    def counters(self) -> dict[str, int]:
        """Feedback that joined nothing (or no class), next to what joined."""
        return {"joined": self.joined, "unknown_label": self.unknown_label, "late": self.late,
                "unknown": self.unknown, "duplicate": self.duplicate, "rejected": self.rejected}

    @property
    def correct(self) -> int:
        """Joined predictions equal to the truth (classification)."""
        return sum(row[i] for i, row in enumerate(self.confusion)) if self.confusion else 0

    @property
    def classified(self) -> int:
        """Joined predictions behind the confusion matrix (0 for regression)."""
        return sum(map(sum, self.confusion)) if self.confusion else 0

    def to_row(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> FeedbackSums:
        return cls(**{f.name: row.get(f.name, f.default) for f in fields(cls)})


def sum_feedback_rows(rows: Iterable[Mapping[str, Any]]) -> FeedbackSums:
    """Roll stored feedback rows up (a device, a tag, the fleet, several buckets) by summing."""
    total = FeedbackSums()
    for r in rows:
        total.add(FeedbackSums.from_row(r))
    return total


# ---------------------------------------------------------------- metrics


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _classification(sums: FeedbackSums, classes: Sequence[Any] | None) -> dict[str, Any]:
    cm = sums.confusion or []
    k = len(cm)
    names = list(classes) if classes is not None and len(classes) == k else list(range(k))
    n = sums.classified
    per_class = []
    f1s = []
    for i in range(k):
        tp = cm[i][i]
        support = sum(cm[i])
        predicted = sum(row[i] for row in cm)
        precision = _ratio(tp, predicted)
        recall = _ratio(tp, support)
        f1 = (2 * precision * recall / (precision + recall)
              if precision is not None and recall is not None and precision + recall > 0
              else (0.0 if support or predicted else None))
        if support:
            f1s.append(f1 or 0.0)
        per_class.append({"class": names[i], "support": support, "predicted": predicted,
                          "precision": precision, "recall": recall, "f1": f1})
    return {
        "accuracy": _ratio(sums.correct, n),
        "macro_f1": sum(f1s) / len(f1s) if f1s else None,
        "classes": per_class,
        "confusion": cm,
    }


def _calibration(sums: FeedbackSums) -> dict[str, Any] | None:
    counts, hits, probs = sums.calibration_counts, sums.calibration_hits, sums.calibration_prob_sum
    if counts is None or hits is None or probs is None:
        return None
    lowers = (0.0, *CALIBRATION_EDGES)
    uppers = (*CALIBRATION_EDGES, 1.0)
    bins = [
        {"lower": lo, "upper": up, "count": c, "confidence": _ratio(p, c), "observed": _ratio(h, c)}
        for lo, up, c, h, p in zip(lowers, uppers, counts, hits, probs, strict=True)
    ]
    total = sum(counts)
    ece = sum(abs(p - h) for p, h in zip(probs, hits, strict=True)) / total if total else None
    return {"bins": bins, "ece": ece, "labels": total}


def _regression(sums: FeedbackSums, prediction_edges: Sequence[float] | None) -> dict[str, Any]:
    n = sums.joined
    edges = feedback_error_edges(prediction_edges)
    return {
        "mae": _ratio(sums.abs_error_sum, n),
        "rmse": math.sqrt(sums.sq_error_sum / n) if n else None,
        "error_bins": {"edges": edges, "counts": sums.error_bins or [0] * (len(edges) + 1)},
    }


def metrics(
    sums: FeedbackSums, task: str, classes: Sequence[Any] | None = None,
    prediction_edges: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Every figure of summed feedback, with `labels` (the joined truths behind them)."""
    out: dict[str, Any] = {"labels": sums.joined, "counters": sums.counters}
    if task == "regression":
        out |= _regression(sums, prediction_edges)
    else:
        out |= _classification(sums, classes)
        out["calibration"] = _calibration(sums)
    return out


# ---------------------------------------------------------------- baseline and alerts


@dataclass(frozen=True, slots=True)
class Baseline:
    """The bundle's own validation score (parity report, chosen variant)."""

    metric: str  # "accuracy" or "r2"
    value: float
    rows: int  # validation rows behind it
    target_var: float | None = None  # r2: the estimated variance of the target (see docs)


def baseline(manifest: Mapping[str, Any]) -> Baseline | None:
    """The chosen variant's validation accuracy (classification, anomaly) or R² (regression)
    from the manifest's parity report; None when the bundle was built without labels.

    R² needs the target's variance to be compared with realized squared errors: it is estimated
    from the reference prediction deciles (spread / 2.563 is a normal distribution's sigma) and
    the validation R² itself (least-squares predictions have Var(pred) = R² · Var(y)).
    """
    parity = manifest.get("parity") or {}
    chosen = parity.get("chosen")
    for v in parity.get("variants") or []:
        if v.get("variant") != chosen or v.get("metric") is None or v.get("onnx_metric") is None:
            continue
        value = float(v["onnx_metric"])
        if not math.isfinite(value):
            return None
        target_var = None
        if v["metric"] == "r2":
            edges = ((manifest.get("profile") or {}).get("prediction") or {}).get("edges") or []
            spread = (edges[-1] - edges[0]) if len(edges) >= 2 else 0.0
            if spread > 0 and value > 0:
                target_var = (spread / _DECILE_SPAN_SIGMAS) ** 2 / value
        return Baseline(str(v["metric"]), value, int(v.get("rows") or parity.get("rows") or 0), target_var)
    return None


def realized(sums: FeedbackSums, base: Baseline) -> tuple[float | None, int]:
    """(the realized value of the baseline's metric, labels behind it)."""
    if base.metric == "r2":
        n = sums.joined
        if not n or not base.target_var:
            return None, n
        return 1.0 - (sums.sq_error_sum / n) / base.target_var, n
    n = sums.classified
    return _ratio(sums.correct, n), n


@dataclass(frozen=True, slots=True)
class PerformancePolicy:
    """When a drop below the validation score becomes a warning or an alert."""

    warn_drop: float = 0.02
    alert_drop: float = 0.05
    min_labels: int = 200  # joined labels a bucket needs before it counts at all
    consecutive: int = 3

    def __post_init__(self) -> None:
        try:
            self.as_drift_policy()
        except PolicyError as exc:
            message = str(exc).replace("warn_psi", "warn_drop").replace("alert_psi", "alert_drop")
            raise PolicyError(message.replace("min_predictions", "min_labels")) from None

    def as_drift_policy(self) -> DriftPolicy:
        """The same thresholds for the shared alert state machine (`alerts.evaluate`)."""
        return DriftPolicy(warn_psi=self.warn_drop, alert_psi=self.alert_drop,
                           min_predictions=self.min_labels, consecutive=self.consecutive)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None, base: PerformancePolicy | None = None) -> PerformancePolicy:
        base = base or cls()
        if not values:
            return base
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise PolicyError(f"unknown performance policy key(s) {unknown}; known keys: {sorted(known)}")
        return replace(base, **dict(values))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def noise_drop(base: Baseline, labels: int) -> float:
    """The drop that sampling noise alone reaches about once in 200 buckets (accuracy: a normal
    approximation of the binomial around the validation accuracy; R²: none is modelled)."""
    if labels <= 0:
        return math.inf
    if base.metric != "accuracy":
        return 0.0
    p = min(max(base.value, 0.0), 1.0)
    return NOISE_Z * math.sqrt(p * (1.0 - p) / labels)


def bucket_point(bucket: float, sums: FeedbackSums, base: Baseline) -> BucketDrift:
    """One bucket for the alert state machine: the drop as the statistic, its noise level, labels."""
    value, labels = realized(sums, base)
    drop = base.value - value if value is not None else math.nan
    return BucketDrift(bucket=bucket, rows=labels, psi=drop, noise_psi=noise_drop(base, labels))
