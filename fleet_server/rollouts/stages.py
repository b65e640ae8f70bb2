"""Stage transitions: the compare-and-set state change, moving to the next stage, completing.

Shared by operator actions (`operations`) and the controller (`controller`); callers hold the
rollouts lock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fleet_server.rollout_model import RolloutSpec, RolloutState, next_state
from fleet_server.rollouts.records import RolloutConflict

if TYPE_CHECKING:
    from fleet_server.context import Services


def stage_entry(spec: RolloutSpec, index: int, now: float) -> dict[str, Any]:
    return {"index": index, "started_at": now, "ended_at": None, "verdict": None, "gates": [],
            "ended_by": None}


def transition(svc: Services, row: dict[str, Any], action: str, actor: str, detail: dict[str, Any],
                **fields: Any) -> bool:
    """Apply `action` to a rollout if its row is still as read (compare-and-set on state and stage)."""
    new = next_state(RolloutState(row["state"]), action)
    values = {"state": new.value, **fields}
    return svc.storage.update_rollout(
        row["id"], values, svc.clock(), expect={"state": row["state"], "stage": row["stage"]},
        audit=[(actor or "api", action, {"from": row["state"], "to": new.value, "stage": row["stage"], **detail})],
    )


def must(ok: bool, rollout_id: str) -> None:
    if not ok:
        raise RolloutConflict(f"rollout {rollout_id} changed meanwhile; show it and try again")


def next_stage(svc: Services, row: dict[str, Any], spec: RolloutSpec, actor: str, action: str,
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
        return complete(svc, row, spec, stages, actor, detail)
    stages.append(stage_entry(spec, row["stage"] + 1, now))
    new = next_state(RolloutState(row["state"]), "advance")
    return svc.storage.update_rollout(
        row["id"],
        {"state": new.value, "stage": row["stage"] + 1, "stage_started_at": now, "stages": stages,
         "gates": None, "reason": None},
        now,
        expect={"state": row["state"], "stage": row["stage"]},
        audit=[(actor, action, {**detail, "next_stage": row["stage"] + 1})],
    )


def complete(svc: Services, row: dict[str, Any], spec: RolloutSpec, stages: list[dict[str, Any]], actor: str,
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
