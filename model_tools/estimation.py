"""Inputs for label-free performance estimation (CBPE): the calibration map and, for binary
models, the raw-score histogram edges devices count into.

Out-of-sample probabilities come from cross-validation of the user's estimator on labelled
training data (`out_of_fold_probabilities`), else from the shipped model on labelled validation
data that was held out from training. Without labels the raw probabilities are used as they
are, and the manifest says so.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from model_tools.binning import quantile_edges
from model_tools.calibration import FOLDS, apply_calibration, class_index
from model_tools.manifest import CalibrationMap, PerformanceEstimation

__all__ = ["MAX_ESTIMATED_CLASSES", "SCORE_BINS", "build_estimation", "out_of_fold_probabilities"]

SCORE_BINS = 20  # raw-score histogram of binary models: the estimated ROC curve's resolution
# The expected confusion matrix has classes² sums in every telemetry window (about 20 bytes
# each): past this many classes it would crowd the window's 256 KiB.
MAX_ESTIMATED_CLASSES = 32


def out_of_fold_probabilities(
    estimator: Any, X: Any, y: np.ndarray, classes: list[Any], *, folds: int = FOLDS, seed: int = 0
) -> np.ndarray:
    """predict_proba of each training row by a clone of `estimator` fitted on the other folds,
    columns in `classes` order. Raises ValueError when that is not possible (a class too rare
    for stratified folds, labels that are not the model's classes)."""
    from sklearn.base import clone
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    found = np.unique(np.asarray(y))
    idx = class_index(list(found), classes)
    if len(found) != len(classes) or not np.array_equal(np.sort(idx), np.arange(len(classes))):
        raise ValueError(
            f"the training labels hold classes {list(found)[:10]}, the model knows {list(classes)[:10]}"
        )
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    probs = cross_val_predict(clone(estimator), X, y, cv=cv, method="predict_proba")
    # cross_val_predict orders columns by the sorted training labels, like classes_.
    out = np.empty_like(probs, dtype=np.float64)
    out[:, idx] = probs
    return out


def build_estimation(
    calibration: CalibrationMap,
    classes: list[Any],
    reference_probs: np.ndarray,
    reference_labels: Any,
) -> PerformanceEstimation:
    """The manifest's `estimation`: the map, the expected accuracy on the reference data, and
    (binary models) the raw positive-probability edges at SCORE_BINS reference quantiles."""
    raw = np.asarray(reference_probs, dtype=np.float64)
    pred = class_index(list(np.asarray(reference_labels).ravel()), classes)
    cal = apply_calibration(calibration, raw)
    ok = pred >= 0
    expected = float(cal[np.flatnonzero(ok), pred[ok]].mean()) if ok.any() else None
    binary = len(classes) == 2
    return PerformanceEstimation(
        calibration=calibration,
        positive=1 if binary else None,
        score_edges=quantile_edges(raw[:, 1], SCORE_BINS) if binary and len(raw) else None,
        reference_rows=len(raw),
        reference_accuracy=expected,
    )
