"""Telemetry windows: mergeable counts of one window of serving (DESIGN section 3).

Counts go into the bundle's fixed reference bins (right-closed, like `np.searchsorted(edges, x,
side="left")` in `model_tools.binning`), so windows from any device add up exactly. Single-row
requests are counted in batches: `record` only keeps the row, its outputs and latency, and
every `PENDING_ROWS` rows, on the agent's tick, or when the window or the totals are read,
they are counted (request and latency counters, the sample) and binned, and their monitoring
sums added with numpy at once, in the order they were served: the same counts as one request
at a time, at a fraction of the cost on the request path. The label-free performance sums,
reconstruction errors and refused-row counts are `edge_agent.monitoring`'s.
"""

from __future__ import annotations

import logging
import random
import threading
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edge_agent.feedback import FeedbackResult, FeedbackTally
from edge_agent.monitoring import Monitor, RefusedAcc
from edge_agent.protocol import (
    LATENCY_EDGES_MS,
    FeatureCounts,
    Feedback,
    Histogram,
    Resources,
    SampleRow,
    ShadowCounts,
    TelemetryWindow,
)
from model_tools.manifest import BinnedDistribution, Manifest

log = logging.getLogger(__name__)
_LAT_EDGES = list(LATENCY_EDGES_MS)
_LAT_EDGES_NP = np.asarray(LATENCY_EDGES_MS)
PENDING_ROWS = 256  # single rows held for batch counting; a window is read only after counting them

# Refusals about the rows' content: their rows still count into per-feature data quality.
ROW_REFUSALS = frozenset({
    "wrong_feature_count", "unknown_feature", "missing_feature", "not_numeric", "wrong_type",
    "nan_not_allowed", "unknown_category", "bad_request",
})


class Binner:
    """One feature's (or the prediction's) reference bins, compiled for fast counting."""

    def __init__(self, dist: BinnedDistribution | None, vmin: float | None = None, vmax: float | None = None):
        self.edges = list(dist.edges) if dist is not None and dist.edges is not None else None
        self.edges_np = np.asarray(self.edges) if self.edges is not None else None
        cats = dist.categories if dist is not None and dist.categories is not None else None
        self.index = {str(c): i for i, c in enumerate(cats)} if cats is not None else None
        self.size = (
            len(self.edges) + 1 if self.edges is not None
            else len(cats) + 1 if cats is not None
            else 0
        )
        self.vmin = vmin
        self.vmax = vmax


class Counts:
    """Counters of one FeatureCounts in the making."""

    __slots__ = ("bins", "nan", "below", "above", "unseen")

    def __init__(self, size: int) -> None:
        self.bins = [0] * size
        self.nan = self.below = self.above = self.unseen = 0

    def add(self, b: Binner, v: Any) -> None:
        if b.edges is not None:
            if v is None or v != v:
                self.nan += 1
                return
            self.bins[bisect_left(b.edges, v)] += 1
            if b.vmin is not None and v < b.vmin:
                self.below += 1
            elif b.vmax is not None and v > b.vmax:
                self.above += 1
        elif b.index is not None:
            if v is None or v == "" or (type(v) is float and v != v):
                self.nan += 1
            else:
                self.bins[b.index.get(str(v), b.size - 1)] += 1

    def add_many(self, b: Binner, values: Sequence[Any]) -> None:
        if b.edges_np is not None and len(values) > 8:
            arr = np.asarray(values, dtype=np.float64)
            nan = np.isnan(arr)
            finite = arr[~nan]
            for i, c in enumerate(np.bincount(np.searchsorted(b.edges_np, finite, side="left"), minlength=b.size)):
                self.bins[i] += int(c)
            self.nan += int(nan.sum())
            if b.vmin is not None:
                self.below += int((finite < b.vmin).sum())
            if b.vmax is not None:
                self.above += int((finite > b.vmax).sum())
        elif b.index is not None and len(values) > 8:
            # Labels repeat: count each distinct value once, keyed by type too (1 and 1.0 are
            # equal keys but different categories).
            try:
                distinct = [(v, n) for (_, v), n in Counter(zip(map(type, values), values, strict=True)).items()]
            except TypeError:  # an unhashable value: one at a time
                distinct = [(v, 1) for v in values]
            for v, n in distinct:
                if v is None or v == "" or (type(v) is float and v != v):
                    self.nan += n
                else:
                    self.bins[b.index.get(str(v), b.size - 1)] += n
        else:
            for v in values:
                self.add(b, v)

    def freeze(self) -> FeatureCounts:
        return FeatureCounts(bins=self.bins, nan=self.nan, below_min=self.below, above_max=self.above, unseen=self.unseen)


class _Window:
    """The mutable counters of the current window (swapped out whole on flush)."""

    def __init__(
        self,
        start: float,
        features: list[Binner],
        prediction: Binner | None,
        version: str | None,
        monitor: Monitor | None = None,
    ):
        self.start = start
        self.version = version
        self.requests = 0
        self.predictions = 0
        self.errors: dict[str, int] = {}
        self.lat = [0] * (len(_LAT_EDGES) + 1)
        self.lat_sum = 0.0
        self.features = [Counts(b.size) for b in features]
        self.prediction = Counts(prediction.size) if prediction is not None else None
        self.sample: list[SampleRow] = []
        self.seen = 0
        self.shadow_version: str | None = None
        self.sh_compared = self.sh_agreed = self.sh_errors = 0
        self.sh_lat = [0] * (len(_LAT_EDGES) + 1)
        self.sh_lat_sum = 0.0
        self.sh_pred: Counts | None = None
        self.fb = _FeedbackCounts()
        self.estimate = monitor.new_estimate() if monitor is not None else None
        self.multivariate = monitor.new_reconstruction() if monitor is not None else None
        self.refused: RefusedAcc | None = None
        # Single-row requests not counted yet (see `record`): (row, prediction, probabilities, ms).
        self.pending: list[tuple[list[Any], Any, list[float] | None, float]] = []


class _FeedbackCounts:
    """The window's ground-truth feedback: tallies by model version and unjoinable counters."""

    __slots__ = ("tallies", "late", "unknown", "duplicate", "rejected", "touched")

    def __init__(self) -> None:
        self.tallies: dict[str, FeedbackTally] = {}
        self.late = self.unknown = self.duplicate = self.rejected = 0
        self.touched = False

    def blocks(self, version: str | None) -> tuple[Feedback | None, list[Feedback]]:
        """The window's main block (its model version, plus the counters) and other versions'."""
        if not self.touched:
            return None, []
        counters = dict(late=self.late, unknown=self.unknown, duplicate=self.duplicate, rejected=self.rejected)
        own = self.tallies.get(version) if version is not None else None
        main = own.freeze(**counters) if own is not None else Feedback(version=version, **counters)
        others = [t.freeze() for v, t in self.tallies.items() if v != version]
        return main, others


class Telemetry:
    """Accumulates the current window; thread-safe; `flush(now)` returns a TelemetryWindow."""

    def __init__(
        self,
        device: str,
        clock: Callable[[], float],
        window_s: float = 60.0,
        sample_rows: int = 16,
        sample_exclude: Sequence[str] = (),
        rng: random.Random | None = None,
    ) -> None:
        self.device = device
        self.clock = clock
        self.window_s = window_s
        self.sample_rows = sample_rows
        self.sample_exclude = set(sample_exclude)
        self.rng = rng or random.Random()
        self._lock = threading.Lock()
        self._model: Manifest | None = None
        self._features: list[Binner] = []
        self._prediction: Binner | None = None
        self._keep: list[bool] = []
        self._monitor: Monitor | None = None
        self._w = _Window(clock(), [], None, None)
        # Cumulative totals since start, for /metrics (never reset).
        self.total_predictions = 0
        self.total_requests = 0
        self.total_errors: dict[str, int] = {}
        self.total_lat = [0] * (len(_LAT_EDGES) + 1)
        self.total_lat_sum = 0.0

    # ------------------------------------------------------------------ model

    def set_model(self, manifest: Manifest | None) -> None:
        """Bins follow the active model; call `flush` first so a window has one model version."""
        with self._lock:
            self._model = manifest
            if manifest is None:
                self._features, self._prediction, self._keep = [], None, []
                self._monitor = None
            else:
                profiles = {p.name: p for p in manifest.profile.features}
                self._features = []
                for spec in manifest.inputs:
                    p = profiles.get(spec.name)
                    self._features.append(Binner(p.distribution if p else None, spec.min, spec.max))
                self._prediction = Binner(manifest.profile.prediction)
                self._keep = [spec.name not in self.sample_exclude for spec in manifest.inputs]
                self._monitor = Monitor(manifest)
                for problem in self._monitor.problems:
                    log.warning("model %s %s: %s", manifest.name, manifest.version, problem)
            feedback = self._w.fb
            self._w = _Window(
                self._w.start, self._features, self._prediction, manifest.version if manifest else None, self._monitor
            )
            self._w.fb = feedback  # joins are attributed by version: none are lost on a switch

    # ------------------------------------------------------------------ recording

    def record(
        self,
        rows: list[list[Any]],
        primary: list[Any],
        latency_s: float,
        probabilities: list[list[float]] | None = None,
    ) -> None:
        """One served request: validated rows, their predictions (and class probabilities, for
        the performance estimate), and the model latency."""
        ms = latency_s * 1000.0
        with self._lock:
            w = self._w
            if len(rows) == 1 and (probabilities is not None or w.estimate is None):
                pending = w.pending
                pending.append((rows[0], primary[0], probabilities[0] if probabilities is not None else None, ms))
                if len(pending) >= PENDING_ROWS:
                    self._count(w)
                return
            self._count(w)
            self._count_request(w, len(rows), ms)
            self._count_rows(w, rows, primary, probabilities)
            self._sample(w, rows, primary)

    def record_row(self, row: list[Any], y: Any, latency_s: float, probabilities: list[float] | None) -> None:
        """One served single-row request: `record([row], [y], latency_s, [probabilities])`, kept short
        because it runs on every request."""
        item = (row, y, probabilities, latency_s * 1000.0)
        with self._lock:
            w = self._w
            if probabilities is None and w.estimate is not None:
                self._count(w)
                self._count_request(w, 1, item[3])
                self._count_rows(w, [row], [y], None)
                self._sample(w, [row], [y])
                return
            pending = w.pending
            pending.append(item)
            if len(pending) >= PENDING_ROWS:
                self._count(w)

    def _count_request(self, w: _Window, n: int, ms: float) -> None:
        """A served request's counters and latency, in the window and the totals (under the lock)."""
        w.requests += 1
        w.predictions += n
        b = bisect_left(_LAT_EDGES, ms)
        w.lat[b] += 1
        w.lat_sum += ms
        self.total_requests += 1
        self.total_predictions += n
        self.total_lat[b] += 1
        self.total_lat_sum += ms

    def _sample(self, w: _Window, rows: Sequence[list[Any]], primary: Sequence[Any]) -> None:
        """Offer served rows to the window's sample (under the lock)."""
        k = self.sample_rows
        if not k:
            return
        sample = w.sample
        for row, y in zip(rows, primary, strict=False):
            w.seen += 1
            # Algorithm R: every row of the window is equally likely to be kept.
            if len(sample) < k:
                sample.append(self._sample_row(row, y))
            else:
                r = int(self.rng.random() * w.seen)
                if r < k:
                    sample[r] = self._sample_row(row, y)

    def _count(self, w: _Window) -> None:
        """Count the window's pending single-row requests, in the order they were served (under the lock)."""
        pending = w.pending
        if not pending:
            return
        w.pending = []
        n = len(pending)
        w.requests += n
        w.predictions += n
        self.total_requests += n
        self.total_predictions += n
        lat, total_lat = w.lat, self.total_lat
        lat_sum, total_lat_sum = w.lat_sum, self.total_lat_sum
        for item in pending:  # each request's latency, summed in serving order as one at a time
            ms = item[3]
            b = bisect_left(_LAT_EDGES, ms)
            lat[b] += 1
            total_lat[b] += 1
            lat_sum += ms
            total_lat_sum += ms
        w.lat_sum, self.total_lat_sum = lat_sum, total_lat_sum
        rows = [item[0] for item in pending]
        primary = [item[1] for item in pending]
        proba = [item[2] for item in pending if item[2] is not None]
        self._count_rows(w, rows, primary, proba if len(proba) == len(rows) else None)
        self._sample(w, rows, primary)

    def _count_rows(self, w: _Window, rows: list[list[Any]], primary: list[Any],
                    probabilities: list[list[float]] | None) -> None:
        feats = self._features
        for j, (c, b) in enumerate(zip(w.features, feats, strict=False)):
            c.add_many(b, [r[j] for r in rows])
        if w.prediction is not None:
            w.prediction.add_many(self._prediction, primary)
        monitor = self._monitor
        if monitor is not None:
            if w.estimate is not None and probabilities is not None:
                monitor.add_estimate(w.estimate, primary, probabilities)
            if w.multivariate is not None:
                monitor.add_reconstruction(w.multivariate, rows)

    def count_pending(self) -> None:
        """Count the single-row requests held for batching now (the agent's tick does, off the
        request path; read the totals after it)."""
        with self._lock:
            self._count(self._w)

    def _sample_row(self, row: list[Any], y: Any) -> SampleRow:
        keep = self._keep
        return SampleRow(x=[v if keep[j] else None for j, v in enumerate(row)], y=y)

    def record_error(self, kind: str, feature: str | None = None, rows: Sequence[Any] | None = None) -> None:
        """A refused request; with its `rows`, a refusal about their content also counts each
        row's values into the window's data-quality counts (`refused`)."""
        with self._lock:
            w = self._w
            if rows is not None and kind in ROW_REFUSALS and self._monitor is not None:
                if w.refused is None:
                    w.refused = self._monitor.new_refused()
                self._monitor.add_refused(w.refused, rows)
            w.requests += 1
            w.errors[kind] = w.errors.get(kind, 0) + 1
            self.total_requests += 1
            self.total_errors[kind] = self.total_errors.get(kind, 0) + 1
            if kind == "unknown_category" and feature is not None and self._model is not None:
                # Refused rows are not binned, but a new category is a drift signal worth counting.
                for j, spec in enumerate(self._model.inputs):
                    if spec.name == feature:
                        w.features[j].unseen += 1

    def record_shadow(
        self, version: str, compared: int, agreed: int, errors: int, latency_s: float, primary: list[Any]
    ) -> None:
        ms = latency_s * 1000.0
        with self._lock:
            w = self._w
            if w.shadow_version != version:
                w.shadow_version = version
                w.sh_compared = w.sh_agreed = w.sh_errors = 0
                w.sh_lat = [0] * (len(_LAT_EDGES) + 1)
                w.sh_lat_sum = 0.0
                w.sh_pred = Counts(self._prediction.size) if self._prediction is not None else None
            w.sh_compared += compared
            w.sh_agreed += agreed
            w.sh_errors += errors
            if not errors:
                w.sh_lat[bisect_left(_LAT_EDGES, ms)] += 1
                w.sh_lat_sum += ms
                if w.sh_pred is not None:
                    w.sh_pred.add_many(self._prediction, primary)

    def record_feedback(self, result: FeedbackResult) -> None:
        """One batch of ground-truth feedback, joined by the agent's prediction record."""
        with self._lock:
            fb = self._w.fb
            fb.touched = True
            fb.late += result.late
            fb.unknown += result.unknown
            fb.duplicate += result.duplicate
            for version, tally in result.tallies.items():
                mine = fb.tallies.get(version)
                if mine is None:  # a copy: the caller keeps its result
                    mine = fb.tallies[version] = FeedbackTally(tally.model)
                mine.merge(tally)

    def record_feedback_rejected(self) -> None:
        """A feedback request refused as malformed (nothing in it was joined)."""
        with self._lock:
            fb = self._w.fb
            fb.touched = True
            fb.rejected += 1

    # ------------------------------------------------------------------ windows

    def due(self, now: float) -> bool:
        return now >= self._w.start + self.window_s

    @property
    def window_start(self) -> float:
        return self._w.start

    def flush(self, now: float, seq: int, resources: Resources, dropped_total: int, model: str | None) -> TelemetryWindow:
        """Close the current window at `now` and start the next one."""
        with self._lock:
            w = self._w
            self._count(w)
            self._w = _Window(
                now, self._features, self._prediction, self._model.version if self._model else None, self._monitor
            )
        shadow = None
        if w.shadow_version is not None:
            shadow = ShadowCounts(
                version=w.shadow_version,
                compared=w.sh_compared,
                agreed=w.sh_agreed,
                errors=w.sh_errors,
                latency=Histogram(counts=w.sh_lat, sum_ms=round(w.sh_lat_sum, 6)),
                prediction=w.sh_pred.freeze() if w.sh_pred is not None else None,
            )
        feedback, feedback_other = w.fb.blocks(w.version)
        return TelemetryWindow(
            device=self.device,
            seq=seq,
            model=model,
            model_version=w.version,
            window_start=w.start,
            window_end=now,
            sent_at=now,
            predictions=w.predictions,
            requests=w.requests,
            errors=w.errors,
            latency=Histogram(counts=w.lat, sum_ms=round(w.lat_sum, 6)),
            features=[c.freeze() for c in w.features],
            prediction=w.prediction.freeze() if w.prediction is not None else None,
            shadow=shadow,
            sample=w.sample,
            feedback=feedback,
            feedback_other=feedback_other,
            resources=resources,
            dropped_total=dropped_total,
            estimate=w.estimate.freeze() if w.estimate is not None and w.estimate.rows else None,
            multivariate=w.multivariate.freeze() if w.multivariate is not None and w.multivariate.rows else None,
            refused=w.refused.freeze() if w.refused is not None else None,
        )
