"""Console area: rollouts — the list, the create form (stages and gates with defaults) and the
live view. The pages call the rollouts REST API (/api/v1/rollouts) with the session."""

from __future__ import annotations

from dataclasses import asdict

from flask import Blueprint

from fleet_server.api.common import services
from fleet_server.auth import Role
from fleet_server.console.web import page, render
from fleet_server.rollout_model import DEFAULT_STAGES, GATE_DEFAULTS

bp = Blueprint("console_rollouts", __name__, url_prefix="/console")


@bp.get("/rollouts", endpoint="page")
@page()
def rollouts_page():
    return render("rollouts.html", active="rollouts")


@bp.get("/rollouts/new", endpoint="new")
@page(Role.OPERATOR)
def new_rollout():
    models = [{"name": m["name"], "version": m["version"]} for m in services().storage.list_models()]
    return render(
        "rollout_new.html", active="rollouts", models=models,
        stages=[asdict(s) for s in DEFAULT_STAGES], gates=GATE_DEFAULTS,
    )


@bp.get("/rollouts/<rollout_id>", endpoint="detail")
@page()
def rollout_page(rollout_id: str):
    return render("rollout.html", active="rollouts", rollout_id=rollout_id)
