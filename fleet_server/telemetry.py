"""Telemetry arithmetic: pack window counts, sum them into buckets, summarise latency and errors.

Pure functions over lists of ints, so storage backends, drift and roll-ups share one definition.
Packing of one feature's counts: `[*bins, nan, below_min, above_max, unseen]`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_agent.protocol import LATENCY_EDGES_MS, FeatureCounts, TelemetryWindow
from fleet_server.drift import latency_percentile

EXTRA_SLOTS = 4  # nan, below_min, above_max, unseen after the bins


class ShapeMismatch(ValueError):
    """Counts whose bins do not line up with what is already summed (a different profile)."""


def pack(fc: FeatureCounts) -> list[int]:
    return [*fc.bins, fc.nan, fc.below_min, fc.above_max, fc.unseen]


def unpack(packed: Sequence[int]) -> FeatureCounts:
    bins = list(packed[:-EXTRA_SLOTS])
    nan, below, above, unseen = packed[-EXTRA_SLOTS:]
    return FeatureCounts(bins=bins, nan=nan, below_min=below, above_max=above, unseen=unseen)


def add_into(total: list[int], more: Sequence[int]) -> list[int]:
    if len(total) != len(more):
        raise ShapeMismatch(f"{len(more)} counts do not line up with {len(total)}")
    for i, v in enumerate(more):
        total[i] += v
    return total


def bucket_start(window: TelemetryWindow, bucket_s: float) -> float:
    """A window belongs to the bucket holding its midpoint (it may straddle a boundary)."""
    mid = (window.window_start + window.window_end) / 2.0
    return math.floor(mid / bucket_s) * bucket_s


@dataclass
class BucketSums:
    """Summed counts of one (model, version, device, bucket)."""

    windows: int = 0
    predictions: int = 0
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_EDGES_MS) + 1))
    latency_sum_ms: float = 0.0
    features: list[list[int]] | None = None
    prediction: list[int] | None = None

    def add_window(self, w: TelemetryWindow) -> None:
        self.add(
            windows=1,
            predictions=w.predictions,
            requests=w.requests,
            errors=w.errors,
            latency=w.latency.counts,
            latency_sum_ms=w.latency.sum_ms,
            features=[pack(f) for f in w.features],
            prediction=pack(w.prediction) if w.prediction is not None else None,
        )

    def add_sums(self, other: BucketSums) -> None:
        self.add(
            windows=other.windows,
            predictions=other.predictions,
            requests=other.requests,
            errors=other.errors,
            latency=other.latency,
            latency_sum_ms=other.latency_sum_ms,
            features=other.features,
            prediction=other.prediction,
        )

    def add(
        self,
        *,
        windows: int,
        predictions: int,
        requests: int,
        errors: dict[str, int],
        latency: Sequence[int],
        latency_sum_ms: float,
        features: list[list[int]] | None,
        prediction: list[int] | None,
    ) -> None:
        # Check shapes before changing anything, so a rejected window leaves the sums intact.
        if self.features is not None and features is not None and (
            len(self.features) != len(features)
            or any(len(a) != len(b) for a, b in zip(self.features, features, strict=True))
        ):
            raise ShapeMismatch("feature counts do not line up with the bucket's")
        if self.prediction is not None and prediction is not None and len(self.prediction) != len(prediction):
            raise ShapeMismatch("prediction counts do not line up with the bucket's")
        if len(latency) != len(self.latency):
            raise ShapeMismatch(f"latency histogram has {len(latency)} bins, expected {len(self.latency)}")
        self.windows += windows
        self.predictions += predictions
        self.requests += requests
        for kind, n in errors.items():
            self.errors[kind] = self.errors.get(kind, 0) + n
        add_into(self.latency, latency)
        self.latency_sum_ms += latency_sum_ms
        if features is not None and (features or self.features is None):
            if self.features is None or not self.features:
                self.features = [list(f) for f in features]
            else:
                for total, more in zip(self.features, features, strict=True):
                    add_into(total, more)
        if prediction is not None:
            if self.prediction is None:
                self.prediction = list(prediction)
            else:
                add_into(self.prediction, prediction)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_row(self) -> dict[str, Any]:
        return {
            "windows": self.windows,
            "predictions": self.predictions,
            "requests": self.requests,
            "errors": self.errors,
            "latency": self.latency,
            "latency_sum_ms": self.latency_sum_ms,
            "features": self.features or [],
            "prediction": self.prediction,
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> BucketSums:
        return cls(
            windows=row["windows"],
            predictions=row["predictions"],
            requests=row["requests"],
            errors=dict(row["errors"]),
            latency=list(row["latency"]),
            latency_sum_ms=row["latency_sum_ms"],
            features=[list(f) for f in row["features"]] or None,
            prediction=list(row["prediction"]) if row["prediction"] is not None else None,
        )


def _shape(w: TelemetryWindow) -> tuple:
    return (
        len(w.latency.counts),
        None if w.prediction is None else len(w.prediction.bins),
        tuple([len(f.bins) for f in w.features]),
    )


def _column_sums(rows: list[list[int]]) -> list[int]:
    return list(map(sum, zip(*rows, strict=True)))


def sum_windows(windows: Sequence[TelemetryWindow]) -> tuple[BucketSums, list[TelemetryWindow], list[tuple]]:
    """Sum one bucket's windows: (sums, summed windows, [(window, ShapeMismatch)] left out).

    The same numbers as `BucketSums.add_window` one by one, but when every window has one shape
    (the normal case) each column is summed once for the group instead of once per window,
    which is most of ingest's arithmetic.
    """
    shape = _shape(windows[0])
    if shape[0] == len(LATENCY_EDGES_MS) + 1 and all(_shape(w) == shape for w in windows[1:]):
        sums = BucketSums()
        features = None
        if shape[2]:
            packed = [[v for f in w.features for v in (*f.bins, f.nan, f.below_min, f.above_max, f.unseen)]
                      for w in windows]
            flat = _column_sums(packed)
            features, i = [], 0
            for n in shape[2]:
                features.append(flat[i:i + n + EXTRA_SLOTS])
                i += n + EXTRA_SLOTS
        prediction = None
        if shape[1] is not None:
            prediction = _column_sums([pack(w.prediction) for w in windows])
        errors: dict[str, int] = {}
        for w in windows:
            for kind, n in w.errors.items():
                errors[kind] = errors.get(kind, 0) + n
        sums.add(
            windows=len(windows),
            predictions=sum([w.predictions for w in windows]),
            requests=sum([w.requests for w in windows]),
            errors=errors,
            latency=_column_sums([w.latency.counts for w in windows]),
            latency_sum_ms=sum([w.latency.sum_ms for w in windows]),
            features=features if features is not None else [],
            prediction=prediction,
        )
        return sums, list(windows), []
    # Mixed shapes (an unregistered model changed its bins): one by one, as before.
    sums, kept, rejected = BucketSums(), [], []
    for w in windows:
        try:
            sums.add_window(w)
            kept.append(w)
        except ShapeMismatch as exc:
            rejected.append((w, exc))
    return sums, kept, rejected


def sum_rows(rows: Iterable[dict[str, Any]]) -> BucketSums:
    """Roll bucket rows up (a cohort, a tag, the fleet, or several buckets) by summing."""
    total = BucketSums()
    for row in rows:
        total.add_sums(BucketSums.from_row(row))
    return total


def summary(sums: BucketSums) -> dict[str, Any]:
    """Predictions, error rate and latency percentiles of summed counts (JSON-ready)."""
    observations = sum(sums.latency)
    return {
        "windows": sums.windows,
        "predictions": sums.predictions,
        "requests": sums.requests,
        "errors": sums.errors,
        "error_count": sums.error_count,
        "error_rate": sums.error_count / sums.requests if sums.requests else 0.0,
        "latency_ms": {
            "mean": sums.latency_sum_ms / observations if observations else None,
            "p50": latency_percentile(sums.latency, LATENCY_EDGES_MS, 0.50),
            "p95": latency_percentile(sums.latency, LATENCY_EDGES_MS, 0.95),
            "p99": latency_percentile(sums.latency, LATENCY_EDGES_MS, 0.99),
        },
    }
