"""Console area: the device list (searched, filtered and paged on the server) and device detail."""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from fleet_server.api.common import arg_int, require, services
from fleet_server.auth import Role
from fleet_server.console import data
from fleet_server.console.web import page, render
from fleet_server.device_groups import list_groups

bp = Blueprint("console_devices", __name__, url_prefix="/console")


@bp.get("/devices", endpoint="page")
@page()
def devices_page():
    return render("devices.html", active="devices", choices=data.filter_choices(services()),
                  page_sizes=data.PAGE_SIZES, groups=list_groups(services()))


@bp.get("/devices/<device_id>", endpoint="detail")
@page()
def device_page(device_id: str):
    return render("device.html", active="devices", device_id=device_id)


@bp.get("/api/devices")
@require(Role.VIEWER)
def list_devices():
    return jsonify(
        data.device_page(
            services(),
            query=request.args.get("q", ""),
            tags=request.args.getlist("tag"),
            version=request.args.get("version") or None,
            state=request.args.get("state") or None,
            seen=request.args.get("seen") or None,
            sort=request.args.get("sort", "id"),
            page=arg_int("page", 1),
            per_page=arg_int("per_page", 50),
        )
    )


@bp.get("/api/devices/<device_id>")
@require(Role.VIEWER)
def device(device_id: str):
    return jsonify(data.device_detail(services(), device_id, float(arg_int("since_s", 6 * 3600))))
