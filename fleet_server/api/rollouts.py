"""Rollouts API: create, list, show (stages, cohorts, gates, timeouts, audit) and operate."""

from __future__ import annotations

from flask import Blueprint, g, jsonify, request

from fleet_server import rollouts
from fleet_server.api.common import ApiError, arg_int, require, services
from fleet_server.api.schemas import RolloutAction, RolloutCreate, body, to_dict
from fleet_server.auth import Role
from fleet_server.rollout_model import RolloutState

bp = Blueprint("rollouts", __name__, url_prefix="/api/v1")


def _actor() -> str:
    return str(g.identity.get("name", "")) if getattr(g, "identity", None) else ""


def _kick() -> None:
    """Apply an operator's action at once instead of at the next reconcile pass (on the leading
    node; another node's action is applied by the leader's next pass)."""
    svc = services()
    if svc.publisher is not None:
        with svc.leadership.leading_pass() as leading:
            if leading:
                rollouts.reconcile(svc)


@bp.get("/rollouts")
@require(Role.VIEWER)
def list_rollouts():
    state = request.args.get("state") or None
    if state is not None and state not in {s.value for s in RolloutState}:
        raise ApiError(f"state must be one of {sorted(s.value for s in RolloutState)}")
    return jsonify(rollouts=rollouts.list_rollouts(services(), state, min(arg_int("limit", 100), 1000)))


@bp.post("/rollouts")
@require(Role.OPERATOR)
def create_rollout():
    status = rollouts.create_rollout(services(), to_dict(body(RolloutCreate)), _actor())
    _kick()
    return jsonify(rollout=rollouts.rollout_status(services(), status["id"])), 201


@bp.get("/rollouts/<rollout_id>")
@require(Role.VIEWER)
def show_rollout(rollout_id: str):
    return jsonify(rollout=rollouts.rollout_status(services(), rollout_id,
                                                   audit_limit=min(arg_int("audit_limit", 1000), 100_000)))


def _operate(rollout_id: str, action: str):
    reason = body(RolloutAction).reason
    svc = services()
    if action == "pause":
        rollouts.pause(svc, rollout_id, _actor(), reason)
    elif action == "resume":
        rollouts.resume(svc, rollout_id, _actor())
    elif action == "advance":
        rollouts.advance(svc, rollout_id, _actor())
    else:
        rollouts.abort(svc, rollout_id, _actor(), reason)
    _kick()
    return jsonify(rollout=rollouts.rollout_status(svc, rollout_id))


@bp.post("/rollouts/<rollout_id>/pause")
@require(Role.OPERATOR)
def pause(rollout_id: str):
    return _operate(rollout_id, "pause")


@bp.post("/rollouts/<rollout_id>/resume")
@require(Role.OPERATOR)
def resume(rollout_id: str):
    return _operate(rollout_id, "resume")


@bp.post("/rollouts/<rollout_id>/advance")
@require(Role.OPERATOR)
def advance(rollout_id: str):
    return _operate(rollout_id, "advance")


@bp.post("/rollouts/<rollout_id>/abort")
@require(Role.OPERATOR)
def abort(rollout_id: str):
    return _operate(rollout_id, "abort")
