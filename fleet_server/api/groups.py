"""Saved device groups (tag queries) with their member counts, and device tags, which decide
which groups a device is in."""

from __future__ import annotations

from flask import Blueprint, g, jsonify

from fleet_server import device_groups
from fleet_server.api.common import require, services
from fleet_server.api.schemas import DeviceTags, GroupPut, body
from fleet_server.auth import Role

bp = Blueprint("groups", __name__, url_prefix="/api/v1")


@bp.get("/groups")
@require(Role.VIEWER)
def list_groups():
    return jsonify(groups=device_groups.list_groups(services()))


@bp.get("/groups/<name>")
@require(Role.VIEWER)
def get_group(name: str):
    return jsonify(group=device_groups.group_with_members(services(), name))


@bp.put("/groups/<name>")
@require(Role.OPERATOR)
def put_group(name: str):
    req = body(GroupPut)
    group = device_groups.save_group(services(), name, req.query, req.description, actor=g.identity.get("name", ""))
    return jsonify(group=group)


@bp.delete("/groups/<name>")
@require(Role.OPERATOR)
def delete_group(name: str):
    device_groups.delete_group(services(), name)
    return jsonify(deleted=name)


@bp.put("/devices/<device_id>/tags")
@require(Role.OPERATOR)
def put_device_tags(device_id: str):
    return jsonify(device=device_groups.set_device_tags(services(), device_id, dict(body(DeviceTags).tags)))
