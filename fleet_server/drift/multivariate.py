"""Multivariate drift: the per-row PCA reconstruction error against the reference's. Pure.

The bundle's profile holds a PCA of the reference's standardised numeric features and the
deciles of the reference rows' reconstruction errors; devices count their rows' errors into
those bins and send count, sum and sum of squares. Its distribution is judged like a feature's
(PSI against the same sampling-noise level), and its mean against the reference mean with a
threshold that narrows as rows accumulate: `MEAN_Z` standard errors of the difference of two
means, σ_ref · sqrt(1/n_cur + 1/n_ref). (NannyML fixes a chunk size and uses the reference
chunks' mean ± 3σ; the merged sample size here is whatever the scope and period hold.)
"""

from __future__ import annotations

import math
from typing import Any

from fleet_server.drift.report import feature_drift
from fleet_server.monitoring_sums import MonitoringSums
from model_tools.manifest import BinnedDistribution, MultivariateProfile

__all__ = ["MEAN_Z", "multivariate_drift"]

MEAN_Z = 3.0


def multivariate_drift(profile: MultivariateProfile, sums: MonitoringSums) -> dict[str, Any] | None:
    """The multivariate row: PSI and friends of the error distribution, the mean error against
    the reference with its threshold, and `mean_shift` (True when the mean passed it).
    None when no rows were counted or the bins do not line up with this profile."""
    if not sums.mv_rows or sums.mv_bins is None or len(sums.mv_bins) != len(profile.counts):
        return None
    ref = BinnedDistribution(edges=list(profile.edges), counts=list(profile.counts), nan=0)
    fd = feature_drift(ref, sums.mv_bins, 0, kind="numeric", ref_min=0.0, ref_std=profile.std_error or None)
    n = sums.mv_rows
    mean = sums.mv_sum / n
    std = math.sqrt(max(sums.mv_sum_sq / n - mean * mean, 0.0))
    threshold = MEAN_Z * profile.std_error * math.sqrt(1.0 / n + 1.0 / max(profile.rows, 1))
    return {
        **fd.to_dict(),
        "rows": n,
        "filled": sums.mv_filled,
        "mean": mean,
        "std": std,
        "reference_mean": profile.mean_error,
        "reference_std": profile.std_error,
        "mean_threshold": threshold,
        "mean_shift": abs(mean - profile.mean_error) > threshold,
        "components": len(profile.components),
        "features": len(profile.features),
        "explained": profile.explained,
    }
