"""Drift mathematics over fixed reference bins (DESIGN section 5), numpy only.

Devices count into the bundle's reference bins, so merging is exact addition; every metric here
is computed from merged counts. See docs/drift.md for the formulas and how to read them.

Count-vector layout used throughout: the profile's bins in order, then the NaN bin last (the
same order as `model_tools.binning.shares`). Metric functions broadcast over leading axes, so
one call can score many devices or buckets against one reference.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from statistics import NormalDist
from typing import Literal

import numpy as np

from edge_agent.protocol import LATENCY_EDGES_MS, FeatureCounts
from model_tools.manifest import BinnedDistribution, ReferenceProfile

__all__ = [
    "EMPTY_SHARE",
    "NOISE_QUANTILE",
    "DriftInputError",
    "DriftReport",
    "FeatureDrift",
    "bin_positions",
    "chi2_cdf",
    "chi2_ppf",
    "chi2_sf",
    "chi2_statistic",
    "counts_vector",
    "drift_report",
    "feature_drift",
    "js_distance",
    "ks_binned",
    "latency_percentile",
    "merge_count_matrix",
    "merge_counts",
    "merge_feature_counts",
    "occupied_bins",
    "psi",
    "psi_noise_level",
    "sum_by_group",
    "wasserstein_binned",
]

# A share of exactly zero makes ln(q/p) infinite; PSI practice (and DESIGN) replaces it by a
# small constant. Shares are not renormalised afterwards: the correction is at most k * 1e-4.
EMPTY_SHARE = 1e-4
# Quantile of the no-drift PSI distribution a statistic must exceed to count as drift.
NOISE_QUANTILE = 0.99

Kind = Literal["numeric", "categorical"]


class DriftInputError(ValueError):
    """Counts that do not fit the reference (wrong bin count, negative counts, ...)."""


# ---------------------------------------------------------------- merging


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


# ---------------------------------------------------------------- metrics


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


def _result(x: np.ndarray) -> float | np.ndarray:
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
    return _result(np.sum((q - p) * np.log(q / p), axis=-1))


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
    return _result(out)


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
    return _result(np.where((tp > 0) & (tq > 0), diff, np.nan))


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
    return _result(np.where((tp > 0) & (tq > 0), w1, np.nan))


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
    return _result(stat), (int(df) if np.ndim(df) == 0 else df)


# ---------------------------------------------------------------- chi-square distribution

_EPS = 1e-16
_MAX_ITER = 10_000


def _log_prefactor(a: float, x: float) -> float:
    return -x + a * math.log(x) - math.lgamma(a)


def _gamma_p_series(a: float, x: float) -> float:
    """Regularized lower incomplete gamma P(a, x) by its power series (good for x < a + 1)."""
    term = 1.0 / a
    total = term
    ap = a
    for _ in range(_MAX_ITER):
        ap += 1.0
        term *= x / ap
        total += term
        if abs(term) < abs(total) * _EPS:
            break
    return total * math.exp(_log_prefactor(a, x))


def _gamma_q_continued_fraction(a: float, x: float) -> float:
    """Regularized upper incomplete gamma Q(a, x) by modified Lentz (good for x >= a + 1)."""
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, _MAX_ITER):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        if abs(d) < tiny:
            d = tiny
        c = b + an / c
        if abs(c) < tiny:
            c = tiny
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _EPS:
            break
    return math.exp(_log_prefactor(a, x)) * h


def _check_df(df: float) -> None:
    if not df > 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")


def chi2_sf(x: float, df: float) -> float:
    """Survival function P(X > x) of the chi-square distribution (no scipy needed)."""
    _check_df(df)
    if math.isnan(x):
        return math.nan
    if x <= 0:
        return 1.0
    if math.isinf(x):
        return 0.0
    a, h = df / 2.0, x / 2.0
    if h < a + 1.0:
        return max(0.0, 1.0 - _gamma_p_series(a, h))
    return _gamma_q_continued_fraction(a, h)


def chi2_cdf(x: float, df: float) -> float:
    """P(X <= x) of the chi-square distribution."""
    _check_df(df)
    if math.isnan(x):
        return math.nan
    if x <= 0:
        return 0.0
    if math.isinf(x):
        return 1.0
    a, h = df / 2.0, x / 2.0
    if h < a + 1.0:
        return _gamma_p_series(a, h)
    return 1.0 - _gamma_q_continued_fraction(a, h)


def _chi2_pdf(x: float, df: float) -> float:
    a = df / 2.0
    return math.exp((a - 1.0) * math.log(x) - x / 2.0 - a * math.log(2.0) - math.lgamma(a))


@lru_cache(maxsize=4096)
def chi2_ppf(q: float, df: float) -> float:
    """Quantile of the chi-square distribution: x with P(X <= x) = q.

    Wilson-Hilferty gives the start; Newton steps on the exact CDF refine it, falling back to
    bisection whenever a step would leave the bracket known to hold the root.
    """
    _check_df(df)
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    if q == 0.0:
        return 0.0
    if q == 1.0:
        return math.inf
    z = NormalDist().inv_cdf(q)
    h = 2.0 / (9.0 * df)
    x = df * max(1.0 - h + z * math.sqrt(h), 0.05) ** 3
    upper_tail = q > 0.5  # solve on the sf there: 1 - cdf loses digits near 1
    lo, hi = 0.0, math.inf
    for _ in range(200):
        f = (1.0 - q) - chi2_sf(x, df) if upper_tail else chi2_cdf(x, df) - q
        if f < 0:
            lo = x
        elif f > 0:
            hi = x
        else:
            return x
        pdf = _chi2_pdf(x, df)
        new = x - f / pdf if pdf > 0 else math.nan
        if not (lo < new < hi):
            new = (lo + hi) / 2.0 if math.isfinite(hi) else max(2.0 * x, 1e-300)
        if abs(new - x) <= 1e-14 * max(1.0, x):
            return new
        x = new
    return x


def psi_noise_level(
    k: int | np.ndarray,
    n_ref: float | np.ndarray,
    n_cur: float | np.ndarray,
    quantile: float = NOISE_QUANTILE,
) -> float | np.ndarray:
    """The PSI that two samples of sizes n_ref and n_cur from one distribution exceed with
    probability 1 - quantile.

    Under no drift PSI * n_ref * n_cur / (n_ref + n_cur) is approximately chi-square with k - 1
    degrees of freedom, so the level is chi2.ppf(quantile, k - 1) * (1/n_ref + 1/n_cur).
    Infinite when a side is empty (nothing can be told from no rows).
    """
    k_arr = np.maximum(np.asarray(k, dtype=np.int64) - 1, 1)
    ppf = np.vectorize(lambda df: chi2_ppf(quantile, int(df)), otypes=[np.float64])(k_arr)
    n_r = np.asarray(n_ref, dtype=np.float64)
    n_c = np.asarray(n_cur, dtype=np.float64)
    with np.errstate(divide="ignore"):
        level = ppf * (1.0 / n_r + 1.0 / n_c)
    level = np.where((n_r > 0) & (n_c > 0), level, np.inf)
    return _result(level)


# ---------------------------------------------------------------- per feature, per report


def _clean(value: float | None) -> float | None:
    """JSON has no NaN/inf: not-computable values travel as null."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


@dataclass(frozen=True, slots=True)
class FeatureDrift:
    """Drift of one feature (or of the prediction) between the reference and current counts.

    `ks` and `wasserstein` are None for categorical data (categories have no order) and
    `wasserstein` also when the reference std is unknown or zero. `k` is the number of
    occupied bins, NaN bin included; `noise_psi` the no-drift PSI level for these sample sizes.
    """

    kind: Kind
    psi: float
    js: float
    ks: float | None
    wasserstein: float | None
    chi2: float
    chi2_p: float
    n_ref: int
    n_cur: int
    nan_ref: int
    nan_cur: int
    noise_psi: float
    k: int

    def passes(self, threshold: float) -> bool:
        """True when PSI reaches `threshold` and exceeds the sampling-noise level."""
        return math.isfinite(self.psi) and self.psi >= threshold and self.psi > self.noise_psi

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for key, value in asdict(self).items():
            out[key] = _clean(value) if isinstance(value, float) else value
        return out


def feature_drift(
    reference: BinnedDistribution,
    current_counts: np.ndarray | Sequence[int],
    current_nan: int,
    *,
    kind: Kind | None = None,
    ref_min: float | None = None,
    ref_max: float | None = None,
    ref_std: float | None = None,
    noise_quantile: float = NOISE_QUANTILE,
) -> FeatureDrift:
    """All metrics for one feature: reference profile bins vs merged current bins.

    `current_counts` aligns with `reference.counts`; `current_nan` is the current NaN count.
    `kind` defaults to numeric when the reference has edges, else categorical.
    """
    ref_bins = np.asarray(reference.counts, dtype=np.int64)
    cur_bins = counts_vector(current_counts)
    if cur_bins.size != ref_bins.size:
        raise DriftInputError(
            f"current counts have {cur_bins.size} bins, the reference has {ref_bins.size}: "
            "they must be counted against this reference profile's bins"
        )
    if current_nan < 0:
        raise DriftInputError("current_nan must not be negative")
    if kind is None:
        kind = "numeric" if reference.edges is not None else "categorical"
    ref_all = np.append(ref_bins, reference.nan)
    cur_all = np.append(cur_bins, int(current_nan))
    n_ref, n_cur = int(ref_all.sum()), int(cur_all.sum())
    k = occupied_bins(ref_all, cur_all)

    ks: float | None = None
    wasserstein: float | None = None
    if kind == "numeric":
        ks = ks_binned(ref_bins, cur_bins)
        if reference.edges is not None:
            positions = bin_positions(reference.edges, ref_min, ref_max)
            wasserstein = _clean(wasserstein_binned(ref_bins, cur_bins, positions, ref_std))

    stat, df = chi2_statistic(ref_all, cur_all)
    # df 0: every row in one bin on both sides, nothing differs.
    p_value = math.nan if math.isnan(stat) else (chi2_sf(stat, df) if df > 0 else 1.0)
    return FeatureDrift(
        kind=kind,
        psi=psi(ref_all, cur_all),
        js=js_distance(ref_all, cur_all),
        ks=ks,
        wasserstein=wasserstein,
        chi2=stat,
        chi2_p=p_value,
        n_ref=n_ref,
        n_cur=n_cur,
        nan_ref=int(reference.nan),
        nan_cur=int(current_nan),
        noise_psi=psi_noise_level(k, n_ref, n_cur, noise_quantile),
        k=k,
    )


@dataclass(frozen=True, slots=True)
class DriftReport:
    """Drift of every feature (by name, in input order) and of the prediction."""

    features: dict[str, FeatureDrift] = field(default_factory=dict)
    prediction: FeatureDrift | None = None

    def to_dict(self) -> dict[str, object]:
        """JSON-ready: non-finite numbers become null."""
        return {
            "features": {name: fd.to_dict() for name, fd in self.features.items()},
            "prediction": self.prediction.to_dict() if self.prediction else None,
        }


CurrentCounts = tuple[Sequence[int] | np.ndarray, int] | FeatureCounts


def _split(counts: CurrentCounts) -> tuple[np.ndarray, int]:
    if isinstance(counts, FeatureCounts):
        return np.asarray(counts.bins, dtype=np.int64), counts.nan
    bins, nan = counts
    return np.asarray(bins), int(nan)


def drift_report(
    profile: ReferenceProfile,
    feature_counts: Sequence[CurrentCounts],
    prediction_counts: CurrentCounts | None = None,
    *,
    noise_quantile: float = NOISE_QUANTILE,
) -> DriftReport:
    """Drift for every feature of `profile` and for its prediction.

    `feature_counts` aligns with `profile.features`; each item is `(bins, nan)` or a merged
    FeatureCounts. The prediction's Wasserstein is left out: the profile has no std for it.
    """
    if len(feature_counts) != len(profile.features):
        raise DriftInputError(
            f"{len(feature_counts)} feature counts for {len(profile.features)} profile features"
        )
    features: dict[str, FeatureDrift] = {}
    for fp, counts in zip(profile.features, feature_counts, strict=True):
        if fp.name in features:
            raise DriftInputError(f"feature name {fp.name!r} appears twice in the profile")
        bins, nan = _split(counts)
        features[fp.name] = feature_drift(
            fp.distribution,
            bins,
            nan,
            kind=fp.kind,
            ref_min=fp.min,
            ref_max=fp.max,
            ref_std=fp.std,
            noise_quantile=noise_quantile,
        )
    prediction = None
    if prediction_counts is not None:
        bins, nan = _split(prediction_counts)
        prediction = feature_drift(profile.prediction, bins, nan, noise_quantile=noise_quantile)
    return DriftReport(features=features, prediction=prediction)


# ---------------------------------------------------------------- latency


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
