"""Distances between a reference and a current count vector: PSI, Jensen-Shannon, binned KS and
Wasserstein, chi-square. Each broadcasts over leading axes (many devices or buckets in one call)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fleet_server.drift.counts import DriftInputError

# A share of exactly zero makes ln(q/p) infinite; PSI practice (and DESIGN) replaces it by a
# small constant. Shares are not renormalised afterwards: the correction is at most k * 1e-4.
EMPTY_SHARE = 1e-4


def _float_counts(counts: np.ndarray | Sequence[float]) -> np.ndarray:
    arr = np.asarray(counts, dtype=np.float64)
    if arr.ndim == 0:
        raise DriftInputError("counts must have at least one bin")
    return arr


def _shares(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shares along the last axis and the totals; an empty distribution has NaN shares."""
    total = counts.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = counts / total[..., None]
    return shares, total


def scalar_or_array(x: np.ndarray) -> float | np.ndarray:
    """A 0-d result as a float, anything else as the array (the metrics broadcast)."""
    return float(x) if np.ndim(x) == 0 else x


def psi(ref: np.ndarray | Sequence[float], cur: np.ndarray | Sequence[float]) -> float | np.ndarray:
    """Population stability index: sum over bins of (q - p) * ln(q / p).

    `ref` and `cur` are counts over the same bins (NaN bin included). A zero share on either
    side is replaced by EMPTY_SHARE before the sum. NaN when either side has no rows.
    """
    p, _ = _shares(_float_counts(ref))
    q, _ = _shares(_float_counts(cur))
    p = np.where(p == 0, EMPTY_SHARE, p)
    q = np.where(q == 0, EMPTY_SHARE, q)
    return scalar_or_array(np.sum((q - p) * np.log(q / p), axis=-1))


def js_distance(
    counts_a: np.ndarray | Sequence[float], counts_b: np.ndarray | Sequence[float]
) -> float | np.ndarray:
    """Jensen-Shannon distance, base 2: sqrt of the divergence, in [0, 1].

    Works for any two count vectors over the same bins (features, predictions, cohorts).
    Empty bins need no correction (0 * log 0 = 0). NaN when either side has no rows.
    """
    p, tp = _shares(_float_counts(counts_a))
    q, tq = _shares(_float_counts(counts_b))
    m = (p + q) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        kl_p = np.where(p > 0, p * np.log2(p / m), 0.0).sum(axis=-1)
        kl_q = np.where(q > 0, q * np.log2(q / m), 0.0).sum(axis=-1)
    divergence = np.clip(0.5 * kl_p + 0.5 * kl_q, 0.0, 1.0)
    out = np.where((tp > 0) & (tq > 0), np.sqrt(divergence), np.nan)
    return scalar_or_array(out)


def ks_binned(
    ref: np.ndarray | Sequence[float], cur: np.ndarray | Sequence[float]
) -> float | np.ndarray:
    """Kolmogorov-Smirnov statistic on the binned CDFs: max |F_ref - F_cur| at the bin edges.

    Pass the non-NaN bins only; each side is normalised over its non-NaN rows. With right-closed
    bins the CDFs at the edges are exact, so this is a lower bound of the raw-data statistic,
    short of it by at most one bin's share.
    """
    p, tp = _shares(_float_counts(ref))
    q, tq = _shares(_float_counts(cur))
    diff = np.abs(np.cumsum(p, axis=-1) - np.cumsum(q, axis=-1)).max(axis=-1)
    return scalar_or_array(np.where((tp > 0) & (tq > 0), diff, np.nan))


def bin_positions(
    edges: Sequence[float], ref_min: float | None = None, ref_max: float | None = None
) -> np.ndarray:
    """A representative position per numeric bin: its midpoint.

    The outer bins are open-ended; the reference's min and max close them, so the first bin is
    [ref_min, e1] and the last (ek, ref_max]. Without a min/max the outer bins sit on their edge.
    """
    e = np.asarray(edges, dtype=np.float64)
    if e.size == 0:
        lo = ref_min if ref_min is not None else (ref_max if ref_max is not None else 0.0)
        return np.array([float(lo)])
    # min(): an inconsistent profile (min above the first edge) must not reverse the order.
    lo = min(float(ref_min), e[0]) if ref_min is not None else e[0]
    hi = max(float(ref_max), e[-1]) if ref_max is not None else e[-1]
    closed = np.concatenate([[lo], e, [hi]])
    return (closed[:-1] + closed[1:]) / 2


def wasserstein_binned(
    ref: np.ndarray | Sequence[float],
    cur: np.ndarray | Sequence[float],
    positions: np.ndarray | Sequence[float],
    scale: float | None = None,
) -> float | np.ndarray:
    """Wasserstein-1 distance between the binned distributions, divided by `scale`.

    Each bin's mass sits at its representative position (`bin_positions`), so W1 is
    sum_i |F_ref(i) - F_cur(i)| * (x_{i+1} - x_i) over the non-NaN bins. Normed by the
    reference std it reads as "how many standard deviations did the mass move".
    NaN when a side is empty or the scale is missing or zero.
    """
    x = np.asarray(positions, dtype=np.float64)
    p, tp = _shares(_float_counts(ref))
    q, tq = _shares(_float_counts(cur))
    if p.shape[-1] != x.size:
        raise DriftInputError(f"{p.shape[-1]} bins but {x.size} positions")
    cdf_gap = np.abs(np.cumsum(p, axis=-1) - np.cumsum(q, axis=-1))[..., :-1]
    w1 = (cdf_gap * np.diff(x)).sum(axis=-1)
    if scale is None or not math.isfinite(scale) or scale <= 0:
        w1 = np.full_like(w1, np.nan)
    else:
        w1 = w1 / scale
    return scalar_or_array(np.where((tp > 0) & (tq > 0), w1, np.nan))


def occupied_bins(
    ref: np.ndarray | Sequence[float], cur: np.ndarray | Sequence[float]
) -> int | np.ndarray:
    """k for the noise level and chi-square: bins non-empty on at least one side.

    A bin empty on both sides carries no information (and no degree of freedom).
    """
    k = ((_float_counts(ref) + _float_counts(cur)) > 0).sum(axis=-1)
    return int(k) if np.ndim(k) == 0 else k


def chi2_statistic(
    ref: np.ndarray | Sequence[float], cur: np.ndarray | Sequence[float]
) -> tuple[float | np.ndarray, int | np.ndarray]:
    """Pearson chi-square of the 2 x k table (reference, current) x bins, and its df.

    Bins empty on both sides are left out (df = occupied bins - 1), as
    `scipy.stats.chi2_contingency` requires; no continuity correction.
    """
    r = _float_counts(ref)
    c = _float_counts(cur)
    r, c = np.broadcast_arrays(r, c)
    col = r + c
    n_r = r.sum(axis=-1, keepdims=True)
    n_c = c.sum(axis=-1, keepdims=True)
    n = n_r + n_c
    with np.errstate(invalid="ignore", divide="ignore"):
        e_r = col * n_r / n
        e_c = col * n_c / n
        terms = np.where(col > 0, (r - e_r) ** 2 / e_r + (c - e_c) ** 2 / e_c, 0.0)
    stat = terms.sum(axis=-1)
    stat = np.where((n_r[..., 0] > 0) & (n_c[..., 0] > 0), stat, np.nan)
    df = np.maximum((col > 0).sum(axis=-1) - 1, 0)
    return scalar_or_array(stat), (int(df) if np.ndim(df) == 0 else df)
