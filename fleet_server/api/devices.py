"""Devices API: provision, list with filters, show, revoke, events, sampled rows, bandwidth."""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from fleet_server import device_data, devices, rotation
from fleet_server.api.common import (
    ApiError,
    arg_bool,
    arg_float,
    arg_int,
    require,
    services,
)
from fleet_server.api.schemas import DeviceCreate, body, to_dict
from fleet_server.auth import Role

bp = Blueprint("devices", __name__, url_prefix="/api/v1")


def _tag_filters() -> dict[str, str]:
    try:
        return devices.parse_tags(request.args.getlist("tag"))
    except devices.DeviceError as exc:
        raise ApiError(str(exc)) from None


@bp.get("/devices")
@require(Role.VIEWER)
def list_devices():
    rows = devices.list_devices(
        services(),
        tags=_tag_filters(),
        model_version=request.args.get("model_version") or None,
        online=arg_bool("online"),
        seen_within_s=arg_float("seen_within_s"),
        not_seen_within_s=arg_float("not_seen_within_s"),
        include_revoked=bool(arg_bool("include_revoked")),
        limit=min(arg_int("limit", 1000), 10000),
        offset=arg_int("offset", 0),
    )
    return jsonify(devices=rows)


@bp.post("/devices")
@require(Role.OPERATOR)
def add_device():
    req = body(DeviceCreate)
    options = {k: v for k, v in to_dict(req).items() if k in ("data_dir", "listen", "window_s")}
    p = devices.provision_device(services(), req.id, dict(req.tags), **options)
    return jsonify(device=p.device, password=p.password, agent_config=p.agent_config), 201


@bp.get("/devices/<device_id>")
@require(Role.VIEWER)
def get_device(device_id: str):
    svc = services()
    device = devices.get_device(svc, device_id)
    device["rotation"] = rotation.rotation_status(svc, device_id)
    return jsonify(device=device)


@bp.post("/devices/<device_id>/revoke")
@require(Role.OPERATOR)
def revoke_device(device_id: str):
    return jsonify(device=devices.revoke_device(services(), device_id))


@bp.get("/devices/<device_id>/events")
@require(Role.VIEWER)
def device_events(device_id: str):
    return jsonify(events=devices.device_events(services(), device_id, min(arg_int("limit", 100), 1000)))


@bp.get("/devices/<device_id>/samples")
@require(Role.VIEWER)
def device_samples(device_id: str):
    return jsonify(device_data.recent_samples(services(), device_id, arg_int("limit", 50)))


@bp.get("/devices/<device_id>/bandwidth")
@require(Role.VIEWER)
def device_bandwidth(device_id: str):
    return jsonify(
        device_data.bandwidth(services(), device_id, arg_float("start"), arg_float("step_s") or 3600.0)
    )
