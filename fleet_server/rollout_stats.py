"""Cohort statistics for rollout gates: sum the stored telemetry windows of a stage's cohorts.

Canary and control are measured over the same window: telemetry the server received since the
stage started. Canary devices in a live stage count only their windows of the rollout's version;
in a shadow stage their active model's windows carry the candidate's shadow counts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING, Any

from fleet_server.gates import CohortStats
from fleet_server.monitoring_sums import MonitoringMismatch, MonitoringSums

if TYPE_CHECKING:
    from fleet_server.context import Services


def _add(total: list[int], more: list[int] | None) -> list[int]:
    if not more:
        return total
    if len(total) < len(more):
        total.extend([0] * (len(more) - len(total)))
    for i, v in enumerate(more):
        total[i] += v
    return total


def _prediction_bins(packed: Any) -> list[int] | None:
    """FeatureCounts travel array-like: [bins, nan, below_min, above_max, unseen]."""
    if not packed:
        return None
    if isinstance(packed, dict):
        return [*packed.get("bins", []), packed.get("nan", 0)]
    return [*packed[0], packed[1] if len(packed) > 1 else 0]


def sum_windows(stats: CohortStats, rows: Iterable[dict[str, Any]], *, version: str | None = None,
                exclude_version: str | None = None, shadow_version: str | None = None) -> CohortStats:
    """Add windows into `stats`: only `version`'s windows when given, none of `exclude_version`'s,
    and the shadow counts of `shadow_version`."""
    for r in rows:
        v = r["model_version"]
        if version is not None and v != version:
            continue
        if exclude_version is not None and v == exclude_version:
            continue
        stats.predictions += r["predictions"]
        stats.errors += r["errors"]
        _add(stats.latency, r.get("latency"))
        stats.prediction_counts = _add(stats.prediction_counts, _prediction_bins(r.get("prediction")))
        shadow = r.get("shadow")
        if shadow_version is not None and shadow and shadow.get("version") == shadow_version:
            stats.shadow_compared += shadow.get("compared", 0)
            stats.shadow_agreed += shadow.get("agreed", 0)
            _add(stats.shadow_latency, (shadow.get("latency") or {}).get("counts"))
            stats.shadow_prediction_counts = _add(
                stats.shadow_prediction_counts, _prediction_bins(shadow.get("prediction"))
            )
    return stats


def canary_feature_psi(svc: Services, model: str, version: str, devices: Collection[str]) -> float | None:
    """Worst feature PSI of the canary devices' inputs (counted in the new version's bins) against
    the version's reference profile; None before any counts arrived."""
    from fleet_server.drift_service import profile_of, report_for
    from fleet_server.telemetry import ShapeMismatch, sum_rows

    row = svc.storage.get_model(model, version)
    if row is None or not devices:
        return None
    rows = svc.storage.bucket_rows(model, version, devices=list(devices))
    if not rows:
        return None
    try:
        report = report_for(profile_of(row), sum_rows(rows))
    except (ShapeMismatch, ValueError):
        return None
    if report is None:
        return None
    values = [fd.psi for fd in report.features.values() if fd.psi is not None and fd.psi == fd.psi]
    return max(values) if values else None


def sum_feedback(stats: CohortStats, rows: Iterable[dict[str, Any]], devices: Collection[str], *,
                 version: str | None = None, exclude_version: str | None = None) -> CohortStats:
    """Add the classification feedback of `devices` into `stats` (labels and correct answers):
    only that joined predictions of `version` when given, none of `exclude_version`'s."""
    for r in rows:
        v = r["model_version"]
        if r["device"] not in devices or (version is not None and v != version) or v == exclude_version:
            continue
        confusion = r.get("confusion")
        if confusion:
            stats.labels += sum(map(sum, confusion))
            stats.correct += sum(row[i] for i, row in enumerate(confusion))
    return stats


def sum_monitoring(stats: CohortStats, rows: Iterable[dict[str, Any]], devices: Collection[str], *,
                   version: str | None = None, exclude_version: str | None = None) -> MonitoringSums:
    """Add the monitoring sums of `devices` into `stats` (estimate rows and confidences, refused
    rows): only `version`'s when given, none of `exclude_version`'s. Returns the summed rows
    whose shapes line up (for the canary's multivariate drift)."""
    total = MonitoringSums()
    for r in rows:
        v = r["model_version"]
        if r["device"] not in devices or (version is not None and v != version) or v == exclude_version:
            continue
        s = MonitoringSums.from_row(r)
        stats.est_rows += s.est_rows
        stats.est_hits += sum(s.est_confusion[k][k] for k in range(len(s.est_confusion))) if s.est_confusion else 0.0
        stats.est_sq_sum += s.est_sq_sum
        stats.refused_rows += s.refused_rows
        with contextlib.suppress(MonitoringMismatch):
            total.add(s)
    return total


def canary_multivariate(svc: Services, model: str, version: str, stats: CohortStats, sums: MonitoringSums) -> None:
    """The canary's multivariate drift (PSI of reconstruction errors, its noise level) against
    the version's reference; left unset when the bundle has no multivariate profile."""
    from fleet_server.drift.multivariate import multivariate_drift
    from fleet_server.drift_service import profile_of

    row = svc.storage.get_model(model, version)
    if row is None:
        return
    profile = profile_of(row).multivariate
    mv = multivariate_drift(profile, sums) if profile is not None else None
    if mv is not None and mv["psi"] is not None:
        stats.multivariate_psi, stats.multivariate_noise, stats.multivariate_rows = mv["psi"], mv["noise_psi"], mv["rows"]
