"""Device credentials API: an operator starts a password rotation; the device takes its new
password (authenticated with its current one) and confirms it (authenticated with the new one)."""

from __future__ import annotations

import base64

from flask import Blueprint, jsonify, request

from fleet_server import rotation
from fleet_server.api.common import (
    audit,
    basic_device,
    refused,
    require,
    services,
)
from fleet_server.api.schemas import RotationRef, body
from fleet_server.auth import Role
from fleet_server.devices import DeviceError

bp = Blueprint("credentials", __name__, url_prefix="/api/v1")


@bp.post("/devices/<device_id>/rotate-password")
@require(Role.OPERATOR)
def rotate_password(device_id: str):
    from flask import g

    status = rotation.request_rotation(services(), device_id, g.identity.get("name", "api"))
    return jsonify(rotation=status), 202


def _rotation_id() -> str:
    return body(RotationRef).rotation_id  # the id from the credentials notice


def _device_refusal(device_id: str, exc: DeviceError, action: str):
    refused(exc.status, f"{device_id}: {exc}")
    audit(action, "denied", {"name": device_id, "role": "device"}, target=device_id, reason=str(exc)[:200])
    return jsonify(error=str(exc)), exc.status


def _unauthenticated():
    message = "authenticate as the device (HTTP Basic: device id and its password)"
    refused(401, message)
    response = jsonify(error=message)
    response.headers["WWW-Authenticate"] = 'Basic realm="edgefleet"'
    return response, 401


@bp.post("/device/credentials")
def issue_password():
    """The device, with its current password, takes the new one of its pending rotation."""
    device_id = basic_device()
    if device_id is None:
        return _unauthenticated()
    rotation_id = _rotation_id()
    try:
        password = rotation.issue_password(services(), device_id, rotation_id)
    except DeviceError as exc:
        return _device_refusal(device_id, exc, "device.credentials.issue")
    response = jsonify(rotation_id=rotation_id, password=password)
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.post("/device/credentials/confirm")
def confirm_password():
    """The device proves it holds the new password by authenticating with it."""
    header = request.headers.get("Authorization", "")
    try:
        device_id, _, password = base64.b64decode(header[6:]).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        device_id, password = "", ""
    if not header.startswith("Basic ") or not device_id or not password:
        return _unauthenticated()
    rotation_id = _rotation_id()
    try:
        status = rotation.confirm_rotation(services(), device_id, rotation_id, password)
    except DeviceError as exc:
        if exc.status == 503:
            return jsonify(error=str(exc)), 503
        return _device_refusal(device_id, exc, "device.credentials.confirm")
    audit("device.credentials.confirm", "ok", {"name": device_id, "role": "device"}, target=device_id,
          rotation_id=rotation_id)
    return jsonify(rotation=status)
