"""Drift and telemetry API: per feature, over time, per cohort (device or tag), summaries; the
multivariate row and per-feature data quality beside the features."""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from fleet_server import drift_service, monitoring_service
from fleet_server.api.common import arg_float, require, services, window_args
from fleet_server.auth import Role

bp = Blueprint("drift", __name__, url_prefix="/api/v1")


@bp.get("/models/<name>/<version>/drift")
@require(Role.VIEWER)
def drift(name: str, version: str):
    svc, (scope, start, end) = services(), window_args()
    body = drift_service.drift(svc, name, version, scope, start, end)
    return jsonify(body | monitoring_service.drift_additions(svc, name, version, scope, start, end))


@bp.get("/models/<name>/<version>/drift/timeline")
@require(Role.VIEWER)
def timeline(name: str, version: str):
    svc, (scope, start, end) = services(), window_args()
    body = drift_service.timeline(svc, name, version, scope, start, end)
    multivariate = monitoring_service.multivariate_points(svc, name, version, scope, start, end)
    for point in body["points"]:
        point["multivariate"] = multivariate.get(point["bucket_start"])
    return jsonify(body)


@bp.get("/models/<name>/<version>/drift/cohorts")
@require(Role.VIEWER)
def cohorts(name: str, version: str):
    return jsonify(drift_service.cohorts(services(), name, version, *window_args("by", "device")))


@bp.get("/telemetry/summary")
@require(Role.VIEWER)
def telemetry_summary():
    return jsonify(
        summary=drift_service.telemetry_summary(
            services(),
            group_by=request.args.get("group_by", "version"),
            device=request.args.get("device") or None,
            start=arg_float("start"),
        )
    )
