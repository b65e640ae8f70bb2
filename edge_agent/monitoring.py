"""Per-prediction sums beyond the reference bins: label-free performance estimation (the
calibrated expected confusion matrix and raw-score histogram) and the multivariate
reconstruction error, plus data-quality counts of refused rows. numpy only, vectorised per batch.

A `Monitor` is compiled from a manifest once per model; the `*Sums` objects are one window's
mutable counters, frozen into the protocol's structs at flush. Everything adds up across
windows and devices.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from typing import Any

import numpy as np

from edge_agent.protocol import (
    PerformanceEstimate,
    QualityCounts,
    ReconstructionSums,
    RefusedRows,
)
from edge_agent.validation import RowValidator
from model_tools.calibration import apply_calibration
from model_tools.manifest import Manifest
from model_tools.reconstruction import Reconstruction


class EstimateSums:
    """One window's PerformanceEstimate in the making (plain lists: a single row is cheaper
    in Python than through numpy's per-call overhead)."""

    __slots__ = ("rows", "predicted", "by_predicted", "sq_sum", "score_counts", "score_positive")

    def __init__(self, n_classes: int, score_bins: int) -> None:
        self.rows = 0
        self.predicted = [0] * n_classes
        self.by_predicted = [[0.0] * n_classes for _ in range(n_classes)]  # [predicted][true]
        self.sq_sum = 0.0
        self.score_counts = [0] * score_bins if score_bins else None
        self.score_positive = [0.0] * score_bins if score_bins else None

    def freeze(self) -> PerformanceEstimate:
        n = len(self.predicted)
        return PerformanceEstimate(
            rows=self.rows,
            predicted=list(self.predicted),
            confusion=[[self.by_predicted[k][c] for k in range(n)] for c in range(n)],
            confidence_sq_sum=self.sq_sum,
            score_counts=list(self.score_counts) if self.score_counts is not None else None,
            score_positive=list(self.score_positive) if self.score_positive is not None else None,
        )


class ReconstructionAcc:
    """One window's ReconstructionSums in the making."""

    __slots__ = ("rows", "sum", "sum_sq", "bins", "filled")

    def __init__(self, n_bins: int) -> None:
        self.rows = self.filled = 0
        self.sum = self.sum_sq = 0.0
        self.bins = [0] * n_bins

    def freeze(self) -> ReconstructionSums:
        return ReconstructionSums(
            rows=self.rows, sum=self.sum, sum_sq=self.sum_sq, bins=list(self.bins), filled=self.filled
        )


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    """np.interp for one value (clamped at both ends), without numpy's call overhead."""
    i = bisect_right(xs, x)
    if i == 0:
        return ys[0]
    if i >= len(xs):
        return ys[-1]
    x0, x1 = xs[i - 1], xs[i]
    y0 = ys[i - 1]
    return y0 + (ys[i] - y0) * (x - x0) / (x1 - x0)


class RefusedAcc:
    """One window's RefusedRows in the making (allocated on the first refusal only)."""

    __slots__ = ("rows", "malformed", "counts")

    def __init__(self, n_features: int) -> None:
        self.rows = self.malformed = 0
        self.counts = np.zeros((n_features, 5), dtype=np.int64)

    def freeze(self) -> RefusedRows:
        return RefusedRows(
            rows=self.rows,
            malformed=self.malformed,
            features=[
                QualityCounts(nan=a, below_min=b, above_max=c, wrong_type=d, unseen=e)
                for a, b, c, d, e in self.counts.tolist()
            ],
        )


class Monitor:
    """A manifest's estimation and multivariate profile, compiled for per-batch sums."""

    def __init__(self, manifest: Manifest) -> None:
        classes = manifest.outputs.classes or []
        self.classes = classes
        self.problems: list[str] = []  # parts left out because the manifest's numbers do not fit
        est = manifest.estimation
        if est is not None and (why := _estimation_problem(manifest)) is not None:
            self.problems.append(f"performance estimate off: {why}")
            est = None
        self.estimating = est is not None
        self.calibration = est.calibration if est is not None else None
        self.positive = est.positive if est is not None else None
        edges = est.score_edges if est is not None and est.score_edges is not None and len(classes) == 2 else None
        self.score_edges = np.asarray(edges, dtype=np.float64) if edges is not None else None
        self.score_bins = len(edges) + 1 if edges is not None else 0
        self._score_edges = list(edges) if edges is not None else []
        self._applied = self.calibration is not None and self.calibration.applied
        # Labels come back from onnxruntime as Python ints or strings: index both spellings.
        self.index: dict[Any, int] = {}
        for i, c in enumerate(classes):
            self.index[c] = i
            self.index[str(c)] = i
        mv = manifest.profile.multivariate
        if mv is not None and (why := _multivariate_problem(manifest)) is not None:
            self.problems.append(f"multivariate drift off: {why}")
            mv = None
        self.reconstruction = Reconstruction(mv) if mv is not None else None
        self.validator = RowValidator(manifest.inputs)

    # ------------------------------------------------------------------ new window counters

    def new_estimate(self) -> EstimateSums | None:
        return EstimateSums(len(self.classes), self.score_bins) if self.estimating else None

    def new_reconstruction(self) -> ReconstructionAcc | None:
        rec = self.reconstruction
        return ReconstructionAcc(len(rec.edges) + 1) if rec is not None else None

    def new_refused(self) -> RefusedAcc:
        return RefusedAcc(self.validator.n)

    # ------------------------------------------------------------------ per batch

    def add_estimate(self, acc: EstimateSums, labels: Sequence[Any], probabilities: Sequence[Sequence[float]]) -> None:
        """Calibrate the batch's probabilities and add its expected-confusion sums."""
        if len(labels) == 1:
            self._add_estimate_row(acc, labels[0], probabilities[0])
            return
        raw = np.asarray(probabilities, dtype=np.float64)
        if raw.ndim != 2 or raw.shape[1] != len(self.classes) or len(raw) != len(labels):
            return
        index = self.index
        k = np.fromiter((index.get(v, -1) for v in labels), dtype=np.int64, count=len(labels))
        if (k < 0).any():  # a label outside the classes cannot be placed: leave such rows out
            keep = k >= 0
            raw, k = raw[keep], k[keep]
        n = len(k)
        if n == 0:
            return
        p = apply_calibration(self.calibration, raw)
        conf = p[np.arange(n), k]
        acc.rows += n
        acc.sq_sum += float(conf @ conf)
        n_classes = len(self.classes)
        # by_true[c][j]: Σ p[c] over rows predicted j (one weighted bincount per class).
        by_true = [np.bincount(k, weights=p[:, c], minlength=n_classes).tolist() for c in range(n_classes)]
        for j, count in enumerate(np.bincount(k, minlength=n_classes).tolist()):
            acc.predicted[j] += count
            row = acc.by_predicted[j]
            for c in range(n_classes):
                row[c] += by_true[c][j]
        if acc.score_counts is not None and acc.score_positive is not None:
            b = np.searchsorted(self.score_edges, raw[:, 1], side="left")
            counts = np.bincount(b, minlength=self.score_bins).tolist()
            sums = np.bincount(b, weights=p[:, 1], minlength=self.score_bins).tolist()
            for i in range(self.score_bins):
                acc.score_counts[i] += counts[i]
                acc.score_positive[i] += sums[i]

    def _add_estimate_row(self, acc: EstimateSums, label: Any, raw: Sequence[float]) -> None:
        k = self.index.get(label)
        n_classes = len(self.classes)
        if k is None or len(raw) != n_classes:
            return
        cal = self.calibration
        if n_classes == 2:
            pos = float(raw[1])
            if self._applied:
                pos = _interp(pos, cal.knots[0], cal.values[0])
            p = [1.0 - pos, pos]
        elif self._applied:
            p = [float(v) for v in raw]
            for col, xs, ys in zip(cal.columns, cal.knots, cal.values, strict=True):
                p[col] = _interp(p[col], xs, ys)
            total = sum(p)
            p = [v / total for v in p] if total > 0 else [float(v) for v in raw]
        else:
            p = [float(v) for v in raw]
        acc.rows += 1
        acc.predicted[k] += 1
        row = acc.by_predicted[k]
        for i, v in enumerate(p):
            row[i] += v
        q = p[k]
        acc.sq_sum += q * q
        if acc.score_counts is not None and acc.score_positive is not None:
            b = bisect_left(self._score_edges, float(raw[1]))
            acc.score_counts[b] += 1
            acc.score_positive[b] += p[1]

    def add_reconstruction(self, acc: ReconstructionAcc, rows: Sequence[Sequence[Any]]) -> None:
        """Each validated row's reconstruction error, into count, sum, sum of squares and bins."""
        rec = self.reconstruction
        assert rec is not None
        if len(rows) == 1:
            values = rec.take(rows[0])
            filled = 0
            total = sum(values)
            if total != total:  # a NaN among them (or +inf and -inf): fill NaN with the medians
                values = [f if v != v else v for v, f in zip(values, rec.fill_list, strict=True)]
                filled = int(any(v != v for v in rec.take(rows[0])))
            e = rec.error(values)
            acc.rows += 1
            acc.filled += filled
            acc.sum += e
            acc.sum_sq += e * e
            acc.bins[bisect_left(rec.edges_list, e)] += 1
            return
        x, filled = rec.matrix(rows)
        err = rec.errors(x)
        acc.rows += len(err)
        acc.filled += filled
        acc.sum += float(err.sum())
        acc.sum_sq += float(err @ err)
        for i, c in enumerate(np.bincount(rec.bins(err), minlength=len(acc.bins)).tolist()):
            acc.bins[i] += c

    def add_refused(self, acc: RefusedAcc, rows: Sequence[Any]) -> None:
        n, malformed, counts = self.validator.quality(rows)
        acc.rows += n
        acc.malformed += malformed
        acc.counts += np.asarray(counts, dtype=np.int64).reshape(acc.counts.shape)


def _sorted(values: Sequence[float]) -> bool:
    return all(math.isfinite(v) for v in values) and all(a <= b for a, b in zip(values, values[1:], strict=False))


def _estimation_problem(manifest: Manifest) -> str | None:
    """Why the manifest's estimation cannot be applied to its outputs, or None. (A bundle is
    signed, so this guards against a builder's bug, never silently against an attacker.)"""
    est = manifest.estimation
    assert est is not None
    n = len(manifest.outputs.classes or [])
    if n < 2 or not manifest.outputs.probabilities:
        return "the model has no class probabilities"
    cal = est.calibration
    if cal.applied:
        if not (len(cal.columns) == len(cal.knots) == len(cal.values)) or not cal.columns:
            return "calibration columns, knots and values do not line up"
        if any(not 0 <= c < n for c in cal.columns) or (n == 2 and cal.columns != [1]):
            return "calibration columns are not the model's"
        for xs, ys in zip(cal.knots, cal.values, strict=True):
            if len(xs) != len(ys) or len(xs) < 2 or not _sorted(xs) or not all(0.0 <= y <= 1.0 for y in ys):
                return "a calibration table is not a monotone map into [0, 1]"
    if est.score_edges is not None and not _sorted(est.score_edges):
        return "score edges are not sorted"
    return None


def _multivariate_problem(manifest: Manifest) -> str | None:
    mv = manifest.profile.multivariate
    assert mv is not None
    d = len(mv.features)
    inputs = manifest.inputs
    if d < 1 or any(not 0 <= j < len(inputs) or inputs[j].kind != "numeric" for j in mv.features):
        return "its features are not numeric inputs of the model"
    if not (len(mv.fill) == len(mv.mean) == len(mv.scale) == d) or any(len(r) != d for r in mv.components):
        return "its vectors do not line up with its features"
    numbers = [*mv.fill, *mv.mean, *(v for r in mv.components for v in r)]
    if not all(math.isfinite(v) for v in numbers) or not all(math.isfinite(v) and v > 0 for v in mv.scale):
        return "it holds a non-finite number or a scale that is not positive"
    if not _sorted(mv.edges):
        return "its edges are not sorted"
    return None
