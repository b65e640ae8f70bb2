"""Drift alerts: evaluate closed buckets per scope with the pure policy (fleet_server.alerts), store
transitions, and notify (MQTT `ef/{fleet}/alerts` and signed webhooks) from a notifier thread.

A bucket is closed `bucket_grace_s` after its end; each series (scope x feature) is evaluated once
per bucket, in order, and the evaluator's state is stored so a restart resumes where it stopped.
Windows that arrive after their bucket was evaluated still count in drift queries, not in alerts.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from fleet_server import performance_service
from fleet_server.alerts import AlertTransition, BucketDrift, Notification, SeriesState, evaluate
from fleet_server.drift_service import profile_of, report_for, scope_devices, scopes_for
from fleet_server.registry import effective_policy
from fleet_server.telemetry import sum_rows
from fleet_server.webhooks import alert_payload, deliver

if TYPE_CHECKING:
    from fleet_server.context import Services

log = logging.getLogger(__name__)


class AlertError(ValueError):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def evaluate_scope(svc: Services, model_row: dict[str, Any], scope: str, closed_end: float) -> list[Notification]:
    """Evaluate this scope's closed, not yet evaluated buckets; store transitions; return notifications."""
    model, version = model_row["name"], model_row["version"]
    profile = profile_of(model_row)
    policy = effective_policy(svc, model_row)
    stored = svc.storage.series_states(model, version, scope)
    seen = [s.get("last_seen") for s in stored.values() if s.get("last_seen") is not None]
    since = min(seen) + svc.config.bucket_s / 2 if seen else None
    rows = svc.storage.bucket_rows(model, version, since, closed_end, scope_devices(svc, scope))
    if not rows:
        return []
    by_bucket: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_bucket[r["bucket_start"]].append(r)
    series: dict[str, list[BucketDrift]] = defaultdict(list)
    for bucket in sorted(by_bucket):
        sums = sum_rows(by_bucket[bucket])
        report = report_for(profile, sums)
        if report is None:
            continue
        for i, fp in enumerate(profile.features):
            series[str(i)].append(BucketDrift.from_feature_drift(bucket, report.features[fp.name], sums.predictions))
        if report.prediction is not None:
            series["prediction"].append(BucketDrift.from_feature_drift(bucket, report.prediction, sums.predictions))
    notes: list[Notification] = []
    new_states: dict[str, dict[str, Any]] = {}
    for key, points in series.items():
        state = SeriesState.from_dict(stored[key]) if key in stored else None
        if state is not None and state.last_seen is not None:
            points = [p for p in points if p.bucket > state.last_seen]
        if not points:
            continue
        index = None if key == "prediction" else int(key)
        name = "prediction" if index is None else profile.features[index].name
        ev = evaluate(
            points, policy, scope=scope, model_version=version, feature=None if index is None else name,
            feature_index=index, state=state,
        )
        for t in ev.transitions:
            notes.append(_apply(svc, model, version, name, t))
        new_states[key] = ev.state.to_dict()
    if new_states:
        svc.storage.put_series_states(model, version, scope, new_states)
    return notes


def _apply(svc: Services, model: str, version: str, target: str, t: AlertTransition) -> Notification:
    now = svc.clock()
    if t.action == "open":
        alert_id = svc.storage.insert_alert(
            {
                "model": model,
                "model_version": version,
                "scope": t.scope,
                "target": target,
                "target_index": t.feature_index,
                "severity": t.level.value,
                "state": "open",
                "value": t.to_dict()["psi"],
                "opened_at": now,
                "bucket_start": float(t.bucket),
                "details": t.to_dict(),
            }
        )
    else:
        open_rows = [
            a
            for a in svc.storage.open_alerts(model, version, t.scope, kind="drift")
            if a["target_index"] == t.feature_index and a["severity"] == t.level.value
        ]
        alert_id = open_rows[0]["id"] if open_rows else 0
        for a in open_rows:
            svc.storage.update_alert(a["id"], state="resolved", resolved_at=now)
    payload = alert_payload(t, model=model, fleet=svc.config.fleet)
    payload["alert_id"] = alert_id
    return Notification(alert_id, payload, t.event)


def evaluate_closed(svc: Services) -> list[Notification]:
    """One pass of the background loop over every model version with drift buckets, then the
    performance alerts of every version with feedback (fleet_server.performance_service), then
    the estimated-performance, multivariate and data-quality alerts (fleet_server.monitoring_alerts)."""
    from fleet_server import monitoring_alerts

    return evaluate_drift_closed(svc) + performance_service.evaluate_closed(svc) + monitoring_alerts.evaluate_closed(svc)


def evaluate_drift_closed(svc: Services) -> list[Notification]:
    """Drift alerts: every model version with drift buckets, every scope."""
    closed_end = svc.clock() - svc.config.bucket_grace_s - svc.config.bucket_s
    notes: list[Notification] = []
    for v in svc.storage.bucketed_versions():
        model_row = svc.storage.get_model(v["model"], v["model_version"])
        if model_row is None:
            continue  # no registered bundle: no reference profile to compare against
        rows = svc.storage.bucket_rows(v["model"], v["model_version"], None, closed_end + 1e-9)
        for scope in scopes_for(svc, v["model"], v["model_version"], rows):
            try:
                notes += evaluate_scope(svc, model_row, scope, closed_end + 1e-9)
            except Exception:
                log.exception("alert evaluation failed for %s %s %s", v["model"], v["model_version"], scope)
    return notes


def list_alerts(svc: Services, **filters: Any) -> list[dict[str, Any]]:
    return svc.storage.list_alerts(**filters)


def acknowledge(svc: Services, alert_id: int, by: str) -> dict[str, Any]:
    alert = svc.storage.get_alert(alert_id)
    if alert is None:
        raise AlertError(f"no alert {alert_id}; list alerts with GET /api/v1/alerts", 404)
    if alert["acknowledged_at"] is None:
        svc.storage.update_alert(alert_id, acknowledged_at=svc.clock(), acknowledged_by=by)
    return svc.storage.get_alert(alert_id) or {}


class Notifier:
    """Delivers alert notifications off the evaluation loop (webhook retries can take a while)."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.queue: queue.Queue[Notification | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="alert-notifier", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.queue.put(None)
        self.thread.join(timeout)

    def submit(self, notes: list[Notification]) -> None:
        for n in notes:
            self.queue.put(n)

    def _run(self) -> None:
        while True:
            note = self.queue.get()
            if note is None:
                return
            try:
                self.notify(note)
            except Exception:
                log.exception("alert notification %s failed", note.alert_id)

    def notify(self, note: Notification) -> None:
        if self.svc.publisher is not None:
            self.svc.publisher.publish_alert(note.payload)
        for hook in self.svc.storage.list_webhooks():
            result = deliver(
                hook["url"],
                note.payload,
                hook["secret"].encode(),
                event=note.event,
                timeout=self.svc.config.webhook_timeout_s,
                retries=self.svc.config.webhook_retries,
                backoff=0.5,
            )
            self.svc.storage.record_delivery(
                {
                    "webhook_id": hook["id"],
                    "alert_id": note.alert_id,
                    "transition": note.event,
                    "ok": int(result.ok),
                    "attempts": result.attempts,
                    "status_code": result.status,
                    "error": result.error,
                    "at": self.svc.clock(),
                }
            )
