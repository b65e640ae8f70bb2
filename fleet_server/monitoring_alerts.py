"""Alerts on the monitoring series, per scope and closed bucket, with the drift alerts' state
machine (`fleet_server.alerts.evaluate`): the estimated accuracy's drop below the validation
score (kind `estimated`), multivariate drift (kind `multivariate`) and each feature's data
quality, refused rows included (kind `quality`).

Stored in the alerts table beside drift and performance alerts, published and POSTed to
webhooks with the events `estimated.alert.*`, `multivariate.alert.*` and `quality.alert.*`.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fleet_server.alerts import (
    AlertTransition,
    BucketDrift,
    DriftPolicy,
    Notification,
    SeriesState,
    evaluate,
)
from fleet_server.data_quality import feature_quality
from fleet_server.drift.multivariate import multivariate_drift
from fleet_server.drift_service import profile_of, scope_devices, scopes_for
from fleet_server.estimation import estimated_metrics
from fleet_server.monitoring_service import (
    estimate_policy,
    estimation_of,
    noise_drop_for,
    quality_policy,
)
from fleet_server.monitoring_sums import sum_monitoring_rows
from fleet_server.performance import baseline
from fleet_server.registry import effective_policy
from fleet_server.telemetry import BucketSums, ShapeMismatch, sum_rows

if TYPE_CHECKING:
    from fleet_server.context import Services

log = logging.getLogger(__name__)

PAYLOAD_VERSION = 1
KINDS = ("estimated", "multivariate", "quality")


def _series_key(scope: str) -> str:
    return f"monitoring:{scope}"


def _points(svc: Services, model_row: dict[str, Any], scope: str, since: float | None,
            closed_end: float) -> dict[str, list[tuple[BucketDrift, dict[str, Any]]]]:
    """Per series name, the bucket points (with their details) after `since`."""
    model, version = model_row["name"], model_row["version"]
    devices = scope_devices(svc, scope)
    mon: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for r in svc.storage.monitoring_rows(model, version, since, closed_end, devices):
        mon[r["bucket_start"]].append(r)
    buckets: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for r in svc.storage.bucket_rows(model, version, since, closed_end, devices):
        buckets[r["bucket_start"]].append(r)
    profile = profile_of(model_row)
    manifest = model_row["manifest"]
    est_cfg = estimation_of(model_row)
    base = baseline(manifest)
    base_acc = base.value if base is not None and base.metric == "accuracy" else None
    classes = (manifest.get("outputs") or {}).get("classes")
    names = [f["name"] for f in manifest.get("inputs") or []]
    qpol = quality_policy(svc)
    series: dict[str, list[tuple[BucketDrift, dict[str, Any]]]] = defaultdict(list)
    for bucket in sorted(set(mon) | set(buckets)):
        m = sum_monitoring_rows(mon.get(bucket, []))
        try:
            b = sum_rows(buckets[bucket]) if bucket in buckets else BucketSums()
        except ShapeMismatch:
            continue
        if est_cfg is not None and base_acc is not None and m.est_rows:
            est = estimated_metrics(m, classes, est_cfg.positive)
            drop = base_acc - est["accuracy"]
            noise = max(est["noise"] or 0.0, noise_drop_for(base_acc, m.est_rows))
            series["estimated"].append((BucketDrift(bucket, m.est_rows, drop, noise),
                                        {"estimated": est["accuracy"], "baseline": base_acc, "drop": drop}))
        if profile.multivariate is not None and m.mv_rows:
            mv = multivariate_drift(profile.multivariate, m)
            if mv is not None and mv["psi"] is not None:
                series["multivariate"].append((BucketDrift(bucket, mv["rows"], mv["psi"], mv["noise_psi"] or math.inf),
                                               {"mean": mv["mean"], "reference_mean": mv["reference_mean"],
                                                "mean_shift": mv["mean_shift"]}))
        if b.features or m.refused_rows:
            for q in feature_quality(profile, names, b.predictions, b.features, m, qpol):
                noise = q["statistic_noise"] if q["statistic_noise"] is not None else math.inf
                series[f"quality:{q['index']}"].append((
                    BucketDrift(bucket, q["rows"], q["statistic"], noise),
                    {"nan_share": q["nan_share"], "nan_refused": q["nan_refused"],
                     "out_of_range_share": q["out_of_range_share"], "refused_rows": q["refused_rows"],
                     "reason": q["reason"]},
                ))
    return series


def _policy(svc: Services, model_row: dict[str, Any], name: str) -> DriftPolicy:
    if name == "estimated":
        return estimate_policy(svc)
    if name == "multivariate":
        return effective_policy(svc, model_row)
    q = quality_policy(svc)
    return replace(DriftPolicy(), warn_psi=q.warn_share, alert_psi=q.alert_share, min_predictions=q.min_rows,
                   consecutive=svc.config.consecutive)


def evaluate_scope(svc: Services, model_row: dict[str, Any], scope: str, closed_end: float) -> list[Notification]:
    """Judge this scope's closed, not yet judged buckets of every monitoring series."""
    model, version = model_row["name"], model_row["version"]
    key = _series_key(scope)
    stored = svc.storage.series_states(model, version, key)
    seen = [s.get("last_seen") for s in stored.values() if s.get("last_seen") is not None]
    since = min(seen) + svc.config.bucket_s / 2 if seen else None
    names = [f["name"] for f in model_row["manifest"].get("inputs") or []]
    notes: list[Notification] = []
    new_states: dict[str, dict[str, Any]] = {}
    for name, points in _points(svc, model_row, scope, since, closed_end).items():
        state = SeriesState.from_dict(stored[name]) if name in stored else None
        if state is not None and state.last_seen is not None:
            points = [p for p in points if p[0].bucket > state.last_seen]
        if not points:
            continue
        kind = name.split(":")[0]
        index = int(name.split(":")[1]) if kind == "quality" else None
        target = names[index] if index is not None and index < len(names) else (
            "estimated_accuracy" if kind == "estimated" else "multivariate")
        details = {p[0].bucket: p[1] for p in points}
        ev = evaluate([p[0] for p in points], _policy(svc, model_row, name), scope=scope, model_version=version,
                      feature=target, feature_index=index, state=state)
        notes += [_apply(svc, model, version, kind, target, t, details.get(t.bucket, {})) for t in ev.transitions]
        new_states[name] = ev.state.to_dict()
    if new_states:
        svc.storage.put_series_states(model, version, key, new_states)
    return notes


def _apply(svc: Services, model: str, version: str, kind: str, target: str, t: AlertTransition,
           extra: dict[str, Any]) -> Notification:
    now = svc.clock()
    details = {**t.to_dict(), "kind": kind, **extra}
    if t.action == "open":
        alert_id = svc.storage.insert_alert({
            "model": model, "model_version": version, "scope": t.scope, "target": target,
            "target_index": t.feature_index, "severity": t.level.value, "state": "open",
            "value": details["psi"], "opened_at": now, "bucket_start": float(t.bucket), "details": details,
            "kind": kind,
        })
    else:
        rows = [a for a in svc.storage.open_alerts(model, version, t.scope, kind=kind)
                if a["target"] == target and a["severity"] == t.level.value]
        alert_id = rows[0]["id"] if rows else 0
        for a in rows:
            svc.storage.update_alert(a["id"], state="resolved", resolved_at=now)
    event = f"{kind}.alert.{t.action}"
    payload = {"v": PAYLOAD_VERSION, "event": event, "fleet": svc.config.fleet, "model": model,
               "alert": details, "alert_id": alert_id}
    return Notification(alert_id, payload, event)


def evaluate_closed(svc: Services) -> list[Notification]:
    """One pass over every registered model version with drift buckets (fleet, devices, tags)."""
    closed_end = svc.clock() - svc.config.bucket_grace_s - svc.config.bucket_s + 1e-9
    notes: list[Notification] = []
    for v in svc.storage.bucketed_versions():
        model_row = svc.storage.get_model(v["model"], v["model_version"])
        if model_row is None:
            continue
        rows = svc.storage.bucket_rows(v["model"], v["model_version"], None, closed_end)
        for scope in scopes_for(svc, v["model"], v["model_version"], rows):
            try:
                notes += evaluate_scope(svc, model_row, scope, closed_end)
            except Exception:
                log.exception("monitoring alert evaluation failed for %s %s %s", v["model"], v["model_version"], scope)
    return notes
