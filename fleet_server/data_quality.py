"""Per-feature data quality over every row devices were asked about, refused ones included. Pure.

A feature's NaN share is the accepted rows' NaN bin plus the refused rows' NaN count, over
accepted plus refused rows: a sensor that starts sending NaN to a model that refuses NaN shows
here even though its refused rows never reach the drift bins. Out-of-range is below the
training minimum or above the maximum; wrong type (a string for a number) and unseen
categories come from refused rows only (validation refuses them).

A feature's level compares its NaN and out-of-range shares with the reference's: the increase
must reach the policy's share and pass the sampling noise `NOISE_Z · sqrt(p(1 − p) / rows)`
(p: the reference share, at least 1 / reference rows).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fleet_server.monitoring_sums import MonitoringSums
from model_tools.manifest import ReferenceProfile

__all__ = ["QualityPolicy", "feature_quality"]

NOISE_Z = 2.576
EXTRA_SLOTS = 4  # a packed feature count ends with nan, below_min, above_max, unseen


@dataclass(frozen=True)
class QualityPolicy:
    warn_share: float = 0.05  # increase of the NaN (or out-of-range) share that warns
    alert_share: float = 0.20  # ... and that alerts
    min_rows: int = 100  # rows a bucket needs before its shares count at all


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _level(share: float, ref: float, rows: int, n_ref: int, policy: QualityPolicy) -> tuple[str | None, float]:
    p = max(ref, 1.0 / max(n_ref, 1))
    noise = NOISE_Z * math.sqrt(p * (1 - p) / rows) if rows else math.inf
    rise = share - ref
    if rows < policy.min_rows:
        return None, noise
    if rise >= policy.alert_share and rise > noise:
        return "alert", noise
    if rise >= policy.warn_share and rise > noise:
        return "warn", noise
    return "ok", noise


def feature_quality(
    profile: ReferenceProfile,
    names: Sequence[str],
    predictions: int,
    features: list[list[int]] | None,
    sums: MonitoringSums | None,
    policy: QualityPolicy = QualityPolicy(),  # noqa: B008 - frozen
) -> list[dict[str, Any]]:
    """Per feature: rows, NaN / out-of-range / wrong-type / unseen shares (accepted and refused
    rows together), the reference's NaN and out-of-range shares, and a level."""
    refused = sums.refused_features if sums is not None and sums.refused_features else None
    refused_rows = (sums.refused_rows - sums.refused_malformed) if sums is not None else 0
    rows = predictions + refused_rows
    out = []
    for j, name in enumerate(names):
        packed = features[j] if features is not None and j < len(features) else None
        nan, below, above, _unseen = packed[-EXTRA_SLOTS:] if packed else (0, 0, 0, 0)
        r = refused[j] if refused is not None and j < len(refused) else [0, 0, 0, 0, 0]
        nan_n = nan + r[0]
        range_n = below + above + r[1] + r[2]
        prof = profile.features[j] if j < len(profile.features) else None
        n_ref = profile.rows
        ref_nan = prof.distribution.nan / n_ref if prof is not None and n_ref else 0.0
        ref_range = (prof.distribution.below_min + prof.distribution.above_max) / n_ref if prof is not None and n_ref else 0.0
        nan_share = nan_n / rows if rows else None
        range_share = range_n / rows if rows else None
        nan_level, nan_noise = _level(nan_share or 0.0, ref_nan, rows, n_ref, policy)
        range_level, range_noise = _level(range_share or 0.0, ref_range, rows, n_ref, policy)
        # One statistic per feature for the alert series: the rise (over the reference share)
        # that stands further above its noise, NaN or out-of-range.
        nan_rise = (nan_share or 0.0) - ref_nan
        range_rise = (range_share or 0.0) - ref_range
        by_nan = nan_rise - nan_noise >= range_rise - range_noise
        levels = [lv for lv in (nan_level, range_level) if lv is not None]
        rank = {"ok": 0, "warn": 1, "alert": 2}
        out.append({
            "index": j,
            "name": name,
            "rows": rows,
            "refused_rows": refused_rows,
            "nan": nan_n,
            "nan_refused": r[0],
            "nan_share": nan_share,
            "reference_nan_share": ref_nan,
            "out_of_range": range_n,
            "out_of_range_share": range_share,
            "reference_out_of_range_share": ref_range,
            "wrong_type": r[3],
            "unseen": r[4],
            "noise": {"nan": _finite(nan_noise), "out_of_range": _finite(range_noise)},
            "statistic": nan_rise if by_nan else range_rise,
            "statistic_noise": _finite(nan_noise if by_nan else range_noise),
            "level": max(levels, key=rank.__getitem__) if levels else None,
            "reason": "nan" if nan_level in ("warn", "alert") and rank[nan_level] >= rank.get(range_level or "ok", 0)
            else "out_of_range" if range_level in ("warn", "alert") else None,
        })
    return out
