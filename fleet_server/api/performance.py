"""Realized performance API: metrics from ground-truth feedback per scope, group and bucket, the
concept-drift view (input drift beside realized performance on one time axis), and the
label-free estimate beside realized accuracy."""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from fleet_server import monitoring_service, performance_service
from fleet_server.api.common import require, services, window_args
from fleet_server.auth import Role

bp = Blueprint("performance", __name__, url_prefix="/api/v1")


@bp.get("/performance")
@require(Role.VIEWER)
def versions():
    return jsonify(versions=performance_service.versions(services(), request.args.get("model") or None))


@bp.get("/performance/<name>/<version>")
@require(Role.VIEWER)
def performance(name: str, version: str):
    return jsonify(performance_service.performance(services(), name, version, *window_args()))


@bp.get("/performance/<name>/<version>/groups")
@require(Role.VIEWER)
def groups(name: str, version: str):
    return jsonify(performance_service.groups(services(), name, version, *window_args("by", "device")))


@bp.get("/performance/<name>/<version>/timeline")
@require(Role.VIEWER)
def timeline(name: str, version: str):
    return jsonify(performance_service.timeline(services(), name, version, *window_args()))


@bp.get("/performance/<name>/<version>/concept-drift")
@require(Role.VIEWER)
def concept_drift(name: str, version: str):
    return jsonify(performance_service.concept_drift(services(), name, version, *window_args()))


@bp.get("/performance/<name>/<version>/estimated")
@require(Role.VIEWER)
def estimated(name: str, version: str):
    return jsonify(monitoring_service.estimated(services(), name, version, *window_args()))


@bp.get("/performance/<name>/<version>/estimated/timeline")
@require(Role.VIEWER)
def estimated_timeline(name: str, version: str):
    return jsonify(monitoring_service.estimated_timeline(services(), name, version, *window_args()))


@bp.get("/performance/<name>/<version>/estimated/groups")
@require(Role.VIEWER)
def estimated_groups(name: str, version: str):
    return jsonify(monitoring_service.estimated_groups(services(), name, version, *window_args("by", "device")))
