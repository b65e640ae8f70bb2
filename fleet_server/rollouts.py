"""Rollout operations (create, pause, resume, advance, abort) and the controller's reconcile pass.

Every decision is derived from state in storage: operator actions only change a rollout's row
(and write the audit log); `reconcile` computes what each device should run, publishes only
what differs from what the device was last told, follows `reported`/`events`, evaluates the
gates and moves the rollout on. Killing the server at any point loses nothing: the next pass
recomputes the same cohorts from the stored assignments and continues.
"""

from __future__ import annotations

import json
import logging
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleet_server.desired import publish_desired
from fleet_server.gates import CohortStats, GateResult, evaluate_gates, verdict
from fleet_server.rollout_model import (
    ACTIVE_STATES,
    RolloutError,
    RolloutSpec,
    RolloutState,
    Stage,
    Target,
    cohort_rank,
    next_state,
    parse_spec,
)
from fleet_server.rollout_stats import canary_feature_psi, sum_feedback, sum_windows

if TYPE_CHECKING:
    from fleet_server.context import Services

log = logging.getLogger(__name__)

CONTROLLER = "controller"  # the audit log's actor for the controller's own decisions
FAILED_OUTCOMES = ("failure", "rolled_back", "rollback_failed")
PROBATION_STATES = ("Activate", "Probation")  # live but not committed: a restart rolls back
_ACTIVE = tuple(s.value for s in ACTIVE_STATES)


class RolloutNotFound(RolloutError):
    status = 404


class RolloutConflict(RolloutError):
    status = 409


# ------------------------------------------------------------------ reading


def spec_of(row: dict[str, Any]) -> RolloutSpec:
    return parse_spec(row["spec"])


def get_row(svc: Services, rollout_id: str) -> dict[str, Any]:
    row = svc.storage.get_rollout(rollout_id)
    if row is None:
        raise RolloutNotFound(f"no rollout {rollout_id!r}; list rollouts with 'edgefleet server rollout list'")
    return row


def _all_devices(svc: Services) -> list[dict[str, Any]]:
    return svc.storage.list_devices(limit=10_000_000)


def _matching(target: Target, devices: list[dict[str, Any]]) -> list[str]:
    return [d["id"] for d in devices if target.matches(d["id"], d["tags"])]


# ------------------------------------------------------------------ operations


def create_rollout(svc: Services, data: dict[str, Any], actor: str = "") -> dict[str, Any]:
    """Validate and store a new rollout (state running, stage 0); the controller starts it."""
    spec = parse_spec(data)
    model = svc.storage.get_model(spec.model, spec.version)
    if model is None:
        raise RolloutError(
            f"model {spec.model!r} version {spec.version!r} is not registered: upload the bundle first "
            "(edgefleet server add-model or POST /api/v1/models)"
        )
    with svc.rollouts_lock:  # operator actions and the reconcile pass never interleave
        devices = _all_devices(svc)
        wanted = set(_matching(spec.target, devices))
        if not wanted:
            raise RolloutError("the target matches no registered device: check the tags, group or device ids")
        for other in svc.storage.list_rollouts(states=_ACTIVE, limit=10_000):
            theirs = set(_matching(spec_of(other).target, devices))
            theirs |= {r["device"] for r in svc.storage.rollout_devices(other["id"])}
            overlap = sorted(wanted & theirs)
            if overlap:
                sample = ", ".join(overlap[:5]) + (", ..." if len(overlap) > 5 else "")
                raise RolloutConflict(
                    f"rollout {other['id']} ({other['model']} {other['version']}, {other['state']}) already "
                    f"targets {len(overlap)} of these devices ({sample}): a device is in one active rollout "
                    "at a time; wait for it to complete, abort it, or narrow this target"
                )
        now = svc.clock()
        rollout_id = f"r-{uuid.uuid4().hex[:10]}"
        row = {
            "id": rollout_id,
            "name": spec.name,
            "model": spec.model,
            "version": spec.version,
            "spec": spec.to_dict(),
            "state": RolloutState.RUNNING.value,
            "stage": 0,
            "stage_started_at": now,
            "created_at": now,
            "created_by": actor,
            "updated_at": now,
            "stages": [_stage_entry(spec, 0, now)],
        }
        svc.storage.insert_rollout(row, (actor or "api", "create", {"spec": spec.to_dict(),
                                                                     "target_devices": len(wanted)}))
    return rollout_status(svc, rollout_id)


def _stage_entry(spec: RolloutSpec, index: int, now: float) -> dict[str, Any]:
    return {"index": index, "started_at": now, "ended_at": None, "verdict": None, "gates": [],
            "ended_by": None}


def _transition(svc: Services, row: dict[str, Any], action: str, actor: str, detail: dict[str, Any],
                **fields: Any) -> bool:
    """Apply `action` to a rollout if its row is still as read (compare-and-set on state and stage)."""
    new = next_state(RolloutState(row["state"]), action)
    values = {"state": new.value, **fields}
    return svc.storage.update_rollout(
        row["id"], values, svc.clock(), expect={"state": row["state"], "stage": row["stage"]},
        audit=[(actor or "api", action, {"from": row["state"], "to": new.value, "stage": row["stage"], **detail})],
    )


def pause(svc: Services, rollout_id: str, actor: str = "", reason: str = "") -> dict[str, Any]:
    """Hold the rollout at its stage: devices keep what they run, nothing advances."""
    with svc.rollouts_lock:
        row = get_row(svc, rollout_id)
        why = reason or f"paused by {actor or 'an operator'}"
        _must(_transition(svc, row, "pause", actor, {"reason": why}, reason=why), rollout_id)
    return rollout_status(svc, rollout_id)


def resume(svc: Services, rollout_id: str, actor: str = "") -> dict[str, Any]:
    """Continue a paused rollout; the stage measures its gates over a fresh window from now."""
    with svc.rollouts_lock:
        row = get_row(svc, rollout_id)
        now = svc.clock()
        stages = list(row["stages"] or [])
        if stages:
            stages[-1] = {**stages[-1], "resumed_at": now}
        _must(_transition(svc, row, "resume", actor, {}, reason=None, stage_started_at=now, stages=stages,
                          gates=None), rollout_id)
    return rollout_status(svc, rollout_id)


def advance(svc: Services, rollout_id: str, actor: str = "") -> dict[str, Any]:
    """Operator approval: end the current stage now (whatever its gates say) and start the next,
    or complete the rollout after its last stage."""
    with svc.rollouts_lock:
        row = get_row(svc, rollout_id)
        spec = spec_of(row)
        if row["state"] not in (RolloutState.RUNNING.value, RolloutState.PAUSED.value):
            raise RolloutError(f"cannot advance a rollout that is {row['state']}")
        _next_stage(svc, row, spec, actor or "api", "advance", ended_by=f"advanced by {actor or 'an operator'}")
    return rollout_status(svc, rollout_id)


def abort(svc: Services, rollout_id: str, actor: str = "", reason: str = "") -> dict[str, Any]:
    """Send every device of the rollout back to its previous version (also right after a
    completed blue-green switch: the instant way back)."""
    with svc.rollouts_lock:
        row = get_row(svc, rollout_id)
        why = reason or f"aborted by {actor or 'an operator'}"
        _must(_transition(svc, row, "abort", actor, {"reason": why}, reason=why), rollout_id)
    return rollout_status(svc, rollout_id)


def _must(ok: bool, rollout_id: str) -> None:
    if not ok:
        raise RolloutConflict(f"rollout {rollout_id} changed meanwhile; show it and try again")


def _next_stage(svc: Services, row: dict[str, Any], spec: RolloutSpec, actor: str, action: str,
                ended_by: str) -> bool:
    now = svc.clock()
    stages = list(row["stages"] or [])
    gates = (row.get("gates") or {})
    if stages:
        stages[-1] = {**stages[-1], "ended_at": now, "verdict": gates.get("verdict"),
                      "gates": gates.get("results", []), "ended_by": ended_by}
    detail = {"stage": row["stage"], "verdict": gates.get("verdict"), "gates": _gate_summary(gates)}
    if row["stage"] + 1 >= len(spec.stages):
        if row["state"] == RolloutState.PAUSED.value:  # advance from paused: run, then complete
            ok = svc.storage.update_rollout(row["id"], {"state": RolloutState.RUNNING.value}, now,
                                            expect={"state": row["state"], "stage": row["stage"]},
                                            audit=[(actor, action, detail)])
            if not ok:
                return False
            row = {**row, "state": RolloutState.RUNNING.value}
        return _complete(svc, row, spec, stages, actor, detail)
    stages.append(_stage_entry(spec, row["stage"] + 1, now))
    new = next_state(RolloutState(row["state"]), "advance")
    return svc.storage.update_rollout(
        row["id"],
        {"state": new.value, "stage": row["stage"] + 1, "stage_started_at": now, "stages": stages,
         "gates": None, "reason": None},
        now,
        expect={"state": row["state"], "stage": row["stage"]},
        audit=[(actor, action, {**detail, "next_stage": row["stage"] + 1})],
    )


def _complete(svc: Services, row: dict[str, Any], spec: RolloutSpec, stages: list[dict[str, Any]], actor: str,
              detail: dict[str, Any]) -> bool:
    now = svc.clock()
    target = spec.to_dict()["target"]
    previous = next((t for t in svc.storage.fleet_targets()
                     if t["model"] == spec.model and t["target"] == target), None)
    ok = svc.storage.update_rollout(
        row["id"],
        {"state": RolloutState.COMPLETED.value, "stages": stages, "finished_at": now,
         "previous_target": {"version": previous["version"], "rollout_id": previous["rollout_id"]}
         if previous else None},
        now,
        expect={"state": row["state"], "stage": row["stage"]},
        audit=[(actor, "complete", {**detail, "fleet_target": spec.version})],
    )
    if ok:
        svc.storage.set_fleet_target(spec.model, target, spec.version, row["id"], now)
    return ok


def _gate_summary(gates: dict[str, Any]) -> dict[str, Any]:
    return {g["name"]: {"status": g["status"], "value": g["value"], "threshold": g["threshold"],
                        "sample": g["sample"]} for g in gates.get("results", [])}


# ------------------------------------------------------------------ status


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
            state = "pending" if row["state"] in _ACTIVE else "skipped"
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
    return {
        **_summary(row),
        "target": spec.to_dict()["target"],
        "on_failure": spec.on_failure,
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
        "timeouts": {"devices": timed_out, "count": len(timed_out),
                     "limit": spec.gate("timeout_share").get("max"), "timeout_s": spec.device_timeout_s},
        "failures": {"devices": [{"device": d, "reason": why} for d, why in failed.items()], "count": len(failed),
                     "limit": spec.gate("update_failure_rate").get("max")},
        "devices": [{**{k: m[k] for k in ("device", "stage", "mode", "status", "previous_version", "assigned_at",
                                          "desired_at", "live_at")}, "reason": failed.get(m["device"])}
                    for m in members],
        "audit": svc.storage.rollout_audit(rollout_id, limit=audit_limit),
        "spec": spec.to_dict(),
    }


def _failure_reasons(svc: Services, rollout_id: str, version: str, devices: list[str]) -> dict[str, str]:
    """Why each failed device failed: its failure event, else the error its reported state shows."""
    if not devices:
        return {}
    events = _failures(svc.storage.rollout_events(rollout_id), version)
    out = {}
    for d in devices:
        reported = (svc.storage.get_device(d) or {}).get("reported") or {}
        out[d] = events.get(d) or reported.get("last_error") or "failed (no reason reported)"
    return out


# ------------------------------------------------------------------ the reconcile pass


@dataclass
class _Pass:
    """What one reconcile pass reads once and shares between rollouts."""

    now: float
    devices: dict[str, dict[str, Any]]
    desired: dict[str, dict[str, Any]]
    taken: set[str] = field(default_factory=set)  # devices claimed by an older active rollout
    published: int = 0


def reconcile(svc: Services) -> dict[str, int]:
    """One idempotent pass over every active rollout and the fleet targets; returns counters."""
    with svc.rollouts_lock:
        p = _Pass(now=svc.clock(), devices={d["id"]: d for d in _all_devices(svc)},
                  desired=svc.storage.device_desired())
        active = sorted(svc.storage.list_rollouts(states=_ACTIVE, limit=10_000), key=lambda r: r["created_at"])
        for row in active:
            try:
                _reconcile_rollout(svc, p, row)
            except Exception:
                log.exception("reconcile of rollout %s failed; the next pass retries", row["id"])
        _converge_fleet_targets(svc, p)
        return {"rollouts": len(active), "published": p.published}


def _publish(svc: Services, p: _Pass, device: str, model: str, version: str, mode: str,
             rollout_id: str | None, allow_downgrade: bool = False) -> bool:
    """Publish a device's desired only when it differs from what it was last told."""
    from fleet_server.registry import desired_state

    last = p.desired.get(device)
    if (last is not None and last["model"] == model and last["version"] == version and last["mode"] == mode
            and last["rollout_id"] == rollout_id):
        return False
    if svc.publisher is None:
        return False
    desired = desired_state(svc, model, version, mode=mode, rollout_id=rollout_id,  # type: ignore[arg-type]
                            allow_downgrade=allow_downgrade)
    if publish_desired(svc, device, desired):
        p.desired[device] = {"model": model, "version": version, "mode": mode, "rollout_id": rollout_id}
        p.published += 1
        return True
    return False


def _order(rollout_id: str, assigned: dict[str, dict[str, Any]], population: list[str]) -> list[str]:
    """Assigned devices first (by the stage that took them, then rank), then the rest by rank: a
    device that joins later never pushes an assigned one out of its cohort."""
    first = sorted(assigned, key=lambda d: (assigned[d]["stage"], cohort_rank(rollout_id, d), d))
    rest = sorted((d for d in population if d not in assigned), key=lambda d: (cohort_rank(rollout_id, d), d))
    return first + rest


def _reconcile_rollout(svc: Services, p: _Pass, row: dict[str, Any]) -> None:
    spec = spec_of(row)
    rid, state = row["id"], RolloutState(row["state"])
    assigned = {m["device"]: m for m in svc.storage.rollout_devices(rid)}
    population = [d for d in _matching(spec.target, list(p.devices.values()))
                  if d not in p.taken or d in assigned]
    p.taken.update(population)
    p.taken.update(assigned)
    if state is RolloutState.ABORTING:
        _reconcile_abort(svc, p, row, spec, assigned)
        return
    stage_i = row["stage"]
    stage = spec.stages[stage_i]
    everyone = set(population) | set(assigned)
    order = _order(rid, assigned, population)
    cohort = order[: stage.size(len(everyone))]
    changed: list[dict[str, Any]] = []
    for device in cohort:
        m = assigned.get(device)
        if m is None:
            reported = p.devices.get(device, {})
            m = {"rollout_id": rid, "device": device, "stage": stage_i, "mode": stage.mode,
                 "previous_version": reported.get("active_version"), "assigned_at": p.now, "desired_at": p.now,
                 "status": "pending", "status_at": p.now, "live_at": p.now if stage.mode == "live" else None}
            assigned[device] = m
            changed.append(m)
        elif m["mode"] != stage.mode and not (m["mode"] == "live" and stage.mode == "shadow"):
            m.update(mode=stage.mode, desired_at=p.now, status="pending", status_at=p.now)
            if stage.mode == "live" and m["live_at"] is None:
                m["live_at"] = p.now
            changed.append(m)
    # Publish to every assigned device (a device that came back or was missed converges), once
    # the server knows what it runs: that version is the one an abort sends it back to. A device
    # taken before its first report waits for it (pending, then timed out like any silent one);
    # told at once, an abort could not return it and would leave it on this version.
    for device, m in assigned.items():
        known = p.devices.get(device) or {}
        if known.get("reported") is None:
            continue
        if m["previous_version"] is None and known.get("active_version") not in (None, spec.version):
            m["previous_version"] = known["active_version"]
            changed.append(m)
        _publish(svc, p, device, spec.model, spec.version, m["mode"], rid)
    changed += _update_statuses(svc, p, row, spec, assigned, cohort)
    svc.storage.put_rollout_devices(_unique(changed))

    in_cohort = set(cohort)
    canary, control = _cohort_stats(svc, row, spec, stage, assigned, in_cohort, everyone)
    results = evaluate_gates(spec, stage.mode, canary, control)
    result = verdict(results)
    waiting = _waiting_for(p, row, spec, stage, assigned, cohort, results, result)
    gates = {"evaluated_at": p.now, "verdict": result, "results": [r.to_dict() for r in results],
             "waiting_for": waiting, "population": len(everyone),
             "canary": _stats_view(canary, stage.mode), "control": _stats_view(control, "live")}
    svc.storage.update_rollout(rid, {"gates": gates}, p.now, expect={"state": row["state"], "stage": stage_i})
    row = {**row, "gates": gates}
    if state is not RolloutState.RUNNING:
        return
    if result == "fail":
        failed = [r for r in results if r.status == "fail"]
        why = "; ".join(_explain(r) for r in failed)
        action = "gate_failed_pause" if spec.on_failure == "pause" else "gate_failed_rollback"
        stages = list(row["stages"] or [])
        if stages:
            stages[-1] = {**stages[-1], "verdict": "fail", "gates": gates["results"]}
        _transition(svc, row, action, CONTROLLER, {"failed": [r.to_dict() for r in failed]},
                    reason=f"stage {stage_i + 1} ({stage.mode}): {why}", stages=stages)
        return
    if not waiting:
        _next_stage(svc, row, spec, CONTROLLER, "stage_passed", ended_by="gates passed")


def _unique(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return list({r["device"]: r for r in rows}.values())


def _explain(r: GateResult) -> str:
    value = "n/a" if r.value is None else f"{r.value:.4g}"
    bound = "max" if r.comparison == "<=" else "min"
    return f"{r.name} = {value} ({bound} {r.threshold:g}, sample {r.sample} {r.unit})"


def _failures(events: list[dict[str, Any]], version: str) -> dict[str, str]:
    """Device -> reason, for devices whose latest finished attempt at `version` failed or was
    refused (a later successful outcome clears an earlier failure)."""
    out: dict[str, str] = {}
    for e in events:  # ordered by device, seq
        if e["version"] != version or e["kind"] not in ("outcome", "refused"):
            continue
        if e["kind"] == "refused" or e["outcome"] in FAILED_OUTCOMES:
            out[e["device"]] = e["reason"] or e["outcome"] or e["kind"]
        else:
            out.pop(e["device"], None)
    return out


def _device_status(rollout_id: str, version: str, member: dict[str, Any], device: dict[str, Any],
                   failure: str | None, now: float, timeout_s: float) -> str:
    """The status of one assigned device, derived afresh from what it reports now.

    `updated` only while it reports the version active (or, in shadow, as its running shadow
    candidate); a live device on probation counts only while it is online (one that went down
    there rolls back when it boots). `failed` when its latest attempt at the version ended in a
    failure, a local rollback or a refusal and it will not try again. Otherwise `pending` until
    the device timeout, then `timed_out`.
    """
    rep = device.get("reported") or {}
    state = rep.get("update_state")
    on_version = rep.get("candidate_version") == version
    if rep.get("active_version") == version:
        if not (on_version and state in PROBATION_STATES) or device.get("status") != "offline":
            return "updated"
    elif member["mode"] == "shadow" and on_version and state == "Shadow":
        return "updated"
    # Busy with the version, or idle after a transient failure it will try again (attempts left).
    trying_again = (on_version and state not in (None, "Idle")) or (
        state == "Idle" and rep.get("update_retry") is True and rep.get("rollout_id") == rollout_id)
    # The reported outcome covers a failure whose event has not been stored yet.
    failed_now = (rep.get("rollout_id") == rollout_id and state == "Idle"
                  and rep.get("update_outcome") in FAILED_OUTCOMES)
    if not trying_again and (failure is not None or failed_now):
        return "failed"
    if now - (member["desired_at"] or member["assigned_at"]) > timeout_s:
        return "timed_out"
    return "pending"


def _on_probation(device: dict[str, Any], version: str) -> bool:
    """The device serves `version` live but has not committed it: it may still roll back."""
    rep = device.get("reported") or {}
    return rep.get("candidate_version") == version and rep.get("update_state") in PROBATION_STATES


def _update_statuses(svc: Services, p: _Pass, row: dict[str, Any], spec: RolloutSpec,
                     assigned: dict[str, dict[str, Any]], cohort: list[str]) -> list[dict[str, Any]]:
    """Re-derive every assigned device's status from its latest reported state and update events
    (a device counted as updated that rolls back moves to failed); returns the rows that changed."""
    failures = _failures(svc.storage.rollout_events(row["id"]), spec.version)
    changed = []
    for device, m in assigned.items():
        status = _device_status(row["id"], spec.version, m, p.devices.get(device) or {}, failures.get(device),
                                p.now, spec.device_timeout_s)
        if status != m["status"]:
            m.update(status=status, status_at=p.now)
            changed.append(m)
    return changed


def _cohort_stats(svc: Services, row: dict[str, Any], spec: RolloutSpec, stage: Stage,
                  assigned: dict[str, dict[str, Any]], cohort: set[str],
                  everyone: set[str]) -> tuple[CohortStats, CohortStats]:
    windows = svc.storage.windows_since(row["stage_started_at"], spec.model)
    canary = CohortStats(devices=len(cohort))
    for d in cohort:
        status = assigned[d]["status"]
        canary.updated += status == "updated"
        canary.update_failed += status == "failed"
        canary.timed_out += status == "timed_out"
    control_ids = everyone - set(assigned)
    control = CohortStats(devices=len(control_ids))
    mine = [w for w in windows if w["device"] in cohort]
    if stage.mode == "live":
        sum_windows(canary, mine, version=spec.version)
        canary.max_feature_psi = canary_feature_psi(svc, spec.model, spec.version, cohort)
    else:
        sum_windows(canary, mine, exclude_version=spec.version, shadow_version=spec.version)
    sum_windows(control, (w for w in windows if w["device"] in control_ids), exclude_version=spec.version)
    feedback = svc.storage.feedback_since(spec.model, row["stage_started_at"])
    sum_feedback(canary, feedback, cohort, version=spec.version)
    sum_feedback(control, feedback, control_ids, exclude_version=spec.version)
    canary.stage_age_s = svc.clock() - row["stage_started_at"]
    return canary, control


def _stats_view(s: CohortStats, mode: str) -> dict[str, Any]:
    out = {"devices": s.devices, "updated": s.updated, "failed": s.update_failed, "timed_out": s.timed_out,
           "predictions": s.predictions, "errors": s.errors, "mode": mode}
    if mode == "shadow":
        out |= {"shadow_compared": s.shadow_compared, "shadow_agreed": s.shadow_agreed}
    return out


def _waiting_for(p: _Pass, row: dict[str, Any], spec: RolloutSpec, stage: Stage,
                 assigned: dict[str, dict[str, Any]], cohort: list[str], results: list[GateResult],
                 result: str) -> list[str]:
    """Why the stage cannot end yet, in words; empty when it can."""
    waiting = []
    soaked = p.now - row["stage_started_at"]
    if soaked < stage.min_soak_s:
        waiting.append(f"soak: {soaked:.0f} s of {stage.min_soak_s:g} s")
    statuses = [assigned[d]["status"] for d in cohort]
    pending = statuses.count("pending")
    if pending:
        waiting.append(f"devices: {pending} of {len(cohort)} still updating (timeout {spec.device_timeout_s:g} s)")
    # A device on probation may still roll back: the stage (and so the rollout) ends only when
    # its devices have committed, failed or timed out.
    trying = sum(1 for d in cohort if assigned[d]["status"] == "updated" and assigned[d]["mode"] == "live"
                 and _on_probation(p.devices.get(d) or {}, spec.version))
    if trying:
        waiting.append(f"probation: {trying} of {len(cohort)} devices have not committed the version yet")
    reporting = statuses.count("updated")
    needed = min(stage.min_reporting, len(cohort))
    if reporting < needed:
        waiting.append(f"reporting: {reporting} of the {needed} devices needed run the version")
    for r in results:
        if r.status == "pending":
            waiting.append(f"gate {r.name}: sample {r.sample} of {r.min_sample} {r.unit}")
    if not waiting and result == "pass" and stage.approval:
        waiting.append("approval: gates passed; an operator must advance the rollout")
    return waiting


def _reconcile_abort(svc: Services, p: _Pass, row: dict[str, Any], spec: RolloutSpec,
                     assigned: dict[str, dict[str, Any]]) -> None:
    """Send every assigned device back to its previous version; done when all are back or
    timed out (those converge on reconnect: their retained desired already says so)."""
    rid = row["id"]
    changed, open_devices = [], []
    abort_at = row["updated_at"]  # set by the abort transition; nothing else writes the row meanwhile
    for device, m in assigned.items():
        prev = m["previous_version"]
        rep = (p.devices.get(device) or {}).get("reported") or {}
        if prev is None:
            # Nothing to go back to: stop a shadow candidate, leave a live one in place.
            if m["status"] != "reverted":
                m.update(status="reverted", status_at=p.now)
                changed.append(m)
            continue
        if _publish(svc, p, device, spec.model, prev, "live", rid, allow_downgrade=True):
            m.update(desired_at=p.now)
            changed.append(m)
        if rep.get("active_version") == prev and rep.get("candidate_version") in (None, prev):
            status = "reverted"
        elif p.now - abort_at > spec.device_timeout_s:
            status = "timed_out"
        else:
            status = "reverting"
            open_devices.append(device)
        if status != m["status"]:
            m.update(status=status, status_at=p.now)
            changed.append(m)
    svc.storage.put_rollout_devices(_unique(changed))
    if not open_devices:
        counts: dict[str, int] = {}
        for m in assigned.values():
            counts[m["status"]] = counts.get(m["status"], 0) + 1
        ok = _transition(svc, row, "aborted", CONTROLLER, {"devices": counts}, finished_at=p.now)
        prev_target = row.get("previous_target")
        if ok and row.get("finished_at"):  # a completed rollout undone: restore the fleet target
            svc.storage.set_fleet_target(spec.model, spec.to_dict()["target"],
                                         prev_target["version"] if prev_target else None,
                                         prev_target["rollout_id"] if prev_target else None, p.now)


def _converge_fleet_targets(svc: Services, p: _Pass) -> None:
    """A device that was never told anything (joined after a rollout completed) gets the fleet's
    current version for its model and target; devices in an active rollout are left to it."""
    targets = svc.storage.fleet_targets()
    if not targets:
        return
    parsed = [(t, Target(all=t["target"].get("all", False), tags=t["target"].get("tags") or {},
                         group=t["target"].get("group"), devices=tuple(t["target"].get("devices") or ())))
              for t in targets]
    for device_id, device in p.devices.items():
        if device_id in p.desired or device_id in p.taken:
            continue
        match = [t for t, target in parsed if target.matches(device_id, device["tags"])]
        if match:
            newest = match[-1]  # fleet_targets() is ordered by updated_at
            _publish(svc, p, device_id, newest["model"], newest["version"], "live", newest["rollout_id"])


def load_plan(path: str | Path) -> dict[str, Any]:
    """A rollout plan file: TOML (`.toml`) or JSON, with the fields of `POST /api/v1/rollouts`."""
    path = Path(path)
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        data = json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise RolloutError(f"{path} is not a valid rollout plan ({exc})") from exc
    if not isinstance(data, dict):
        raise RolloutError(f"{path}: a rollout plan is an object with model, version, target and stages")
    return data
