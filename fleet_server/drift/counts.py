"""Count vectors and their merging: devices count into the bundle's reference bins, so adding
their counts is exact (int64). Layout: the profile's bins in order, then the NaN bin last."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from edge_agent.protocol import FeatureCounts


class DriftInputError(ValueError):
    """Counts that do not fit the reference (wrong bin count, negative counts, ...)."""


def counts_vector(counts: FeatureCounts | Sequence[int] | np.ndarray) -> np.ndarray:
    """One window's counts as an int64 vector: `[*bins, nan]` for a FeatureCounts, else as given."""
    if isinstance(counts, FeatureCounts):
        vec = np.asarray([*counts.bins, counts.nan], dtype=np.int64)
    else:
        vec = np.asarray(counts)
        if vec.dtype.kind not in "iub" and vec.size and not np.all(np.mod(vec, 1) == 0):
            raise DriftInputError("counts must be whole numbers")
        vec = vec.astype(np.int64)
    if vec.ndim != 1:
        raise DriftInputError(f"a count vector must be 1-D, got shape {vec.shape}")
    if (vec < 0).any():
        raise DriftInputError("counts must not be negative")
    return vec


def merge_counts(
    items: Iterable[FeatureCounts | Sequence[int] | np.ndarray], *, size: int | None = None
) -> np.ndarray:
    """Add count vectors from any number of devices and windows; exact, int64.

    A FeatureCounts contributes `[*bins, nan]`. `size` gives the length of the result when
    `items` may be empty (no window arrived); otherwise an empty input is an error.
    """
    total: np.ndarray | None = None if size is None else np.zeros(size, dtype=np.int64)
    for item in items:
        vec = counts_vector(item)
        if total is None:
            total = vec.copy()
            continue
        if vec.shape != total.shape:
            raise DriftInputError(
                f"counts have {vec.size} bins where others have {total.size}: they were "
                "counted against different reference profiles; merge per model version"
            )
        total += vec
    if total is None:
        raise DriftInputError("nothing to merge: pass size= to get zeros for an empty input")
    return total


def merge_count_matrix(matrix: np.ndarray) -> np.ndarray:
    """Vectorised merge: a (windows x bins) array of counts summed over windows, int64."""
    arr = np.asarray(matrix)
    if arr.ndim != 2:
        raise DriftInputError(f"expected a (windows x bins) array, got shape {arr.shape}")
    if arr.size and arr.min() < 0:
        raise DriftInputError("counts must not be negative")
    return arr.astype(np.int64, copy=False).sum(axis=0)


def sum_by_group(
    matrix: np.ndarray, groups: Sequence[object] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Roll (windows x bins) counts up to groups (devices, tags, buckets) in one pass.

    Returns `(keys, sums)`: the sorted unique group keys and a (groups x bins) int64 array.
    """
    arr = np.asarray(matrix).astype(np.int64, copy=False)
    keys, inverse = np.unique(np.asarray(groups), return_inverse=True)
    if arr.ndim != 2 or arr.shape[0] != inverse.size:
        raise DriftInputError(f"need one group per row: {arr.shape} rows vs {inverse.size} groups")
    if arr.shape[0] == 0:
        return keys, np.zeros((0, arr.shape[1]), dtype=np.int64)
    order = np.argsort(inverse, kind="stable")
    sorted_inverse = inverse[order]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(sorted_inverse)) + 1])
    return keys, np.add.reduceat(arr[order], starts, axis=0)


def merge_feature_counts(items: Iterable[FeatureCounts]) -> FeatureCounts:
    """Add whole FeatureCounts (bins, NaN, out-of-range and unseen counters)."""
    items = list(items)
    if not items:
        raise DriftInputError("nothing to merge")
    bins = merge_counts([np.asarray(fc.bins, dtype=np.int64) for fc in items])
    return FeatureCounts(
        bins=[int(c) for c in bins],
        nan=sum(fc.nan for fc in items),
        below_min=sum(fc.below_min for fc in items),
        above_max=sum(fc.above_max for fc in items),
        unseen=sum(fc.unseen for fc in items),
    )
