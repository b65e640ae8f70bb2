"""Models API: upload (verified), list, show, drift policy, trusted keys, and the bundle download."""

from __future__ import annotations

from flask import Blueprint, jsonify, request, send_file

from edge_agent.protocol import valid_id
from fleet_server import registry
from fleet_server.api.common import (
    ApiError,
    audit,
    basic_device,
    bearer_identity,
    refused,
    require,
    services,
)
from fleet_server.api.schemas import KeyCreate, PolicyUpdate, body, to_dict
from fleet_server.auth import Role
from fleet_server.download_access import may_download

bp = Blueprint("models", __name__, url_prefix="/api/v1")

MAX_UPLOAD_BYTES = 300 * 1024 * 1024


@bp.get("/models")
@require(Role.VIEWER)
def list_models():
    return jsonify(models=registry.list_models(services(), request.args.get("name") or None))


@bp.post("/models")
@require(Role.OPERATOR)
def upload_model():
    """The body is the .efb file itself, or a multipart form with a `bundle` file field."""
    if request.content_length and request.content_length > MAX_UPLOAD_BYTES:
        raise ApiError(f"bundle is larger than {MAX_UPLOAD_BYTES} bytes", 413)
    upload = request.files.get("bundle")
    data = upload.read() if upload is not None else request.get_data()
    if not data:
        raise ApiError("send the .efb bundle as the request body (or as multipart field 'bundle')")
    return jsonify(model=registry.upload_bundle(services(), data)), 201


@bp.get("/models/<name>/<version>")
@require(Role.VIEWER)
def get_model(name: str, version: str):
    return jsonify(model=registry.model_detail(services(), name, version))


@bp.put("/models/<name>/<version>/policy")
@require(Role.OPERATOR)
def set_policy(name: str, version: str):
    req = body(PolicyUpdate)
    overrides = to_dict(req.policy) if req.policy is not None else None
    return jsonify(model=registry.set_policy(services(), name, version, overrides))


@bp.get("/models/<name>/<version>/bundle")
def download_bundle(name: str, version: str):
    """Devices authenticate with HTTP Basic (device id, MQTT password); people with a token."""
    device_id = basic_device()
    if device_id is None and bearer_identity() is None:
        message = "authenticate as a device (HTTP Basic) or with an API token"
        refused(401, f"{message} (unknown, wrong or revoked credentials)")
        response = jsonify(error=message)
        response.headers["WWW-Authenticate"] = 'Basic realm="edgefleet"'
        return response, 401
    if not (valid_id(name) and valid_id(version)):
        # Registered names and versions are plain ids: anything else (`..`, `/`, NUL) is refused
        # here, before any lookup; bundles are stored by sha256, never by these names anyway.
        refused(404, f"not a model name/version: {name[:80]!r} {version[:80]!r}")
        raise ApiError("no such model: names and versions are 1-64 letters, digits, '.', '_' or '-'", 404)
    if device_id is not None and not may_download(services(), device_id, name, version):
        # A device gets only what it was told to take (fleet_server.download_access); the same
        # answer whether or not the version exists.
        message = (f"{name} {version} is not assigned to device {device_id}: a device downloads only "
                   "the versions its desired state, its rollouts or its fleet target name")
        refused(403, message)
        audit("models.download_bundle", "denied", {"name": device_id, "role": "device"}, reason="not assigned")
        raise ApiError(message, 403)
    path, row = registry.bundle_file(services(), name, version)
    # conditional=True gives Range (206 + Content-Range, 416) and If-None-Match handling.
    return send_file(
        path,
        mimetype="application/zip",
        as_attachment=True,
        download_name=f"{row['sha256'][:16]}.efb",
        etag=row["sha256"],
        conditional=True,
        max_age=0,
    )


@bp.get("/keys")
@require(Role.VIEWER)
def list_keys():
    return jsonify(keys=services().storage.trusted_keys())


@bp.post("/keys")
@require(Role.OPERATOR)
def add_key():
    req = body(KeyCreate)
    key_id = registry.trust_key(services(), req.pem, req.comment)
    return jsonify(key_id=key_id), 201
