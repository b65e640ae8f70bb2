"""Drift mathematics over fixed reference bins (DESIGN section 5), numpy only.

The package: `counts` (count vectors, merging), `metrics` (PSI, JS, KS, Wasserstein,
chi-square), `noise` (the chi-square distribution and PSI's sampling-noise level), `report`
(per feature and per model version) and `latency` (histogram percentiles).

Devices count into the bundle's reference bins, so merging is exact addition; every metric here
is computed from merged counts. See docs/drift.md for the formulas and how to read them.

Count-vector layout used throughout: the profile's bins in order, then the NaN bin last (the
same order as `model_tools.binning.shares`). Metric functions broadcast over leading axes, so
one call can score many devices or buckets against one reference.
"""

from __future__ import annotations

from fleet_server.drift.counts import (
    DriftInputError,
    counts_vector,
    merge_count_matrix,
    merge_counts,
    merge_feature_counts,
    sum_by_group,
)
from fleet_server.drift.latency import latency_percentile
from fleet_server.drift.metrics import (
    EMPTY_SHARE,
    bin_positions,
    chi2_statistic,
    js_distance,
    ks_binned,
    occupied_bins,
    psi,
    wasserstein_binned,
)
from fleet_server.drift.noise import NOISE_QUANTILE, chi2_cdf, chi2_ppf, chi2_sf, psi_noise_level
from fleet_server.drift.report import DriftReport, FeatureDrift, drift_report, feature_drift

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
