"""Latency percentiles from a merged latency histogram (the protocol's fixed edges)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edge_agent.protocol import LATENCY_EDGES_MS
from fleet_server.drift.counts import DriftInputError


def latency_percentile(
    hist_counts: Sequence[int] | np.ndarray,
    edges: Sequence[float] = LATENCY_EDGES_MS,
    q: float = 0.95,
) -> float | None:
    """The q-quantile (a fraction: 0.95 for p95) of a merged latency histogram.

    Bins are right-closed: [0, e1], (e1, e2], ..., (ek, +inf), the first closed at 0 because a
    latency is never negative. Inside a bin the rows are taken as spread evenly, so the value
    is interpolated linearly between the bin's bounds. The last bin has no upper bound: a
    quantile that lands there is reported as its lower edge (a lower bound, as Prometheus'
    histogram_quantile does). None for an empty histogram.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q is a fraction in [0, 1] (0.95 for p95), got {q}")
    counts = np.asarray(hist_counts, dtype=np.float64)
    bounds = np.concatenate([[0.0], np.asarray(edges, dtype=np.float64)])
    if counts.ndim != 1 or counts.size != bounds.size:
        raise DriftInputError(
            f"{counts.size} histogram bins for {len(edges)} edges (need edges + 1)"
        )
    if (counts < 0).any():
        raise DriftInputError("histogram counts must not be negative")
    total = counts.sum()
    if total <= 0:
        return None
    rank = q * total
    cum = np.cumsum(counts)
    # The first bin whose cumulative count reaches the rank; rank 0 lands in the first
    # non-empty bin, so q=0 is that bin's lower bound.
    i = int(np.searchsorted(cum, rank, side="left")) if rank > 0 else int(np.argmax(counts > 0))
    if i >= counts.size - 1:
        return float(bounds[-1])
    before = cum[i] - counts[i]
    frac = (rank - before) / counts[i]
    return float(bounds[i] + (bounds[i + 1] - bounds[i]) * frac)
