"""Reference profile: fixed bins of every feature and of the prediction (DESIGN sections 2, 5)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from model_tools.binning import DEFAULT_BINS, count_categorical, count_numeric, quantile_edges
from model_tools.manifest import FeatureProfile, FeatureSpec, ReferenceProfile, Task

TOP_CATEGORIES = 20
MIN_REFERENCE_ROWS = 1000
MIN_ROWS_PER_BIN = 50


def _columns(reference_rows: Any, n_features: int) -> list[np.ndarray]:
    if (
        isinstance(reference_rows, (list, tuple))
        and reference_rows
        and isinstance(reference_rows[0], np.ndarray)
        and len(reference_rows) == n_features
        and reference_rows[0].ndim == 1
    ):
        return list(reference_rows)  # already one array per feature
    arr = np.asarray(reference_rows, dtype=object)
    if arr.ndim != 2 or arr.shape[1] != n_features:
        raise ValueError(f"reference rows must be [N, {n_features}], got shape {arr.shape}")
    return [arr[:, i] for i in range(n_features)]


def _top_categories(values: Sequence[Any], limit: int = TOP_CATEGORIES) -> list[str]:
    counts = Counter(
        str(v) for v in values if v is not None and not (isinstance(v, float) and v != v)
    )
    # Most frequent first; ties by name so the profile is reproducible.
    return [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]]


def build_profile(
    feature_specs: Sequence[FeatureSpec],
    reference_rows: Any,
    predictions: Any,
    task: Task,
    classes: Sequence[Any] | None = None,
    *,
    bins: int = DEFAULT_BINS,
) -> ReferenceProfile:
    """Bin the reference data and the model's predictions on it.

    `reference_rows` is [N, n_features] (or a list of per-feature arrays); `predictions` are
    labels for classification, values (or anomaly scores) otherwise.
    """
    columns = _columns(reference_rows, len(feature_specs))
    n = len(columns[0]) if columns else 0
    features = []
    max_bins = 1
    for spec, col in zip(feature_specs, columns, strict=True):
        if spec.kind == "numeric":
            values = np.asarray(col, dtype=np.float64)
            edges = quantile_edges(values, bins)
            dist = count_numeric(values, edges, spec.min, spec.max)
            finite = values[~np.isnan(values)]
            max_bins = max(max_bins, len(edges) + 1)
            features.append(
                FeatureProfile(
                    name=spec.name,
                    kind="numeric",
                    distribution=dist,
                    min=float(finite.min()) if finite.size else None,
                    max=float(finite.max()) if finite.size else None,
                    mean=float(finite.mean()) if finite.size else None,
                    std=float(finite.std()) if finite.size else None,
                )
            )
        else:
            cats = _top_categories(col)
            max_bins = max(max_bins, len(cats) + 1)
            features.append(
                FeatureProfile(
                    name=spec.name, kind="categorical", distribution=count_categorical(col, cats)
                )
            )
    preds = np.asarray(predictions).ravel()
    if task == "classification":
        labels = [str(c) for c in (classes if classes is not None else _top_categories(preds))]
        key = preds.astype(np.int64) if preds.dtype == bool else preds
        prediction = count_categorical([str(v) for v in key], labels)
    else:
        values = preds.astype(np.float64)
        prediction = count_numeric(values, quantile_edges(values, bins))
    warnings = []
    if n < MIN_REFERENCE_ROWS:
        warnings.append(
            f"reference has {n} rows (< {MIN_REFERENCE_ROWS}): drift statistics will be noisy; "
            "pass more reference data (--reference)"
        )
    if n and n / max_bins < MIN_ROWS_PER_BIN:
        warnings.append(
            f"reference has about {n / max_bins:.0f} rows per bin (< {MIN_ROWS_PER_BIN}) for its "
            f"widest feature ({max_bins} bins): bin shares are uncertain; pass more reference data"
        )
    return ReferenceProfile(rows=n, features=features, prediction=prediction, warnings=warnings)
