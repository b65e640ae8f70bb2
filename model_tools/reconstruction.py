"""Multivariate drift: a PCA of the reference's numeric features and each row's reconstruction error.

numpy only: model_tools fits it at conversion, the agent computes the error of every row it
serves. A change in how features move together (a correlation flipping sign) raises the error
even when every feature's own distribution stays the same, which per-feature bins cannot see.
As in NannyML's data reconstruction drift: standardise, keep the components that explain 65 %
of the variance, and measure the Euclidean distance between a row and its reconstruction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from operator import itemgetter, mul

import numpy as np

from model_tools.binning import DEFAULT_BINS, quantile_edges
from model_tools.manifest import FeatureSpec, MultivariateProfile

__all__ = ["VARIANCE_TARGET", "Reconstruction", "fit_multivariate"]

VARIANCE_TARGET = 0.65
# The manifest carries the components: past this many numbers it would outgrow its 1 MiB limit.
MAX_COMPONENT_VALUES = 20_000
SMALL_PCA = 96  # (components + 1) x features up to which one row's error is computed in Python


class Reconstruction:
    """A MultivariateProfile compiled for fast errors: one [d, d] residual projection."""

    def __init__(self, profile: MultivariateProfile) -> None:
        self.profile = profile
        self.features = list(profile.features)
        self.fill = np.asarray(profile.fill, dtype=np.float64)
        self.mean = np.asarray(profile.mean, dtype=np.float64)
        self.scale = np.asarray(profile.scale, dtype=np.float64)
        w = np.asarray(profile.components, dtype=np.float64).reshape(-1, len(self.features))
        # z - z Wᵀ W = z (I - Wᵀ W): one matrix product per batch instead of two.
        self.residual = np.eye(len(self.features)) - w.T @ w
        self.inv_scale = 1.0 / self.scale
        self.edges = np.asarray(profile.edges, dtype=np.float64)
        self.edges_list = list(profile.edges)
        self.fill_list = list(profile.fill)

        # Small PCAs are cheaper per row in plain Python than through numpy's call overhead:
        # |z - zWᵀW|² = |z|² - |Wz|² (W's rows orthonormal), (k + 1)·d multiply-adds.
        self._small = (len(w) + 1) * len(self.features) <= SMALL_PCA
        self._mean = list(profile.mean)
        self._inv = (1.0 / self.scale).tolist()
        self._w = w.tolist()
        # One C call gathers a row's used features (itemgetter of one index returns a scalar).
        self.take = itemgetter(*self.features) if len(self.features) > 1 else (lambda row: (row[self.features[0]],))

    def error(self, values: Sequence[float]) -> float:
        """One row's error; `values` are the used features, NaN already filled."""
        if self._small:
            z = [(v - m) * s for v, m, s in zip(values, self._mean, self._inv)]  # noqa: B905 - same length
            e2 = sum(map(mul, z, z))
            for w in self._w:
                d = sum(map(mul, w, z))
                e2 -= d * d
            return math.sqrt(e2) if e2 > 0.0 else 0.0
        r = ((np.array(values, dtype=np.float64) - self.mean) * self.inv_scale) @ self.residual
        return math.sqrt(float(r @ r))

    def matrix(self, rows: Sequence[Sequence[object]]) -> tuple[np.ndarray, int]:
        """The used features of validated rows (schema order) as floats, NaN filled by the
        reference medians; and how many rows had a value filled."""
        idx = self.features
        x = np.array([[row[j] for j in idx] for row in rows], dtype=np.float64)
        nan = np.isnan(x)
        if not nan.any():
            return x, 0
        x = np.where(nan, self.fill, x)
        return x, int(nan.any(axis=1).sum())

    def errors(self, x: np.ndarray) -> np.ndarray:
        """Reconstruction error of each row of `x` ([N, d], no NaN)."""
        r = ((x - self.mean) * self.inv_scale) @ self.residual
        return np.sqrt(np.einsum("ij,ij->i", r, r))

    def bins(self, errors: np.ndarray) -> np.ndarray:
        """Bin index of each error in the reference edges (right-closed)."""
        return np.searchsorted(self.edges, errors, side="left")


def fit_multivariate(
    specs: Sequence[FeatureSpec],
    columns: Sequence[np.ndarray],
    *,
    variance: float = VARIANCE_TARGET,
    bins: int = DEFAULT_BINS,
) -> tuple[MultivariateProfile | None, str | None]:
    """Fit the PCA on the reference's numeric features: (profile, None) or (None, why not).

    Categorical features are left out (their categories have no scale a distance could use);
    NaN is replaced by the feature's reference median, before fitting and on devices alike;
    a feature without any value in the reference is left out. Constant features keep scale 1.
    """
    used = [
        j for j, s in enumerate(specs)
        if s.kind == "numeric" and np.isfinite(np.asarray(columns[j], dtype=np.float64)).any()
    ]
    if len(used) < 2:
        return None, "fewer than two numeric features: no multivariate drift"
    x = np.column_stack([np.asarray(columns[j], dtype=np.float64) for j in used])
    x[np.isinf(x)] = np.nan
    n = len(x)
    if n < 2 * len(used) or n < 20:
        return None, f"{n} reference rows for {len(used)} numeric features: too few for multivariate drift"
    fill = np.nanmedian(x, axis=0)
    x = np.where(np.isnan(x), fill, x)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[~(scale > 0)] = 1.0
    z = (x - mean) / scale
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    ratio = s**2 / float((s**2).sum()) if (s > 0).any() else np.zeros_like(s)
    # sklearn's PCA(n_components=0.65): the fewest components whose cumulative share exceeds it.
    k = int(np.searchsorted(np.cumsum(ratio), variance, side="right")) + 1
    k = min(k, len(used))
    if k * len(used) > MAX_COMPONENT_VALUES:
        return None, (
            f"{k} components of {len(used)} features are too many numbers for the manifest: "
            "no multivariate drift (reduce the features first)"
        )
    w = vt[:k]
    profile = MultivariateProfile(
        features=used,
        fill=[float(v) for v in fill],
        mean=[float(v) for v in mean],
        scale=[float(v) for v in scale],
        components=[[float(v) for v in row] for row in w],
        variance_target=variance,
        explained=float(ratio[:k].sum()),
    )
    rec = Reconstruction(profile)
    err = rec.errors(x)
    edges = quantile_edges(err, bins)
    profile.edges = edges
    profile.counts = [int(c) for c in np.bincount(np.searchsorted(edges, err, side="left"), minlength=len(edges) + 1)]
    profile.rows = int(n)
    profile.mean_error = float(err.mean())
    profile.std_error = float(err.std())
    return profile, None
