"""Realized performance services: roll feedback sums up to a scope or group, score them
(fleet_server.performance), set them beside input drift (the concept-drift view), and evaluate
performance alerts per closed bucket with the drift alerts' state machine.

Feedback is bucketed by the window in which the truth arrived: with delayed labels the
performance series trails the input series by the label delay.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fleet_server.alerts import AlertTransition, Notification, SeriesState, evaluate
from fleet_server.drift_service import (
    DriftQueryError,
    describe,
    profile_of,
    scope_devices,
    scopes_for,
)
from fleet_server.performance import (
    Baseline,
    FeedbackMismatch,
    FeedbackSums,
    PerformancePolicy,
    baseline,
    bucket_point,
    metrics,
    realized,
    sum_feedback_rows,
)
from fleet_server.registry import effective_policy, get_model
from fleet_server.telemetry import sum_rows

if TYPE_CHECKING:
    from fleet_server.context import Services

log = logging.getLogger(__name__)

PAYLOAD_VERSION = 1
SERIES = "performance"  # alert_series key, under the scope "performance:SCOPE"


@dataclass(frozen=True)
class ModelContext:
    """What scoring one model version's feedback needs from its manifest."""

    task: str
    classes: list[Any] | None
    prediction_edges: list[float] | None
    baseline: Baseline | None

    @classmethod
    def of(cls, row: dict[str, Any]) -> ModelContext:
        m = row["manifest"]
        task = m.get("task", "classification")
        classes = (m.get("outputs") or {}).get("classes")
        if task == "anomaly":
            classes = [-1, 1]
        edges = ((m.get("profile") or {}).get("prediction") or {}).get("edges")
        return cls(task, classes, edges, baseline(m))


def policy(svc: Services) -> PerformancePolicy:
    """The server's performance alert policy (server.toml `perf_*` keys, `consecutive`)."""
    c = svc.config
    return PerformancePolicy(warn_drop=c.perf_warn_drop, alert_drop=c.perf_alert_drop,
                             min_labels=c.perf_min_labels, consecutive=c.consecutive)


def _score(ctx: ModelContext, sums: FeedbackSums) -> dict[str, Any]:
    out = metrics(sums, ctx.task, ctx.classes, ctx.prediction_edges)
    if ctx.baseline is not None:
        value, labels = realized(sums, ctx.baseline)
        out["baseline"] = {"metric": ctx.baseline.metric, "value": ctx.baseline.value,
                           "validation_rows": ctx.baseline.rows}
        out["realized"] = value
        out["drop"] = ctx.baseline.value - value if value is not None else None
    return out


def _sum(rows: list[dict[str, Any]]) -> FeedbackSums:
    try:
        return sum_feedback_rows(rows)
    except FeedbackMismatch as exc:
        raise DriftQueryError(f"feedback counts do not line up: {exc}", 409) from exc


def performance(svc: Services, model: str, version: str, scope: str = "fleet",
                start: float | None = None, end: float | None = None) -> dict[str, Any]:
    """Every figure of one model version's feedback in one scope and time range."""
    row = get_model(svc, model, version)
    rows = svc.storage.feedback_rows(model, version, start, end, scope_devices(svc, scope))
    ctx = ModelContext.of(row)
    return {
        "model": model, "version": version, "scope": scope, "start": start, "end": end,
        "task": ctx.task, "devices": len({r["device"] for r in rows}),
        "buckets": len({r["bucket_start"] for r in rows}), "policy": policy(svc).to_dict(),
        **_score(ctx, _sum(rows)),
    }


def _group_key(by: str, svc: Services) -> Any:
    if by in ("device", "bucket"):
        return lambda r: f"device:{r['device']}" if by == "device" else r["bucket_start"]
    if by.startswith("tag:") and len(by) > 4:
        key = by[4:]
        tag_of = {d["id"]: d["tags"].get(key)
                  for d in svc.storage.list_devices(include_revoked=True, limit=1_000_000)}
        return lambda r: f"tag:{key}={tag_of[r['device']]}" if tag_of.get(r["device"]) is not None else None
    raise DriftQueryError(f"by={by!r} must be 'device', 'tag:KEY' or 'bucket'")


def groups(svc: Services, model: str, version: str, by: str = "device",
           start: float | None = None, end: float | None = None) -> dict[str, Any]:
    """Performance per device, per value of a tag (`by=tag:KEY`) or per time bucket."""
    row = get_model(svc, model, version)
    ctx = ModelContext.of(row)
    key_of = _group_key(by, svc)
    grouped: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for r in svc.storage.feedback_rows(model, version, start, end):
        key = key_of(r)
        if key is not None:
            grouped[key].append(r)
    out = []
    for key in sorted(grouped):
        entry = {"bucket_start": key} if by == "bucket" else {"scope": key}
        out.append({**entry, **_score(ctx, _sum(grouped[key]))})
    return {"model": model, "version": version, "by": by, "task": ctx.task, "groups": out}


def versions(svc: Services, model: str | None = None) -> list[dict[str, Any]]:
    """Every model version with feedback: labels, accuracy (or MAE/RMSE) and the baseline."""
    out = []
    for v in svc.storage.feedback_versions():
        if model is not None and v["model"] != model:
            continue
        entry: dict[str, Any] = {"model": v["model"] or None, "version": v["model_version"] or None,
                                 "devices": v["devices"], "first_bucket": v["first_bucket"],
                                 "last_bucket": v["last_bucket"]}
        row = svc.storage.get_model(v["model"], v["model_version"]) if v["model"] else None
        sums = _sum(svc.storage.feedback_rows(v["model"], v["model_version"]))
        if row is None:
            entry |= {"registered": False, "labels": sums.joined, "counters": sums.counters}
        else:
            score = _score(ModelContext.of(row), sums)
            entry |= {"registered": True, **{k: score.get(k) for k in (
                "labels", "counters", "accuracy", "macro_f1", "mae", "rmse", "baseline", "realized", "drop")
                if k in score}}
        out.append(entry)
    return out


def timeline(svc: Services, model: str, version: str, scope: str = "fleet",
             start: float | None = None, end: float | None = None) -> dict[str, Any]:
    """Per-bucket realized performance (with labels, drop and alert level) of one scope."""
    row = get_model(svc, model, version)
    ctx = ModelContext.of(row)
    pol = policy(svc).as_drift_policy()
    by_bucket: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for r in svc.storage.feedback_rows(model, version, start, end, scope_devices(svc, scope)):
        by_bucket[r["bucket_start"]].append(r)
    points = [_perf_point(ctx, pol, b, _sum(by_bucket[b]), svc.config.bucket_s) for b in sorted(by_bucket)]
    return {"model": model, "version": version, "scope": scope, "task": ctx.task,
            "bucket_s": svc.config.bucket_s, "policy": policy(svc).to_dict(),
            "baseline": _baseline_dict(ctx), "points": points}


def _baseline_dict(ctx: ModelContext) -> dict[str, Any] | None:
    b = ctx.baseline
    return None if b is None else {"metric": b.metric, "value": b.value, "validation_rows": b.rows}


def _perf_point(ctx: ModelContext, pol: Any, bucket: float, sums: FeedbackSums, bucket_s: float) -> dict[str, Any]:
    m = metrics(sums, ctx.task, ctx.classes, ctx.prediction_edges)
    point = {"bucket_start": bucket, "bucket_end": bucket + bucket_s, "labels": sums.joined,
             "accuracy": m.get("accuracy"), "mae": m.get("mae"), "rmse": m.get("rmse"),
             "ece": (m.get("calibration") or {}).get("ece"), "realized": None, "drop": None,
             "noise": None, "level": None}
    if ctx.baseline is not None:
        p = bucket_point(bucket, sums, ctx.baseline)
        level = pol.level(p.psi, p.noise_psi, p.rows)
        point |= {"realized": ctx.baseline.value - p.psi if math.isfinite(p.psi) else None,
                  "drop": p.psi if math.isfinite(p.psi) else None,
                  "noise": p.noise_psi if math.isfinite(p.noise_psi) else None,
                  "level": level.value if level else None}
    return point


def _diagnosis(input_level: str | None, perf_level: str | None) -> str:
    """Tell the two kinds of change apart in one bucket."""
    inputs = input_level in ("warn", "alert")
    perf = perf_level in ("warn", "alert")
    if input_level is None and perf_level is None:
        return "unknown"
    if inputs and perf:
        return "inputs_moved_model_wrong"
    if inputs:
        return "inputs_moved_model_holds" if perf_level is not None else "inputs_moved"
    if perf:
        return "concept_drift" if input_level is not None else "model_wrong"
    return "stable"


def concept_drift(svc: Services, model: str, version: str, scope: str = "fleet",
                  start: float | None = None, end: float | None = None) -> dict[str, Any]:
    """Input drift and realized performance per bucket on one time axis, with a diagnosis:
    `inputs_moved_model_holds` (covariate shift the model tolerates), `concept_drift` (the
    inputs look the same but the model is wrong), `inputs_moved_model_wrong`, `stable`, or
    partial readings when one side has too few rows or labels in that bucket."""
    row = get_model(svc, model, version)
    ctx = ModelContext.of(row)
    profile = profile_of(row)
    dpol = effective_policy(svc, row)
    ppol = policy(svc).as_drift_policy()
    devices = scope_devices(svc, scope)
    drift_rows: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for r in svc.storage.bucket_rows(model, version, start, end, devices):
        drift_rows[r["bucket_start"]].append(r)
    fb_rows: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for r in svc.storage.feedback_rows(model, version, start, end, devices):
        fb_rows[r["bucket_start"]].append(r)
    points = []
    for bucket in sorted(set(drift_rows) | set(fb_rows)):
        inputs: dict[str, Any] = {"predictions": 0, "max_feature_psi": None, "max_feature_index": None,
                                  "prediction_psi": None, "level": None}
        if bucket in drift_rows:
            sums = sum_rows(drift_rows[bucket])
            d = describe(profile, sums, dpol)
            worst = max((f for f in d["features"] if f["psi"] is not None), key=lambda f: f["psi"], default=None)
            levels = [f["level"] for f in d["features"] if f["level"] is not None]
            rank = {"ok": 0, "warn": 1, "alert": 2}
            inputs = {"predictions": sums.predictions,
                      "max_feature_psi": worst["psi"] if worst else None,
                      "max_feature_index": worst["index"] if worst else None,
                      "prediction_psi": d["prediction"]["psi"] if d["prediction"] else None,
                      "level": max(levels, key=rank.__getitem__) if levels else None}
        perf = _perf_point(ctx, ppol, bucket, _sum(fb_rows.get(bucket, [])), svc.config.bucket_s)
        points.append({"bucket_start": bucket, "bucket_end": bucket + svc.config.bucket_s,
                       "inputs": inputs, "performance": perf,
                       "diagnosis": _diagnosis(inputs["level"], perf["level"])})
    return {"model": model, "version": version, "scope": scope, "task": ctx.task,
            "bucket_s": svc.config.bucket_s, "baseline": _baseline_dict(ctx),
            "features": [{"index": i, "name": f.name} for i, f in enumerate(profile.features)],
            "drift_policy": dpol.to_dict(), "performance_policy": policy(svc).to_dict(), "points": points}


# ---------------------------------------------------------------- alerts


def _details(t: AlertTransition, base: Baseline) -> dict[str, Any]:
    drop = t.psi if math.isfinite(t.psi) else None
    return {
        "action": t.action, "scope": t.scope, "model_version": t.model_version, "level": t.level.value,
        "metric": base.metric, "baseline": base.value,
        "realized": base.value - drop if drop is not None else None, "drop": drop,
        "noise": t.noise_psi if math.isfinite(t.noise_psi) else None, "labels": t.rows,
        "first_bucket": t.first_bucket, "last_bucket": t.last_bucket, "bucket": t.bucket,
    }


def _apply(svc: Services, model: str, version: str, base: Baseline, t: AlertTransition) -> Notification:
    now = svc.clock()
    details = _details(t, base)
    if t.action == "open":
        alert_id = svc.storage.insert_alert({
            "model": model, "model_version": version, "scope": t.scope, "target": base.metric,
            "target_index": None, "severity": t.level.value, "state": "open", "value": details["drop"],
            "opened_at": now, "bucket_start": float(t.bucket), "details": details, "kind": "performance",
        })
    else:
        rows = [a for a in svc.storage.open_alerts(model, version, t.scope, kind="performance")
                if a["severity"] == t.level.value]
        alert_id = rows[0]["id"] if rows else 0
        for a in rows:
            svc.storage.update_alert(a["id"], state="resolved", resolved_at=now)
    event = f"performance.alert.{t.action}"
    payload = {"v": PAYLOAD_VERSION, "event": event, "fleet": svc.config.fleet, "model": model,
               "alert": details, "alert_id": alert_id}
    return Notification(alert_id, payload, event)


def evaluate_scope(svc: Services, model_row: dict[str, Any], scope: str, closed_end: float) -> list[Notification]:
    """Judge this scope's closed, not yet judged feedback buckets; store transitions."""
    model, version = model_row["name"], model_row["version"]
    base = ModelContext.of(model_row).baseline
    if base is None:
        return []
    key = f"performance:{scope}"
    stored = svc.storage.series_states(model, version, key).get(SERIES)
    state = SeriesState.from_dict(stored) if stored else None
    since = state.last_seen + svc.config.bucket_s / 2 if state and state.last_seen is not None else None
    by_bucket: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for r in svc.storage.feedback_rows(model, version, since, closed_end, scope_devices(svc, scope)):
        by_bucket[r["bucket_start"]].append(r)
    points = []
    for bucket in sorted(by_bucket):
        try:
            points.append(bucket_point(bucket, sum_feedback_rows(by_bucket[bucket]), base))
        except FeedbackMismatch:
            log.warning("feedback of %s %s in bucket %s does not line up; skipped", model, version, bucket)
    if state is not None and state.last_seen is not None:
        points = [p for p in points if p.bucket > state.last_seen]
    if not points:
        return []
    ev = evaluate(points, policy(svc).as_drift_policy(), scope=scope, model_version=version,
                  feature=None, state=state)
    notes = [_apply(svc, model, version, base, t) for t in ev.transitions]
    svc.storage.put_series_states(model, version, key, {SERIES: ev.state.to_dict()})
    return notes


def evaluate_closed(svc: Services) -> list[Notification]:
    """One pass over every registered model version with feedback (fleet, devices, tags)."""
    closed_end = svc.clock() - svc.config.bucket_grace_s - svc.config.bucket_s + 1e-9
    notes: list[Notification] = []
    for v in svc.storage.feedback_versions():
        model_row = svc.storage.get_model(v["model"], v["model_version"]) if v["model"] else None
        if model_row is None:
            continue
        rows = svc.storage.feedback_rows(v["model"], v["model_version"], None, closed_end)
        for scope in scopes_for(svc, v["model"], v["model_version"], rows):
            try:
                notes += evaluate_scope(svc, model_row, scope, closed_end)
            except Exception:
                log.exception("performance evaluation failed for %s %s %s", v["model"], v["model_version"], scope)
    return notes
