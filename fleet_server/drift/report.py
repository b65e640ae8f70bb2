"""Drift of one feature (every metric and its noise level) and of a whole model version's
features and prediction against its reference profile."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from edge_agent.protocol import FeatureCounts
from fleet_server.drift.counts import DriftInputError, counts_vector
from fleet_server.drift.metrics import (
    bin_positions,
    chi2_statistic,
    js_distance,
    ks_binned,
    occupied_bins,
    psi,
    wasserstein_binned,
)
from fleet_server.drift.noise import NOISE_QUANTILE, chi2_sf, psi_noise_level
from model_tools.manifest import BinnedDistribution, ReferenceProfile

Kind = Literal["numeric", "categorical"]


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
