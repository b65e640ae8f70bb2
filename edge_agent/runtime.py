"""One loaded model: an onnxruntime session, its row validator, feeds and the golden self-test.

Hot path is numpy + onnxruntime only. A `ModelRuntime` is immutable once built, so the agent
swaps whole runtimes atomically (Activate, Rollback) while requests are in flight.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from edge_agent.validation import RequestError, RowValidator
from model_tools.bundle import Bundle
from model_tools.manifest import Manifest

_NP = {"float32": np.float32, "float64": np.float64, "int64": np.int64, "string": object}


@dataclass(slots=True)
class Output:
    """Model outputs for a batch, as plain Python lists (JSON-ready)."""

    labels: list[Any] | None
    probabilities: list[list[float]] | None
    values: list[float] | None

    @property
    def primary(self) -> list[Any]:
        """What telemetry bins as "the prediction": the label, else the value."""
        return self.labels if self.labels is not None else (self.values or [])


def median(values: list[float]) -> float:
    """statistics.median, which would import decimal and fractions (~0.6 MiB) for one sort."""
    data = sorted(values)
    n = len(data)
    if n == 0:
        raise ValueError("median of no values")
    i = n // 2
    return data[i] if n % 2 else (data[i - 1] + data[i]) / 2


@dataclass
class SelfTestResult:
    ok: bool
    reason: str
    latency_ms_p50: float


def session_options(intra_op_threads: int = 1) -> ort.SessionOptions:
    """Settings for a small CPU: few threads (2 intra-op threads are unstable on 2 cores)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # enable_cpu_mem_arena and enable_mem_pattern stay on (the defaults): off saved no RSS on the
    # benchmark models (the arena off held 0.2-0.3 MiB more after 20,000 single-row runs, the
    # pattern made no difference); a first session's ~9 MiB is mostly onnxruntime code paged in.
    return so


class ModelRuntime:
    """A verified bundle loaded into an onnxruntime session."""

    def __init__(self, bundle: Bundle, *, intra_op_threads: int = 1) -> None:
        self.bundle = bundle
        self.manifest: Manifest = bundle.manifest
        self.name = self.manifest.name
        self.version = self.manifest.version
        self.session = ort.InferenceSession(
            bundle.model_bytes, session_options(intra_op_threads), providers=["CPUExecutionProvider"]
        )
        self.validator = RowValidator(self.manifest.inputs)
        out = self.manifest.outputs
        self._label, self._proba, self._value = out.label, out.probabilities, out.value
        self.output_names = [n for n in (out.label, out.probabilities, out.value) if n]
        # Where each output comes in the session's results (None: the model has no such output).
        self._at = tuple(self.output_names.index(n) if n else None for n in (out.label, out.probabilities, out.value))
        self.classes = out.classes
        self._onnx_inputs = [
            (spec.name, _NP[spec.dtype], list(spec.columns)) for spec in self.manifest.onnx_inputs
        ]
        # One float tensor holding every column in order is the common case: feed it directly.
        single = self._onnx_inputs[0] if len(self._onnx_inputs) == 1 else None
        self._local = threading.local()  # per-thread single-row input buffers (`_row_feeds`)
        self._fast = (
            (single[0], single[1])
            if single and single[1] is not object and single[2] == list(range(self.validator.n))
            else None
        )
        # InferenceSession.run re-checks its arguments on every call; the bound C method skips
        # that (~2 µs of a ~15 µs single-row run).
        sess = getattr(self.session, "_sess", None)
        self._run = sess.run if sess is not None else (lambda names, feeds, _opts: self.session.run(names, feeds))

    def feeds(self, rows: list[list[Any]]) -> dict[str, np.ndarray]:
        """ORT feeds for validated rows (values in schema order)."""
        if self._fast is not None:
            if len(rows) == 1:
                return self._row_feeds(rows[0])
            return {self._fast[0]: np.array(rows, dtype=self._fast[1])}
        feeds = {}
        for name, dtype, cols in self._onnx_inputs:
            feeds[name] = np.array([[row[c] for c in cols] for row in rows], dtype=dtype)
        return feeds

    def _row_feeds(self, values: list[Any]) -> dict[str, np.ndarray]:
        """The feeds of one row, in this thread's own [1, n] buffer: allocating a new array costs
        more than the model's run on small models. onnxruntime reads the buffer during `run` only,
        and a thread predicts one request at a time, so the next call may overwrite it."""
        local = self._local
        try:
            buf, feeds = local.row
        except AttributeError:
            buf = np.empty((1, self.validator.n), dtype=self._fast[1])
            feeds = {self._fast[0]: buf}
            local.row = (buf, feeds)
        buf[0] = values
        return feeds

    def run(self, feeds: dict[str, np.ndarray]) -> Output:
        try:
            results = self._run(self.output_names, feeds, None)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise RequestError("runtime_error", f"the model failed on this input: {exc}") from exc
        label, proba, value = self._at
        return Output(
            results[label].tolist() if label is not None else None,
            results[proba].tolist() if proba is not None else None,
            results[value].ravel().tolist() if value is not None else None,
        )

    def agrees(self, a: Any, b: Any) -> bool:
        """Same label, or the same value within the bundle's golden tolerance."""
        if self._label:
            return a == b
        tol = self.manifest.golden_tolerance
        return abs(a - b) <= tol.atol + tol.rtol * abs(b)

    def self_test(self, latency_rows: int = 16, repeats: int = 5, latency_floor_ms: float = 0.0) -> SelfTestResult:
        """Run the golden set within tolerance, and single-row latency within the budget.

        The budget is the bundle's build-time median times its `latency_tolerance`, but never
        below `latency_floor_ms`: a busy device moves a microsecond model by more than any factor.
        """
        bundle = self.bundle
        inputs = bundle.golden_inputs
        expected = bundle.golden_outputs
        if not inputs or not expected:
            return SelfTestResult(False, "the bundle has no golden set", 0.0)
        try:
            names = [n for n in expected if n in {o.name for o in self.session.get_outputs()}]
            actual = dict(zip(names, self.session.run(names, inputs), strict=True))
        except Exception as exc:
            return SelfTestResult(False, f"the model failed on its golden inputs: {exc}", 0.0)
        tol = self.manifest.golden_tolerance
        for name in names:
            got, want = np.asarray(actual[name]), np.asarray(expected[name])
            if got.shape != want.shape:
                return SelfTestResult(False, f"golden output {name!r} has shape {got.shape}, expected {want.shape}", 0.0)
            if want.dtype.kind in "fc":
                if not np.allclose(got, want, atol=tol.atol, rtol=tol.rtol, equal_nan=True):
                    worst = float(np.nanmax(np.abs(got.astype(np.float64) - want)))
                    return SelfTestResult(
                        False, f"golden output {name!r} differs by up to {worst:.3g} (atol {tol.atol}, rtol {tol.rtol})", 0.0
                    )
            elif not np.array_equal(got.astype(str), want.astype(str)):
                bad = int((got.astype(str) != want.astype(str)).sum())
                return SelfTestResult(False, f"golden output {name!r} differs on {bad} of {len(want)} rows", 0.0)
        n = len(next(iter(inputs.values())))
        timings = []
        for _ in range(repeats):
            for i in range(min(n, latency_rows)):
                one = {k: v[i : i + 1] for k, v in inputs.items()}
                t0 = time.perf_counter()
                self._run(self.output_names, one, None)
                timings.append((time.perf_counter() - t0) * 1000.0)
        p50 = median(timings)
        budget = self.manifest.budget
        limit = max(budget.latency_ms_p50 * budget.latency_tolerance, latency_floor_ms)
        if p50 > limit:
            return SelfTestResult(
                False,
                f"median single-row latency {p50:.3f} ms is over the budget {limit:.3f} ms "
                f"({budget.latency_ms_p50} ms x {budget.latency_tolerance}, floor {latency_floor_ms} ms): "
                "this device is too slow for the model; use a smaller model, or raise "
                "update.selftest_latency_floor_ms if the device is only busy",
                p50,
            )
        return SelfTestResult(True, "", p50)
