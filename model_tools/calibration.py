"""Calibration maps for label-free performance estimation: chosen and fitted at conversion,
applied per prediction on devices.

Applying a map is `np.interp` (numpy only: the agent imports this module). Fitting uses
scikit-learn's isotonic regression, imported on first use: an isotonic fit of the labels on
out-of-sample probabilities, read off at score quantiles into a small piecewise-linear table.
The table is kept only where it lowers the expected calibration error on held-out folds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from model_tools.manifest import CalibrationMap

__all__ = [
    "ECE_BINS",
    "FOLDS",
    "KNOTS",
    "MIN_ROWS",
    "apply_calibration",
    "class_index",
    "expected_calibration_error",
    "fit_calibration",
]

FOLDS = 5
REPEATS = 5  # the fold comparison is repeated over this many shuffles and pooled
KNOTS = 33  # table points per mapped column (quantiles of the scores, plus 0 and 1)
ECE_BINS = 10
MIN_ROWS = 100  # fewer labelled rows: a map would mostly fit noise

Source = Literal["cross_validation", "validation"]


def mapped_columns(n_classes: int) -> list[int]:
    """Binary models map the positive column only; multiclass models every column."""
    return [1] if n_classes == 2 else list(range(n_classes))


def apply_calibration(cal: CalibrationMap | None, probs: np.ndarray) -> np.ndarray:
    """Calibrated probabilities for raw ones, `[N, C]` (a copy; the raw matrix is untouched)."""
    p = np.array(probs, dtype=np.float64, ndmin=2)
    if cal is None or not cal.applied:
        return p
    if p.shape[1] == 2 and cal.columns == [1]:
        pos = np.interp(p[:, 1], cal.knots[0], cal.values[0])
        p[:, 1] = pos
        p[:, 0] = 1.0 - pos
        return p
    for col, xs, ys in zip(cal.columns, cal.knots, cal.values, strict=True):
        p[:, col] = np.interp(p[:, col], xs, ys)
    total = p.sum(axis=1, keepdims=True)
    # A row every map sent to 0 keeps its raw probabilities rather than dividing by zero.
    bad = ~(total[:, 0] > 0)
    if bad.any():
        p[bad] = np.asarray(probs, dtype=np.float64)[bad]
        total[bad] = p[bad].sum(axis=1, keepdims=True)
    return p / total


def class_index(labels: Sequence[Any], classes: Sequence[Any]) -> np.ndarray:
    """Column index of each label in `classes` (-1 when it is not one of them)."""
    index: dict[str, int] = {}
    for i, c in enumerate(classes):
        index[_key(c)] = i
    return np.fromiter((index.get(_key(v), -1) for v in labels), dtype=np.int64, count=len(labels))


def _key(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return str(int(v))
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))  # a label 1.0 read from a CSV is class 1
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return str(v.item() if isinstance(v, np.generic) else v)


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, columns: Sequence[int]) -> float:
    """Class-wise ECE: per mapped column, Σ over ten equal-width probability bins of
    |Σ p − Σ 1[y = column]| / N, averaged over the columns."""
    p = np.asarray(probs, dtype=np.float64)
    n = len(p)
    if n == 0:
        return 0.0
    total = 0.0
    for col in columns:
        bins = np.clip(np.ceil(p[:, col] * ECE_BINS).astype(np.int64) - 1, 0, ECE_BINS - 1)
        prob_sum = np.bincount(bins, weights=p[:, col], minlength=ECE_BINS)
        hits = np.bincount(bins, weights=(y == col).astype(np.float64), minlength=ECE_BINS)
        total += float(np.abs(prob_sum - hits).sum()) / n
    return total / len(columns)


def _table(scores: np.ndarray, hits: np.ndarray) -> tuple[list[float], list[float]]:
    """An isotonic fit of hits on scores, read at score quantiles into (knots, values)."""
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
    iso.fit(scores, hits)
    qs = np.quantile(scores, np.linspace(0.0, 1.0, KNOTS - 2))
    knots = np.unique(np.concatenate([[0.0], qs, [1.0]]))
    values = np.maximum.accumulate(np.clip(iso.predict(knots), 0.0, 1.0))
    return [float(x) for x in knots], [float(v) for v in values]


def _fit_map(probs: np.ndarray, y: np.ndarray, columns: list[int]) -> CalibrationMap:
    knots, values = [], []
    for col in columns:
        xs, ys = _table(probs[:, col], (y == col).astype(np.float64))
        knots.append(xs)
        values.append(ys)
    return CalibrationMap(applied=True, method="isotonic", columns=columns, knots=knots, values=values)


def fit_calibration(
    probs: np.ndarray, y: np.ndarray, source: Source, *, folds: int = FOLDS, seed: int = 0
) -> CalibrationMap:
    """Choose and fit the calibration map of out-of-sample probabilities `probs` `[N, C]` with
    true class columns `y` (-1 for labels that are not a class; those rows are left out).

    The table is fitted on all rows, but it is kept only when tables fitted on `folds` − 1 folds
    lower the class-wise ECE of the held-out fold, pooled over the folds and REPEATS shuffles,
    below the raw probabilities' ECE on the same rows.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    keep = y >= 0
    p, y = p[keep], y[keep]
    n, n_classes = p.shape if p.ndim == 2 else (0, 0)
    columns = mapped_columns(n_classes) if n_classes >= 2 else []
    base = dict(source=source, rows=int(n), folds=folds)
    if n < MIN_ROWS or n_classes < 2:
        return CalibrationMap(
            **base, reason=f"{n} labelled rows (< {MIN_ROWS}): raw probabilities are used uncalibrated"
        )
    if len(np.unique(y)) < 2:
        return CalibrationMap(**base, reason="the labelled rows hold one class only: raw probabilities are used")
    rng = np.random.default_rng(seed)
    raw_err = cal_err = 0.0
    # Repeated: one split's comparison is close to a coin flip on already calibrated scores.
    for _ in range(REPEATS):
        order = rng.permutation(n)
        for k in range(folds):
            test = order[k::folds]
            train = np.setdiff1d(order, test, assume_unique=True)
            fold_map = _fit_map(p[train], y[train], columns)
            raw_err += expected_calibration_error(p[test], y[test], columns) * len(test)
            cal_err += expected_calibration_error(apply_calibration(fold_map, p[test]), y[test], columns) * len(test)
    raw_err /= n * REPEATS
    cal_err /= n * REPEATS
    base.update(ece_raw=round(raw_err, 6), ece_calibrated=round(cal_err, 6))
    if not cal_err < raw_err:
        return CalibrationMap(
            **base,
            reason=f"isotonic calibration does not lower the held-out ECE ({cal_err:.4f} vs raw {raw_err:.4f}): "
            "raw probabilities are used",
        )
    fitted = _fit_map(p, y, columns)
    return CalibrationMap(
        **base,
        applied=True,
        method="isotonic",
        columns=columns,
        knots=fitted.knots,
        values=fitted.values,
        reason=f"isotonic calibration lowers the held-out ECE from {raw_err:.4f} to {cal_err:.4f}",
    )
