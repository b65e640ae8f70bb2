"""Ground-truth feedback: prediction ids, the bounded record of recent predictions, and joins.

An id is a per-run random prefix and a hex counter (`k3jx9aqe-1f`): issuing one costs an
integer increment. Because counters are issued in order, the record is a preallocated ring of
`max_records` slots (slot = counter mod size) in typed arrays, 23 bytes a record, with no
per-prediction Python objects: it never grows, and an id's slot and age are found in O(1).
"""

from __future__ import annotations

import base64
import math
import os
import re
import threading
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_agent.protocol import (
    CALIBRATION_EDGES,
    FEEDBACK_ANOMALY_CLASSES,
    Feedback,
    feedback_error_edges,
)
from edge_agent.runtime import Output
from edge_agent.validation import RequestError
from model_tools.manifest import Manifest

# ts (float64) + value or top-class probability (float64) + class index (int32)
# + model version index (uint16) + "feedback received" flag (uint8).
BYTES_PER_RECORD = 8 + 8 + 4 + 2 + 1
MAX_ID_CHARS = 64
PENDING_RECORDS = 256  # single-row predictions held before their slots are written
ID_PATTERN = re.compile(r"^([a-z2-7]{8})-([0-9a-f]{1,15})$")
_CAL_EDGES = list(CALIBRATION_EDGES)
_NAN = float("nan")
_NO_CLASS = -1


def new_prefix() -> str:
    """Eight random base32 characters (40 bits), new for every run of the agent."""
    return base64.b32encode(os.urandom(5)).decode().lower()


def format_ids(prefix: str, first: int, n: int) -> list[str]:
    """The ids of `n` predictions from counter `first`: `{prefix}-{counter in hex}`."""
    return [f"{prefix}-{c:x}" for c in range(first, first + n)]


@dataclass(frozen=True)
class FeedbackModel:
    """What a join needs to know about the model version that made a prediction."""

    version: str
    task: str
    classes: tuple[Any, ...] | None  # classification and anomaly; None for regression
    index: Mapping[Any, int]  # class label (and its str) -> class index
    has_probabilities: bool
    error_edges: tuple[float, ...] | None  # regression

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> FeedbackModel:
        out = manifest.outputs
        if manifest.task == "regression":
            edges = tuple(feedback_error_edges(manifest.profile.prediction.edges))
            return cls(manifest.version, "regression", None, {}, False, edges)
        classes = tuple(out.classes) if out.classes is not None else (
            FEEDBACK_ANOMALY_CLASSES if manifest.task == "anomaly" else ()
        )
        index: dict[Any, int] = {}
        for i, c in enumerate(classes):
            index.setdefault(c, i)
            index.setdefault(str(c), i)
        return cls(manifest.version, manifest.task, classes, index, out.probabilities is not None, None)

    def class_index(self, truth: Any) -> int | None:
        """The class index of a ground-truth label (1.0 matches class 1, "1" matches 1 too)."""
        i = self.index.get(truth)
        if i is None and not isinstance(truth, str):
            i = self.index.get(str(truth))
        return i


class FeedbackTally:
    """The joined counts of one model version in one window (becomes a protocol `Feedback`)."""

    def __init__(self, model: FeedbackModel) -> None:
        self.model = model
        self.joined = 0
        self.unknown_label = 0
        k = len(model.classes) if model.classes is not None else 0
        self.confusion = [[0] * k for _ in range(k)] if model.classes is not None else None
        cal = len(_CAL_EDGES) + 1
        self.cal_counts = [0] * cal if model.has_probabilities else None
        self.cal_hits = [0] * cal if model.has_probabilities else None
        self.cal_prob = [0.0] * cal if model.has_probabilities else None
        self.error_bins = [0] * (len(model.error_edges) + 1) if model.error_edges is not None else None
        self.abs_sum = 0.0
        self.sq_sum = 0.0

    def add_class(self, true: int, predicted: int, prob: float) -> None:
        assert self.confusion is not None
        self.joined += 1
        self.confusion[true][predicted] += 1
        if self.cal_counts is not None and prob == prob:
            b = bisect_left(_CAL_EDGES, prob)
            self.cal_counts[b] += 1
            self.cal_hits[b] += true == predicted  # type: ignore[index]
            self.cal_prob[b] += prob  # type: ignore[index]

    def add_error(self, truth: float, predicted: float) -> None:
        assert self.error_bins is not None and self.model.error_edges is not None
        err = abs(truth - predicted)
        self.joined += 1
        self.abs_sum += err
        self.sq_sum += err * err
        self.error_bins[bisect_left(self.model.error_edges, err)] += 1

    def merge(self, other: FeedbackTally) -> None:
        """Add another tally of the same model version."""
        self.joined += other.joined
        self.unknown_label += other.unknown_label
        self.abs_sum += other.abs_sum
        self.sq_sum += other.sq_sum
        if self.confusion is not None and other.confusion is not None:
            for row, add in zip(self.confusion, other.confusion, strict=True):
                for j, n in enumerate(add):
                    row[j] += n
        for mine, theirs in ((self.cal_counts, other.cal_counts), (self.cal_hits, other.cal_hits),
                             (self.cal_prob, other.cal_prob), (self.error_bins, other.error_bins)):
            if mine is not None and theirs is not None:
                for j, n in enumerate(theirs):
                    mine[j] += n

    def freeze(self, **counters: int) -> Feedback:
        return Feedback(
            version=self.model.version,
            joined=self.joined,
            unknown_label=self.unknown_label,
            confusion=self.confusion,
            abs_error_sum=self.abs_sum,
            sq_error_sum=self.sq_sum,
            error_bins=self.error_bins,
            calibration_counts=self.cal_counts,
            calibration_hits=self.cal_hits,
            calibration_prob_sum=self.cal_prob,
            **counters,
        )


@dataclass
class FeedbackResult:
    """What one batch of feedback did: every item lands in exactly one of these counts."""

    joined: int = 0
    unknown_label: int = 0
    late: int = 0
    unknown: int = 0
    duplicate: int = 0
    tallies: dict[str, FeedbackTally] = field(default_factory=dict, repr=False)  # by model version

    def to_dict(self) -> dict[str, int]:
        return {"joined": self.joined, "unknown_label": self.unknown_label, "late": self.late,
                "unknown": self.unknown, "duplicate": self.duplicate}


# ---------------------------------------------------------------- parsing


def items_from_payload(payload: Any) -> list[Any]:
    """The feedback items of a request body: `{"feedback": [...]}`, `[...]` or one item."""
    if isinstance(payload, Mapping):
        if "feedback" in payload:
            items = payload["feedback"]
            if not isinstance(items, list):
                raise RequestError("bad_request", '"feedback" must be a list of {"id", "label" or "value"} objects')
            return items
        if "id" in payload:
            return [payload]
    elif isinstance(payload, list):
        return payload
    raise RequestError("bad_request", 'send {"feedback": [{"id": ..., "label": ...}, ...]} '
                       '(classification) or {"id": ..., "value": ...} items (regression)')


def parse_items(items: Iterable[Any]) -> list[tuple[str, Any]]:
    """Check every item before any is joined (a refused request counts nothing), as (id, truth).

    An item is a mapping with a string `id` and exactly one of `label` (a class: string or
    number) and `value` (a finite number). Raises RequestError("bad_feedback") naming the item.
    """
    if isinstance(items, Mapping):
        items = [items]
    out: list[tuple[str, Any]] = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise RequestError("bad_feedback", f"feedback item {i} is not an object", row=i)
        pid = item.get("id")
        if not isinstance(pid, str) or not pid:
            raise RequestError("bad_feedback", f'feedback item {i} needs "id": the string returned by predict', row=i)
        extra = set(item) - {"id", "label", "value"}
        if extra:
            raise RequestError("bad_feedback", f"feedback item {i} has unknown keys {sorted(extra)}; "
                               'use "id" with "label" or "value"', row=i)
        has_label, has_value = "label" in item, "value" in item
        if has_label == has_value:
            raise RequestError("bad_feedback", f'feedback item {i} needs exactly one of "label" (classification) '
                               'and "value" (regression)', row=i)
        truth = item["label"] if has_label else item["value"]
        number = isinstance(truth, float) and math.isfinite(truth) or (
            type(truth) is int and -(2**63) <= truth < 2**63  # JSON may carry ints of any size
        )
        if not (number or (has_label and isinstance(truth, str))):
            want = "a class label (string or number)" if has_label else "a finite number"
            raise RequestError("bad_feedback", f"feedback item {i}: {'label' if has_label else 'value'} "
                               f"{truth!r:.80} is not {want}", row=i)
        out.append((pid, truth))
    return out


# ---------------------------------------------------------------- the record


class PredictionRecord:
    """The last `max_records` predictions (at most `horizon_s` old), joinable by id.

    Thread-safe. `add` is on the predict path: for a single row, a lock, an increment and an
    append; the row's slot is written with the next `PENDING_RECORDS` of them, or before a join.
    """

    def __init__(self, max_records: int = 10_000, horizon_s: float = 86_400.0, prefix: str | None = None) -> None:
        if max_records < 1:
            raise ValueError("max_records must be at least 1")
        self.size = max_records
        self.horizon_s = horizon_s
        self.prefix = prefix or new_prefix()
        self._lock = threading.Lock()
        self._next = 0  # the next counter to issue
        self._ts = array("d", bytes(8 * max_records))
        self._val = array("d", bytes(8 * max_records))
        self._cls = array("i", bytes(4 * max_records))
        self._ver = array("H", bytes(2 * max_records))
        self._seen = bytearray(max_records)
        self._models: list[FeedbackModel] = []
        self._vindex: dict[str, int] = {}
        self._hot: tuple[Manifest | None, int, Mapping[Any, int] | None] = (None, 0, None)
        # Single-row predictions whose slots are not written yet: (counter, ts, label, probabilities, version index).
        self._pending: list[tuple[int, float, Any, list[float] | None, int]] = []

    def __len__(self) -> int:
        """Predictions held (expired ones included until their slot is reused)."""
        return min(self._next, self.size)

    @property
    def issued(self) -> int:
        return self._next

    @property
    def nbytes(self) -> int:
        return sum(a.itemsize * len(a) for a in (self._ts, self._val, self._cls, self._ver)) + len(self._seen)

    def register(self, manifest: Manifest) -> int:
        """Make a model version known (at activation); returns its index in the record."""
        with self._lock:
            vi = self._vindex.get(manifest.version)
            if vi is None:
                if len(self._models) >= 65535:
                    raise RuntimeError("more than 65535 model versions in one run of the agent")
                vi = self._vindex[manifest.version] = len(self._models)
                self._models.append(FeedbackModel.from_manifest(manifest))
            return vi

    def ids(self, first: int, n: int) -> list[str]:
        return format_ids(self.prefix, first, n)

    def add(self, manifest: Manifest, out: Output, now: float) -> int:
        """Record a batch's predictions; returns the counter of its first id."""
        hot = self._hot  # (manifest, version index, class index) of the last call
        if hot[0] is not manifest:
            vi = self.register(manifest)
            model = self._models[vi]
            hot = self._hot = (manifest, vi, model.index if model.classes is not None else None)
        vi, index = hot[1], hot[2]
        labels = out.labels
        probas = out.probabilities
        if index is not None and labels is not None:
            if len(labels) == 1:  # the common case, kept short: it runs on every request
                with self._lock:
                    first = self._next
                    self._next = first + 1
                    pending = self._pending
                    pending.append((first, now, labels[0], probas[0] if probas is not None else None, vi))
                    if len(pending) >= PENDING_RECORDS:
                        self._write_pending()
                return first
            cls = [index.get(lab, _NO_CLASS) for lab in labels]
            val = [max(p) for p in probas] if probas is not None else [_NAN] * len(labels)
        else:
            val = out.values or []
            cls = [_NO_CLASS] * len(val)
        n = len(val)
        size = self.size
        with self._lock:
            self._write_pending()  # slots are written in the order their counters were issued
            first = self._next
            self._next = first + n
            slot = first % size
            for k in range(n):
                self._ts[slot] = now
                self._val[slot] = val[k]
                self._cls[slot] = cls[k]
                self._ver[slot] = vi
                self._seen[slot] = 0
                slot += 1
                if slot == size:
                    slot = 0
        return first

    def _write_pending(self) -> None:
        """Write the pending single-row predictions into their slots (under the lock)."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        size, models = self.size, self._models
        for first, now, label, proba, vi in pending:
            slot = first % size
            self._ts[slot] = now
            self._val[slot] = max(proba) if proba is not None else _NAN
            self._cls[slot] = models[vi].index.get(label, _NO_CLASS)
            self._ver[slot] = vi
            self._seen[slot] = 0

    def join(self, items: Sequence[tuple[str, Any]], now: float) -> FeedbackResult:
        """Join parsed (id, truth) items with the record; each lands in one count of the result."""
        result = FeedbackResult()
        tallies = result.tallies
        with self._lock:
            self._write_pending()
            issued = self._next
            oldest = issued - self.size
            for pid, truth in items:
                m = ID_PATTERN.match(pid) if len(pid) <= MAX_ID_CHARS else None
                if m is None:
                    result.unknown += 1
                    continue
                if m.group(1) != self.prefix:
                    result.late += 1  # an earlier run's id (the record lives in memory only)
                    continue
                c = int(m.group(2), 16)
                if c >= issued:
                    result.unknown += 1
                    continue
                slot = c % self.size
                if c < oldest or now - self._ts[slot] > self.horizon_s:
                    result.late += 1
                    continue
                if self._seen[slot]:
                    result.duplicate += 1
                    continue
                self._seen[slot] = 1
                model = self._models[self._ver[slot]]
                tally = tallies.get(model.version)
                if tally is None:
                    tally = tallies[model.version] = FeedbackTally(model)
                predicted = self._val[slot]
                if model.classes is not None:
                    true = model.class_index(truth)
                    ci = self._cls[slot]
                    if true is None or ci == _NO_CLASS:
                        tally.unknown_label += 1
                    else:
                        tally.add_class(true, ci, predicted)
                elif isinstance(truth, (int, float)) and math.isfinite(truth):
                    tally.add_error(float(truth), predicted)
                else:
                    tally.unknown_label += 1  # a class name sent to a regression model
        for tally in tallies.values():
            result.joined += tally.joined
            result.unknown_label += tally.unknown_label
        return result
