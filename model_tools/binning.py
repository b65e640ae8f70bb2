"""The binning convention every part shares (DESIGN section 5), numpy only.

Numeric bins are right-closed: (-inf, e1], (e1, e2], ..., (ek, +inf), i.e.
`np.searchsorted(edges, x, side="left")`, as `pandas.cut` does. NaN has its own bin.
Categorical values fall into their category's bin or the trailing "other" bin.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from model_tools.manifest import BinnedDistribution

DEFAULT_BINS = 10


def quantile_edges(values: np.ndarray, bins: int = DEFAULT_BINS) -> list[float]:
    """Edges at the reference's inner quantiles, duplicates merged (discrete data: fewer bins)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return []
    qs = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    return [float(e) for e in np.unique(np.quantile(values, qs))]


def count_numeric(
    values: np.ndarray,
    edges: Sequence[float],
    vmin: float | None = None,
    vmax: float | None = None,
) -> BinnedDistribution:
    """Count numeric values into the fixed bins given by `edges`."""
    values = np.asarray(values, dtype=np.float64)
    nan_mask = np.isnan(values)
    finite = values[~nan_mask]
    idx = np.searchsorted(np.asarray(edges, dtype=np.float64), finite, side="left")
    counts = np.bincount(idx, minlength=len(edges) + 1)
    return BinnedDistribution(
        edges=[float(e) for e in edges],
        counts=[int(c) for c in counts],
        nan=int(nan_mask.sum()),
        below_min=int((finite < vmin).sum()) if vmin is not None else 0,
        above_max=int((finite > vmax).sum()) if vmax is not None else 0,
    )


def count_categorical(values: Sequence[object], categories: Sequence[str]) -> BinnedDistribution:
    """Count values by category; unknown ones go to the trailing "other" bin, None/NaN to nan."""
    index = {c: i for i, c in enumerate(categories)}
    counts = [0] * (len(categories) + 1)
    nan = 0
    for value in values:
        if value is None or (isinstance(value, float) and value != value):
            nan += 1
            continue
        counts[index.get(str(value), len(categories))] += 1
    return BinnedDistribution(categories=list(categories), counts=counts, nan=nan)


def shares(dist: BinnedDistribution, include_nan: bool = True) -> np.ndarray:
    """The distribution as fractions over all its bins (NaN bin last when included)."""
    counts = np.asarray(dist.counts + ([dist.nan] if include_nan else []), dtype=np.float64)
    total = counts.sum()
    return counts / total if total > 0 else counts
