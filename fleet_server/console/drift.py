"""Console area: drift per model version (PSI heatmap, overlaid distributions, cohorts, alerts)."""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from fleet_server.api.common import ApiError, arg_float, require, services
from fleet_server.auth import Role
from fleet_server.console import data
from fleet_server.console.web import page, render

bp = Blueprint("console_drift", __name__, url_prefix="/console")


@bp.get("/drift", endpoint="page")
@page()
def drift_page():
    return render("drift.html", active="drift", versions=data.drift_versions(services()))


@bp.get("/api/drift/distribution")
@require(Role.VIEWER)
def distribution():
    model, version = request.args.get("model"), request.args.get("version")
    if not model or not version:
        raise ApiError("model and version are required query parameters")
    feature = request.args.get("feature", "")
    try:
        index = None if feature in ("", "prediction") else int(feature)
    except ValueError:
        raise ApiError("feature is a feature index or 'prediction'") from None
    return jsonify(
        data.distribution(services(), model, version, index, request.args.get("scope", "fleet"),
                          arg_float("start"), arg_float("end"))
    )
