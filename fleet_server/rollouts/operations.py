"""Operator actions on rollouts: create, pause, resume, advance, abort.

Each only changes the rollout's row (and writes the audit log) under the rollouts lock; the
controller's next reconcile pass acts on it.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from fleet_server.device_groups import DeviceGroupError, resolve_target
from fleet_server.rollout_model import RolloutError, RolloutState, RolloutStateError, parse_spec
from fleet_server.rollouts.records import (
    ACTIVE,
    RolloutConflict,
    all_devices,
    get_row,
    matching,
    spec_of,
)
from fleet_server.rollouts.schedule import schedule_of
from fleet_server.rollouts.stages import must, next_stage, stage_entry, transition
from fleet_server.rollouts.status import actions, rollout_status

if TYPE_CHECKING:
    from fleet_server.context import Services


def create_rollout(svc: Services, data: dict[str, Any], actor: str = "") -> dict[str, Any]:
    """Validate and store a new rollout (state running, stage 0); the controller starts it."""
    try:  # a target naming a device group takes the group's query as it is now
        data = resolve_target(svc, data)
    except DeviceGroupError as exc:
        raise RolloutError(str(exc)) from exc
    spec = parse_spec(data)
    model = svc.storage.get_model(spec.model, spec.version)
    if model is None:
        raise RolloutError(
            f"model {spec.model!r} version {spec.version!r} is not registered: upload the bundle first "
            "(edgefleet server add-model or POST /api/v1/models)"
        )
    with svc.rollouts_lock:  # operator actions and the reconcile pass never interleave
        devices = all_devices(svc)
        wanted = set(matching(spec.target, devices))
        if not wanted:
            raise RolloutError("the target matches no registered device: check the tags, group or device ids")
        for other in svc.storage.list_rollouts(states=ACTIVE, limit=10_000):
            theirs = set(matching(spec_of(other).target, devices))
            theirs |= {r["device"] for r in svc.storage.rollout_devices(other["id"])}
            overlap = sorted(wanted & theirs)
            if overlap:
                sample = ", ".join(overlap[:5]) + (", ..." if len(overlap) > 5 else "")
                raise RolloutConflict(
                    f"rollout {other['id']} ({other['model']} {other['version']}, {other['state']}) already "
                    f"targets {len(overlap)} of these devices ({sample}): a device is in one active rollout "
                    "at a time; wait for it to complete, abort it, or narrow this target"
                )
        created = now = svc.clock()
        schedule = schedule_of(spec)
        if schedule is not None and schedule.not_before is not None:  # its first stage starts then
            now = max(now, schedule.not_before)
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
            "created_at": created,
            "created_by": actor,
            "updated_at": created,
            "stages": [stage_entry(spec, 0, now)],
        }
        svc.storage.insert_rollout(row, (actor or "api", "create", {"spec": spec.to_dict(),
                                                                     "target_devices": len(wanted)}))
    return rollout_status(svc, rollout_id)


def pause(svc: Services, rollout_id: str, actor: str = "", reason: str = "") -> dict[str, Any]:
    """Hold the rollout at its stage: devices keep what they run, nothing advances."""
    with svc.rollouts_lock:
        row = get_row(svc, rollout_id)
        why = reason or f"paused by {actor or 'an operator'}"
        must(transition(svc, row, "pause", actor, {"reason": why}, reason=why), rollout_id)
    return rollout_status(svc, rollout_id)


def resume(svc: Services, rollout_id: str, actor: str = "") -> dict[str, Any]:
    """Continue a paused rollout; the stage measures its gates over a fresh window from now."""
    with svc.rollouts_lock:
        row = get_row(svc, rollout_id)
        now = svc.clock()
        stages = list(row["stages"] or [])
        if stages:
            stages[-1] = {**stages[-1], "resumed_at": now}
        must(transition(svc, row, "resume", actor, {}, reason=None, stage_started_at=now, stages=stages,
                          gates=None), rollout_id)
    return rollout_status(svc, rollout_id)


def advance(svc: Services, rollout_id: str, actor: str = "") -> dict[str, Any]:
    """Operator approval: end the current stage now (whatever its gates say) and start the next,
    or complete the rollout after its last stage."""
    with svc.rollouts_lock:
        row = get_row(svc, rollout_id)
        spec = spec_of(row)
        if row["state"] not in (RolloutState.RUNNING.value, RolloutState.PAUSED.value):
            raise RolloutStateError(f"cannot advance a rollout that is {row['state']}")
        next_stage(svc, row, spec, actor or "api", "advance", ended_by=f"advanced by {actor or 'an operator'}")
    return rollout_status(svc, rollout_id)


def abort(svc: Services, rollout_id: str, actor: str = "", reason: str = "") -> dict[str, Any]:
    """Send every device of the rollout back to its previous version (also right after a
    completed blue-green switch: the instant way back)."""
    with svc.rollouts_lock:
        row = get_row(svc, rollout_id)
        if row["state"] == RolloutState.COMPLETED.value and "abort" not in actions(svc, row):
            raise RolloutStateError(
                f"rollout {rollout_id} is completed and its version is the fleet's now: only a blue-green "
                "rollout can be aborted after it completed, and only while no later rollout replaced it; to "
                "go back, create a rollout of the previous version"
            )
        why = reason or f"aborted by {actor or 'an operator'}"
        must(transition(svc, row, "abort", actor, {"reason": why}, reason=why), rollout_id)
    return rollout_status(svc, rollout_id)
