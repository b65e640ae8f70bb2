"""The sampling-noise level of PSI: the chi-square distribution (no scipy on the server) and the
PSI two same-distribution samples of given sizes exceed only rarely."""

from __future__ import annotations

import math
from functools import lru_cache
from statistics import NormalDist

import numpy as np

from fleet_server.drift.metrics import scalar_or_array

# Quantile of the no-drift PSI distribution a statistic must exceed to count as drift.
NOISE_QUANTILE = 0.99

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
    return scalar_or_array(level)
