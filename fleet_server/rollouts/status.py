"""The rollout status document: stages, cohorts, gates, waits, per-device state and audit log."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fleet_server.rollout_model import RolloutState, allowed_actions, is_blue_green
from fleet_server.rollouts.device_status import failed_devices
from fleet_server.rollouts.records import ACTIVE, get_row, spec_of
from fleet_server.rollouts.schedule import schedule_of

if TYPE_CHECKING:
    from fleet_server.context import Services


def list_rollouts(svc: Services, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    rows = svc.storage.list_rollouts(states=[state] if state else None, limit=limit)
    return [_summary(r) for r in rows]


def _summary(row: dict[str, Any]) -> dict[str, Any]:
    spec = row["spec"]
    gates = row.get("gates") or {}
    return {
        "id": row["id"], "name": row["name"], "model": row["model"], "version": row["version"],
        "state": row["state"], "reason": row["reason"], "stage": row["stage"], "stages": len(spec["stages"]),
        "mode": spec["stages"][row["stage"]]["mode"], "verdict": gates.get("verdict"),
        "created_at": row["created_at"], "created_by": row["created_by"], "updated_at": row["updated_at"],
        "finished_at": row["finished_at"],
    }


def actions(svc: Services, row: dict[str, Any]) -> list[str]:
    """The operator actions that apply to the rollout now (see rollout_model.allowed_actions)."""
    spec = spec_of(row)
    still_current = False
    if row["state"] == RolloutState.COMPLETED.value:
        target = spec.to_dict()["target"]
        still_current = any(t["rollout_id"] == row["id"] for t in svc.storage.fleet_targets()
                            if t["model"] == spec.model and t["target"] == target)
    return allowed_actions(RolloutState(row["state"]), blue_green=is_blue_green(spec.stages),
                           still_current=still_current)


def rollout_status(svc: Services, rollout_id: str, *, audit_limit: int = 1000) -> dict[str, Any]:
    """Everything an operator (or the console) shows: stages, cohorts, gates with value, threshold
    and sample, the timeout bucket, what the stage waits for, per-device state and the audit log."""
    row = get_row(svc, rollout_id)
    spec = spec_of(row)
    members = svc.storage.rollout_devices(rollout_id)
    gates = row.get("gates") or {}
    now = svc.clock()
    population = gates.get("population")
    stage_rows = []
    history = {s["index"]: s for s in row["stages"] or []}
    for i, st in enumerate(spec.stages):
        h = history.get(i, {})
        if i < row["stage"] or (i == row["stage"] and row["state"] == "completed"):
            state = "done"
        elif i == row["stage"]:
            state = "active" if row["state"] == "running" else row["state"]
        else:
            state = "pending" if row["state"] in ACTIVE else "skipped"
        stage_rows.append({
            "index": i, "mode": st.mode, "percent": st.percent, "count": st.count,
            "size": st.size(population) if population is not None else None,
            "min_soak_s": st.min_soak_s, "min_reporting": st.min_reporting, "approval": st.approval,
            "state": state, "started_at": h.get("started_at"), "ended_at": h.get("ended_at"),
            "ended_by": h.get("ended_by"), "verdict": gates.get("verdict") if i == row["stage"] and state != "done"
            else h.get("verdict"),
            "gates": gates.get("results", []) if i == row["stage"] and state != "done" else h.get("gates", []),
        })
    by_status: dict[str, int] = {}
    for m in members:
        by_status[m["status"]] = by_status.get(m["status"], 0) + 1
    timed_out = [m["device"] for m in members if m["status"] == "timed_out"]
    failed = _failure_reasons(svc, rollout_id, spec.version, [m["device"] for m in members if m["status"] == "failed"])
    # Devices still counted as updating (or timed out) whose last attempt hit a full disk: they
    # retry by themselves once space returns; say so, with the bytes free and needed.
    reasons = {**_disk_full_reasons(svc, rollout_id, [m["device"] for m in members
                                                      if m["status"] in ("pending", "timed_out")]), **failed}
    return {
        **_summary(row),
        "target": spec.to_dict()["target"],
        "on_failure": spec.on_failure,
        "actions": actions(svc, row),
        "device_timeout_s": spec.device_timeout_s,
        "population": population,
        "stage_started_at": row["stage_started_at"],
        "soak": {"elapsed_s": round(now - row["stage_started_at"], 3),
                 "min_s": spec.stages[row["stage"]].min_soak_s},
        "stages": stage_rows,
        "cohorts": {
            "canary": gates.get("canary"),
            "control": gates.get("control"),
            "assigned": len(members),
            "by_status": by_status,
        },
        "gates": gates.get("results", []),
        "waiting_for": gates.get("waiting_for", []),
        **_schedule_view(row, spec, now),
        "timeouts": {"devices": timed_out, "count": len(timed_out),
                     "limit": spec.gate("timeout_share").get("max"), "timeout_s": spec.device_timeout_s},
        "failures": {"devices": [{"device": d, "reason": why} for d, why in failed.items()], "count": len(failed),
                     "limit": spec.gate("update_failure_rate").get("max")},
        "devices": [{**{k: m[k] for k in ("device", "stage", "mode", "status", "previous_version", "assigned_at",
                                          "desired_at", "live_at")}, "reason": reasons.get(m["device"])}
                    for m in members],
        "audit": svc.storage.rollout_audit(rollout_id, limit=audit_limit),
        "spec": spec.to_dict(),
    }


def _schedule_view(row: dict[str, Any], spec: Any, now: float) -> dict[str, Any]:
    """`schedule` (settings, window open or not, the current and next window in the window's
    zone) and `waiting`: why a running rollout takes no new devices now, or null."""
    schedule = schedule_of(spec)
    if schedule is None:
        return {"schedule": None, "waiting": None}
    waiting = schedule.waiting(now) if row["state"] == RolloutState.RUNNING.value else None
    return {"schedule": schedule.view(now), "waiting": waiting}


def _disk_full_reasons(svc: Services, rollout_id: str, devices: list[str]) -> dict[str, str]:
    """Device -> "disk_full: ..." for devices whose reported outcome for this rollout is disk_full."""
    out = {}
    for d in devices:
        rep = (svc.storage.get_device(d) or {}).get("reported") or {}
        if rep.get("update_outcome") == "disk_full" and rep.get("rollout_id") == rollout_id:
            out[d] = f"disk_full, retried when space returns: {rep.get('last_error') or 'no detail reported'}"
    return out


def _failure_reasons(svc: Services, rollout_id: str, version: str, devices: list[str]) -> dict[str, str]:
    """Why each failed device failed: its failure event, else the error its reported state shows."""
    if not devices:
        return {}
    events = failed_devices(svc.storage.rollout_events(rollout_id), version)
    out = {}
    for d in devices:
        reported = (svc.storage.get_device(d) or {}).get("reported") or {}
        out[d] = events.get(d) or reported.get("last_error") or "failed (no reason reported)"
    return out
