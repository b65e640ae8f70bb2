"""Parity gate: does an ONNX variant answer like the sklearn estimator on held-out rows?"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from model_tools.errors import ModelToolsError
from model_tools.manifest import OutputSpec, Task
from model_tools.session import run_model


@dataclass(frozen=True)
class ParityThresholds:
    """What a variant must achieve to be shipped.

    Regression has no labels to agree on: a row agrees when the ONNX output is within
    `regression_tolerance` x the standard deviation of sklearn's outputs.
    """

    min_agreement: float = 0.995
    max_accuracy_drop: float = 0.005  # fraction: 0.005 = 0.5 accuracy points
    max_r2_drop: float = 0.005
    regression_tolerance: float = 0.01
    max_abs_diff: float | None = None  # optional cap on the max probability/output difference


@dataclass
class SklearnAnswers:
    """The estimator's answers on the validation rows (the reference for parity)."""

    task: Task
    labels: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    values: np.ndarray | None = None
    y_true: np.ndarray | None = None


@dataclass
class ParityRow:
    """One variant's line in the parity table."""

    variant: str
    bytes: int
    rows: int
    agreement: float
    metric: str | None = None  # "accuracy" or "r2", None without labels
    sklearn_metric: float | None = None
    onnx_metric: float | None = None
    metric_delta: float | None = None  # onnx - sklearn (negative = worse)
    max_abs_diff: float | None = None
    mean_abs_diff: float | None = None
    passed: bool = False
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ParityGateError(ModelToolsError):
    """No variant passed the parity gate; `table` holds every variant's row."""

    def __init__(self, message: str, table: list[ParityRow], text: str = "") -> None:
        super().__init__(message + ("\n" + text if text else ""))
        self.table = table
        self.text = text


def sklearn_answers(
    estimator: Any, X: Any, task: Task, y_true: np.ndarray | None
) -> SklearnAnswers:
    """Ask the estimator for labels, probabilities or values on X."""
    ans = SklearnAnswers(task=task, y_true=y_true)
    if task == "classification":
        ans.labels = np.asarray(estimator.predict(X))
        if hasattr(estimator, "predict_proba"):
            ans.probabilities = np.asarray(estimator.predict_proba(X), dtype=np.float64)
    elif task == "anomaly":
        ans.labels = np.asarray(estimator.predict(X))
        ans.values = np.asarray(estimator.decision_function(X), dtype=np.float64).ravel()
    else:
        ans.values = np.asarray(estimator.predict(X), dtype=np.float64).ravel()
    return ans


def label_keys(values: np.ndarray) -> np.ndarray:
    """Labels as comparable strings (ORT returns int64 where sklearn has bools)."""
    arr = np.asarray(values).ravel()
    if arr.dtype == bool:
        arr = arr.astype(np.int64)
    if arr.dtype.kind == "f" and np.all(arr == np.round(arr)):
        arr = arr.astype(np.int64)
    return arr.astype(str)


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    y = np.asarray(y, dtype=np.float64)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    ss_res = float(((y - pred) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0


def evaluate_variant(
    variant: str,
    model_bytes: bytes,
    outputs: OutputSpec,
    feeds: dict[str, np.ndarray],
    reference: SklearnAnswers,
    thresholds: ParityThresholds,
) -> ParityRow:
    """Run one variant on the validation feeds and compare it with sklearn."""
    got = run_model(model_bytes, feeds)
    task = reference.task
    n = len(next(iter(feeds.values())))
    row = ParityRow(variant=variant, bytes=len(model_bytes), rows=n, agreement=0.0)
    y = reference.y_true
    if task in ("classification", "anomaly"):
        onnx_labels = label_keys(got[outputs.label])
        sk_labels = label_keys(reference.labels)
        row.agreement = float(np.mean(onnx_labels == sk_labels))
        if y is not None and task == "classification":
            y_keys = label_keys(y)
            row.metric = "accuracy"
            row.sklearn_metric = float(np.mean(sk_labels == y_keys))
            row.onnx_metric = float(np.mean(onnx_labels == y_keys))
        diff = None
        if (
            task == "classification"
            and reference.probabilities is not None
            and outputs.probabilities
        ):
            diff = np.abs(
                np.asarray(got[outputs.probabilities], dtype=np.float64) - reference.probabilities
            )
        elif task == "anomaly" and outputs.value:
            diff = np.abs(
                np.asarray(got[outputs.value], dtype=np.float64).ravel() - reference.values
            )
        if diff is not None:
            row.max_abs_diff, row.mean_abs_diff = float(diff.max()), float(diff.mean())
    else:
        pred = np.asarray(got[outputs.value], dtype=np.float64).ravel()
        diff = np.abs(pred - reference.values)
        scale = float(np.std(reference.values)) or max(float(np.abs(reference.values).max()), 1.0)
        row.agreement = float(np.mean(diff <= thresholds.regression_tolerance * scale))
        row.max_abs_diff, row.mean_abs_diff = float(diff.max()), float(diff.mean())
        if y is not None:
            row.metric = "r2"
            row.sklearn_metric = _r2(y, reference.values)
            row.onnx_metric = _r2(y, pred)
    if row.metric is not None:
        row.metric_delta = row.onnx_metric - row.sklearn_metric
    _judge(row, thresholds)
    return row


# Float slack so that a drop of exactly the threshold (e.g. 1 row in 200) passes.
_EPS = 1e-9


def _judge(row: ParityRow, t: ParityThresholds) -> None:
    if row.agreement < t.min_agreement - _EPS:
        row.failures.append(f"agreement {row.agreement:.2%} < {t.min_agreement:.2%}")
    if row.metric == "accuracy" and row.metric_delta < -t.max_accuracy_drop - _EPS:
        row.failures.append(
            f"accuracy drop {-row.metric_delta * 100:.2f} points > {t.max_accuracy_drop * 100:.2f}"
        )
    if row.metric == "r2" and row.metric_delta < -t.max_r2_drop - _EPS:
        row.failures.append(f"R² drop {-row.metric_delta:.4f} > {t.max_r2_drop:.4f}")
    if (
        t.max_abs_diff is not None
        and row.max_abs_diff is not None
        and row.max_abs_diff > t.max_abs_diff
    ):
        row.failures.append(f"max abs diff {row.max_abs_diff:.3g} > {t.max_abs_diff:.3g}")
    row.passed = not row.failures


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_parity_table(rows: list[ParityRow], chosen: str | None = None, reason: str = "") -> str:
    """The parity table as aligned text, for terminals and error messages."""
    header = [
        "variant",
        "bytes",
        "agreement",
        "metric",
        "delta",
        "max|diff|",
        "mean|diff|",
        "result",
    ]
    lines = [header]
    for r in rows:
        delta = None
        if r.metric_delta is not None:
            delta = r.metric_delta * (100 if r.metric == "accuracy" else 1)
        lines.append(
            [
                r.variant + (" *" if r.variant == chosen else ""),
                str(r.bytes),
                f"{r.agreement:.2%}",
                r.metric or "-",
                (_fmt(delta, "+.2f") + " pt" if r.metric == "accuracy" else _fmt(delta, "+.4f")),
                _fmt(r.max_abs_diff, ".2e"),
                _fmt(r.mean_abs_diff, ".2e"),
                "pass" if r.passed else "FAIL: " + "; ".join(r.failures),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    out = [
        "  ".join(cell.ljust(w) for cell, w in zip(line[:-1], widths, strict=False))
        + "  "
        + line[-1]
        for line in lines
    ]
    if chosen:
        out.append(f"chosen: {chosen} ({reason})" if reason else f"chosen: {chosen}")
    return "\n".join(out)
