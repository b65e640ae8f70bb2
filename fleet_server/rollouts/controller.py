"""The controller's reconcile pass: one idempotent pass over every active rollout and the fleet targets.

It computes what each device should run, publishes only what differs from what the device was
last told, follows `reported`/`events`, evaluates the gates and moves the rollout on. Killing the
server at any point loses nothing: the next pass recomputes the same cohorts from the stored
assignments and continues.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fleet_server.desired import publish_desired
from fleet_server.gates import CohortStats, GateResult, evaluate_gates, verdict
from fleet_server.rollout_model import RolloutSpec, RolloutState, Stage, cohort_rank, parse_target
from fleet_server.rollout_stats import (
    canary_feature_psi,
    canary_multivariate,
    sum_feedback,
    sum_monitoring,
    sum_windows,
)
from fleet_server.rollouts.device_status import device_status, failed_devices, on_probation
from fleet_server.rollouts.records import ACTIVE, CONTROLLER, all_devices, matching, spec_of
from fleet_server.rollouts.schedule import Schedule, schedule_of
from fleet_server.rollouts.stages import next_stage, transition

if TYPE_CHECKING:
    from fleet_server.context import Services

log = logging.getLogger(__name__)


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
        p = _Pass(now=svc.clock(), devices={d["id"]: d for d in all_devices(svc)},
                  desired=svc.storage.device_desired())
        active = sorted(svc.storage.list_rollouts(states=ACTIVE, limit=10_000), key=lambda r: r["created_at"])
        for row in active:
            try:
                _reconcile_rollout(svc, p, row)
            except Exception:
                log.exception("reconcile of rollout %s failed; the next pass retries", row["id"])
        _converge_fleet_targets(svc, p)
        return {"rollouts": len(active), "published": p.published}


def _publish(svc: Services, p: _Pass, device: str, model: str, version: str, mode: str,
             rollout_id: str | None, allow_downgrade: bool = False,
             windows: tuple[Schedule, dict[str, str]] | None = None) -> bool:
    """Publish a device's desired only when it differs from what it was last told.

    `windows` (the rollout's schedule, the device's tags): a live desired carries the device's
    activation windows; it is published again once the windows it was sent have all closed."""
    import msgspec

    from fleet_server.registry import desired_state

    last = p.desired.get(device)
    if (last is not None and last["model"] == model and last["version"] == version and last["mode"] == mode
            and last["rollout_id"] == rollout_id and not _windows_used_up(p, last, mode, windows)):
        return False
    if svc.publisher is None:
        return False
    desired = desired_state(svc, model, version, mode=mode, rollout_id=rollout_id,  # type: ignore[arg-type]
                            allow_downgrade=allow_downgrade)
    if windows is not None and mode == "live":
        intervals = windows[0].activate_windows(windows[1], p.now)
        if intervals is not None:
            desired = msgspec.structs.replace(desired, activate_windows=intervals)
    if publish_desired(svc, device, desired):
        p.desired[device] = {"model": model, "version": version, "mode": mode, "rollout_id": rollout_id}
        p.published += 1
        return True
    return False


def _windows_used_up(p: _Pass, last: dict[str, Any], mode: str,
                     windows: tuple[Schedule, dict[str, str]] | None) -> bool:
    """Whether the activation windows a live desired published at `last["published_at"]` carried
    have all closed (the device missed them: it is sent the next ones)."""
    if windows is None or mode != "live":
        return False
    sent = windows[0].activate_windows(windows[1], last.get("published_at") or p.now)
    return bool(sent) and sent[-1][1] <= p.now


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
    population = [d for d in matching(spec.target, list(p.devices.values()))
                  if d not in p.taken or d in assigned]
    p.taken.update(population)
    p.taken.update(assigned)
    if state is RolloutState.ABORTING:
        _reconcile_abort(svc, p, row, spec, assigned)
        return
    stage_i = row["stage"]
    stage = spec.stages[stage_i]
    schedule = schedule_of(spec)
    if schedule is not None and not schedule.started(p.now):
        _not_started(svc, p, row, schedule)
        return
    # Outside the maintenance window no device is taken into a stage nor moved to its mode; the
    # devices already taken go on (and an abort, above, is never held).
    in_window = schedule is None or schedule.window_open(p.now)
    everyone = set(population) | set(assigned)
    order = _order(rid, assigned, population)
    cohort = order[: stage.size(len(everyone))]
    if not in_window:
        cohort = [d for d in cohort if d in assigned]
    elif schedule is not None and schedule.window is not None:
        row = _open_stage(svc, p, row)
    changed: list[dict[str, Any]] = []
    for device in cohort if in_window else ():
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
        windows = (schedule, p.devices.get(device, {}).get("tags") or {}) if schedule is not None else None
        if _publish(svc, p, device, spec.model, spec.version, m["mode"], rid, windows=windows) and windows:
            # A device that may activate only later is timed out from when its window opens.
            intervals = schedule.activate_windows(windows[1], p.now) if m["mode"] == "live" else None  # type: ignore[union-attr]
            if intervals and intervals[0][0] > (m["desired_at"] or 0):
                m["desired_at"] = intervals[0][0]
                changed.append(m)
    changed += _update_statuses(svc, p, row, spec, assigned, cohort)
    svc.storage.put_rollout_devices(_unique(changed))

    in_cohort = set(cohort)
    canary, control = _cohort_stats(svc, row, spec, stage, assigned, in_cohort, everyone)
    results = evaluate_gates(spec, stage.mode, canary, control)
    result = verdict(results)
    waiting = _waiting_for(p, row, spec, stage, assigned, cohort, results, result)
    if not in_window and schedule is not None:
        waiting.insert(0, f"schedule: {schedule.waiting(p.now)}")
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
        transition(svc, row, action, CONTROLLER, {"failed": [r.to_dict() for r in failed]},
                    reason=f"stage {stage_i + 1} ({stage.mode}): {why}", stages=stages)
        return
    if not waiting:
        next_stage(svc, row, spec, CONTROLLER, "stage_passed", ended_by="gates passed")


def _open_stage(svc: Services, p: _Pass, row: dict[str, Any]) -> dict[str, Any]:
    """A stage that waited for its maintenance window starts when it first takes devices in
    one: its soak and gate window count from then, not from the hours it waited."""
    stages = list(row["stages"] or [])
    if not stages or stages[-1].get("opened_at") is not None:
        return row
    stages[-1] = {**stages[-1], "opened_at": p.now, "started_at": p.now}
    if svc.storage.update_rollout(row["id"], {"stages": stages, "stage_started_at": p.now}, p.now,
                                  expect={"state": row["state"], "stage": row["stage"]}):
        return {**row, "stages": stages, "stage_started_at": p.now}
    return row


def _not_started(svc: Services, p: _Pass, row: dict[str, Any], schedule: Schedule) -> None:
    """Before `not_before` the rollout takes and tells no device; its status says when it starts."""
    gates = {"evaluated_at": p.now, "verdict": None, "results": [], "population": None,
             "waiting_for": [f"schedule: {schedule.waiting(p.now)}"], "canary": None, "control": None}
    svc.storage.update_rollout(row["id"], {"gates": gates}, p.now, expect={"state": row["state"], "stage": row["stage"]})


def _unique(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return list({r["device"]: r for r in rows}.values())


def _explain(r: GateResult) -> str:
    value = "n/a" if r.value is None else f"{r.value:.4g}"
    bound = "max" if r.comparison == "<=" else "min"
    return f"{r.name} = {value} ({bound} {r.threshold:g}, sample {r.sample} {r.unit})"


def _update_statuses(svc: Services, p: _Pass, row: dict[str, Any], spec: RolloutSpec,
                     assigned: dict[str, dict[str, Any]], cohort: list[str]) -> list[dict[str, Any]]:
    """Re-derive every assigned device's status from its latest reported state and update events
    (a device counted as updated that rolls back moves to failed); returns the rows that changed."""
    failures = failed_devices(svc.storage.rollout_events(row["id"]), spec.version)
    changed = []
    for device, m in assigned.items():
        status = device_status(row["id"], spec.version, m, p.devices.get(device) or {}, failures.get(device),
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
    monitoring = svc.storage.monitoring_since(spec.model, row["stage_started_at"])
    canary_sums = sum_monitoring(canary, monitoring, cohort, version=spec.version)
    sum_monitoring(control, monitoring, control_ids, exclude_version=spec.version)
    if stage.mode == "live":
        canary_multivariate(svc, spec.model, spec.version, canary, canary_sums)
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
                 and on_probation(p.devices.get(d) or {}, spec.version))
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
        ok = transition(svc, row, "aborted", CONTROLLER, {"devices": counts}, finished_at=p.now)
        prev_target = row.get("previous_target")
        if ok and row.get("finished_at"):  # a completed rollout undone: restore the fleet target
            svc.storage.set_fleet_target(spec.model, spec.to_dict()["target"],
                                         prev_target["version"] if prev_target else None,
                                         prev_target["rollout_id"] if prev_target else None, p.now)


def _converge_fleet_targets(svc: Services, p: _Pass) -> None:
    """A device that was never told anything (joined after a rollout completed) gets the fleet's
    current version for its model and target; devices in an active rollout are left to it.

    A device group's target also takes a device that was told something by another rollout and
    now matches the group (its tags changed): it joins the group's fleet target. What an operator
    set by hand (no rollout) is left alone."""
    targets = svc.storage.fleet_targets()
    if not targets:
        return
    parsed = [(t, parse_target(t["target"])) for t in targets]
    for device_id, device in p.devices.items():
        if device_id in p.taken:
            continue
        match = [t for t, target in parsed if target.matches(device_id, device["tags"])]
        if not match:
            continue
        newest = match[-1]  # fleet_targets() is ordered by updated_at
        last = p.desired.get(device_id)
        joins_group = (last is not None and newest["target"].get("query") is not None
                       and last["rollout_id"] is not None and last["rollout_id"] != newest["rollout_id"])
        if last is None or joins_group:
            _publish(svc, p, device_id, newest["model"], newest["version"], "live", newest["rollout_id"])
