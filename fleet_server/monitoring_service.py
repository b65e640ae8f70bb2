"""Monitoring services: roll the stored monitoring sums up to a scope, a group or a bucket and
score them — the label-free performance estimate beside realized accuracy, the multivariate
drift row, and per-feature data quality (refused rows included).

Like drift and feedback, every roll-up is a sum of stored (model version, device, bucket) rows.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import msgspec

from fleet_server.data_quality import QualityPolicy, feature_quality
from fleet_server.drift.multivariate import multivariate_drift
from fleet_server.drift_service import DriftQueryError, profile_of, scope_devices
from fleet_server.estimation import estimated_metrics, estimated_vs_realized
from fleet_server.monitoring_sums import MonitoringSums, sum_monitoring_rows
from fleet_server.performance import (
    FeedbackMismatch,
    FeedbackSums,
    baseline,
    noise_drop,
    sum_feedback_rows,
)
from fleet_server.registry import effective_policy, get_model
from fleet_server.telemetry import BucketSums, ShapeMismatch, sum_rows
from model_tools.manifest import PerformanceEstimation

if TYPE_CHECKING:
    from fleet_server.alerts import DriftPolicy
    from fleet_server.context import Services

ASSUMPTION = (
    "it assumes no concept shift: right under covariate shift while P(y | x) is unchanged; a concept "
    "shift (the same inputs now mean another outcome) is invisible to it until labels come"
)


def estimation_of(row: dict[str, Any]) -> PerformanceEstimation | None:
    est = row["manifest"].get("estimation")
    return msgspec.convert(est, PerformanceEstimation) if est else None


def _feedback(rows: list[dict[str, Any]]) -> FeedbackSums | None:
    try:
        return sum_feedback_rows(rows)
    except FeedbackMismatch:
        return None


def _realized(fb: FeedbackSums | None) -> tuple[float | None, int]:
    if fb is None or not fb.classified:
        return None, 0
    return fb.correct / fb.classified, fb.classified


def _level(pol: DriftPolicy, base: float | None, est: dict[str, Any]) -> tuple[float | None, float | None, str | None]:
    """The estimate's drop below the validation accuracy, its noise and its alert level."""
    if base is None or est.get("accuracy") is None:
        return None, None, None
    drop = base - est["accuracy"]
    # The drop must pass the larger of the estimate's own noise and the validation score's.
    noise = max(est["noise"] or 0.0, noise_drop_for(base, est["rows"]))
    level = pol.level(drop, noise, est["rows"])
    return drop, noise, level.value if level else None


def noise_drop_for(value: float, rows: int) -> float:
    from fleet_server.performance import Baseline

    return noise_drop(Baseline("accuracy", value, 0), rows)


def _context(svc: Services, model: str, version: str) -> tuple[dict[str, Any], PerformanceEstimation | None, float | None]:
    row = get_model(svc, model, version)
    base = baseline(row["manifest"])
    return row, estimation_of(row), base.value if base is not None and base.metric == "accuracy" else None


def _score(row: dict[str, Any], est_cfg: PerformanceEstimation | None, base: float | None, svc: Services,
           sums: MonitoringSums, fb: FeedbackSums | None) -> dict[str, Any]:
    classes = (row["manifest"].get("outputs") or {}).get("classes")
    est = estimated_metrics(sums, classes, est_cfg.positive if est_cfg else None)
    drop, noise, level = _level(estimate_policy(svc), base, est)
    realized, labels = _realized(fb)
    return {**est, "baseline": base, "drop": drop, "drop_noise": noise, "level": level,
            "realized": estimated_vs_realized(est, realized, labels)}


def estimate_policy(svc: Services) -> DriftPolicy:
    """The performance alert thresholds (`perf_*`), eligible from `min_predictions` rows: an
    estimate needs no labels, so it counts rows like drift does."""
    from dataclasses import replace

    from fleet_server.performance_service import policy

    return replace(policy(svc).as_drift_policy(), min_predictions=svc.config.min_predictions)


def estimated(svc: Services, model: str, version: str, scope: str = "fleet",
              start: float | None = None, end: float | None = None) -> dict[str, Any]:
    """The label-free estimate of one model version in one scope and period, beside realized
    accuracy from feedback of the same scope and period when there is any."""
    row, est_cfg, base = _context(svc, model, version)
    devices = scope_devices(svc, scope)
    rows = svc.storage.monitoring_rows(model, version, start, end, devices)
    fb = _feedback(svc.storage.feedback_rows(model, version, start, end, devices))
    out = {"model": model, "version": version, "scope": scope, "start": start, "end": end,
           "estimable": est_cfg is not None, "assumption": ASSUMPTION,
           "calibration": _calibration_view(est_cfg), "devices": len({r["device"] for r in rows}),
           "buckets": len({r["bucket_start"] for r in rows})}
    if est_cfg is None:
        out["reason"] = _why_not(row)
        return out
    return out | _score(row, est_cfg, base, svc, sum_monitoring_rows(rows), fb)


def _why_not(row: dict[str, Any]) -> str:
    m = row["manifest"]
    if m.get("task") == "regression":
        return "regression models are not estimated: a single predicted value carries no confidence to calibrate"
    if m.get("task") == "anomaly":
        return "anomaly detectors are not estimated"
    return "the bundle carries no estimation inputs (a classifier without probabilities, or built before them)"


def _calibration_view(est: PerformanceEstimation | None) -> dict[str, Any] | None:
    if est is None:
        return None
    c = est.calibration
    return {"applied": c.applied, "method": c.method, "source": c.source, "rows": c.rows, "ece_raw": c.ece_raw,
            "ece_calibrated": c.ece_calibrated, "reason": c.reason, "reference_accuracy": est.reference_accuracy}


def estimated_timeline(svc: Services, model: str, version: str, scope: str = "fleet",
                       start: float | None = None, end: float | None = None) -> dict[str, Any]:
    """Per bucket: estimated accuracy with its interval, and realized accuracy where labels arrived."""
    row, est_cfg, base = _context(svc, model, version)
    devices = scope_devices(svc, scope)
    by_bucket: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for r in svc.storage.monitoring_rows(model, version, start, end, devices):
        by_bucket[r["bucket_start"]].append(r)
    fb_bucket: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for r in svc.storage.feedback_rows(model, version, start, end, devices):
        fb_bucket[r["bucket_start"]].append(r)
    points = []
    if est_cfg is not None:
        for b in sorted(set(by_bucket) | set(fb_bucket)):
            s = _score(row, est_cfg, base, svc, sum_monitoring_rows(by_bucket.get(b, [])),
                       _feedback(fb_bucket.get(b, [])))
            points.append({"bucket_start": b, "bucket_end": b + svc.config.bucket_s, "rows": s["rows"],
                           "accuracy": s["accuracy"], "interval": s["interval"], "drop": s["drop"],
                           "level": s["level"], "realized": s["realized"]["realized"],
                           "labels": s["realized"]["labels"], "error": s["realized"]["error"],
                           "roc_auc": s.get("roc_auc")})
    return {"model": model, "version": version, "scope": scope, "bucket_s": svc.config.bucket_s,
            "estimable": est_cfg is not None, "baseline": base, "assumption": ASSUMPTION, "points": points}


def estimated_groups(svc: Services, model: str, version: str, by: str = "device",
                     start: float | None = None, end: float | None = None) -> dict[str, Any]:
    """The estimate per device, per value of a tag (`by=tag:KEY`) or per bucket."""
    from fleet_server.performance_service import _group_key

    row, est_cfg, base = _context(svc, model, version)
    key_of = _group_key(by, svc)
    grouped: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    fb_grouped: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for r in svc.storage.monitoring_rows(model, version, start, end):
        if (k := key_of(r)) is not None:
            grouped[k].append(r)
    for r in svc.storage.feedback_rows(model, version, start, end):
        if (k := key_of(r)) is not None:
            fb_grouped[k].append(r)
    out = []
    if est_cfg is not None:
        for k in sorted(grouped):
            entry = {"bucket_start": k} if by == "bucket" else {"scope": k}
            out.append(entry | _score(row, est_cfg, base, svc, sum_monitoring_rows(grouped[k]),
                                      _feedback(fb_grouped.get(k, []))))
    return {"model": model, "version": version, "by": by, "estimable": est_cfg is not None, "groups": out}


# ---------------------------------------------------------------- drift view additions


def multivariate_entry(row: dict[str, Any], sums: MonitoringSums, pol: DriftPolicy) -> dict[str, Any] | None:
    """The drift views' multivariate row, with a level like a feature's (a mean shift alone
    makes it at least `warn`)."""
    profile = profile_of(row)
    if profile.multivariate is None:
        return None
    mv = multivariate_drift(profile.multivariate, sums)
    if mv is None:
        return {"rows": 0, "level": None, "psi": None}
    level = pol.level(mv["psi"] if mv["psi"] is not None else math.nan, mv["noise_psi"] or math.inf, mv["rows"])
    value = level.value if level else None
    if mv["mean_shift"] and value == "ok":
        value = "warn"
    return mv | {"level": value}


def quality_entries(svc: Services, row: dict[str, Any], sums: BucketSums, mon: MonitoringSums) -> list[dict[str, Any]]:
    profile = profile_of(row)
    names = [f["name"] for f in row["manifest"].get("inputs") or []]
    return feature_quality(profile, names, sums.predictions, sums.features, mon, quality_policy(svc))


def quality_policy(svc: Services) -> QualityPolicy:
    c = svc.config
    return QualityPolicy(warn_share=c.quality_warn_share, alert_share=c.quality_alert_share,
                         min_rows=c.quality_min_rows)


def drift_additions(svc: Services, model: str, version: str, scope: str | None,
                    start: float | None, end: float | None, sums: BucketSums | None = None) -> dict[str, Any]:
    """`multivariate` and `quality` for a drift view of one scope and period."""
    row = get_model(svc, model, version)
    devices = scope_devices(svc, scope) if scope is not None else None
    mon = sum_monitoring_rows(svc.storage.monitoring_rows(model, version, start, end, devices))
    if sums is None:
        try:
            sums = sum_rows(svc.storage.bucket_rows(model, version, start, end, devices))
        except ShapeMismatch as exc:
            raise DriftQueryError(f"counts do not line up: {exc}", 409) from exc
    return {"multivariate": multivariate_entry(row, mon, effective_policy(svc, row)),
            "quality": quality_entries(svc, row, sums, mon)}


def multivariate_points(svc: Services, model: str, version: str, scope: str = "fleet",
                        start: float | None = None, end: float | None = None) -> dict[float, dict[str, Any]]:
    """The multivariate row per bucket (for the drift timeline): PSI, noise, level, mean error."""
    row = get_model(svc, model, version)
    if profile_of(row).multivariate is None:
        return {}
    pol = effective_policy(svc, row)
    by_bucket: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for r in svc.storage.monitoring_rows(model, version, start, end, scope_devices(svc, scope)):
        by_bucket[r["bucket_start"]].append(r)
    out = {}
    for bucket, rows in by_bucket.items():
        entry = multivariate_entry(row, sum_monitoring_rows(rows), pol)
        if entry is not None and entry.get("rows"):
            out[bucket] = {k: entry.get(k) for k in ("rows", "psi", "noise_psi", "level", "mean", "reference_mean",
                                                     "mean_threshold", "mean_shift")}
    return out
