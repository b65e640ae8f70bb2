"""The OpenAPI 3 document of /api/v1, from one table of operations (a test checks it covers every route)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from fleet_server.api.schemas import OPTIONAL_BODY, REQUEST_BODIES, json_schemas

bp = Blueprint("openapi", __name__, url_prefix="/api/v1")

Q = "query"
P = "path"

# (method, path, summary, role or None, [(name, in, type, description)], request body media type)
OPERATIONS: list[tuple[str, str, str, str | None, list[tuple[str, str, str, str]], str | None]] = [
    ("get", "/api/v1/health", "Liveness check", None, [], None),
    ("get", "/api/v1/ready", "Readiness: 200 while this node reaches its database, else 503 naming it", None, [],
     None),
    ("get", "/api/v1/cluster",
     "The server nodes: role (leader, follower, gone), version, last heartbeat; which node answered", "viewer",
     [], None),
    ("get", "/api/v1/openapi.json", "This document", None, [], None),
    ("get", "/api/v1/devices", "List devices with filters", "viewer", [
        ("tag", Q, "string", "KEY=VALUE; repeat to require several tags"),
        ("model_version", Q, "string", "active model version"),
        ("online", Q, "boolean", "online (true) or offline (false) per the status topic"),
        ("seen_within_s", Q, "number", "last message at most this many seconds ago"),
        ("not_seen_within_s", Q, "number", "no message for at least this many seconds"),
        ("include_revoked", Q, "boolean", "include revoked devices"),
        ("limit", Q, "integer", "page size (max 10000)"),
        ("offset", Q, "integer", "page offset"),
    ], None),
    ("post", "/api/v1/devices", "Provision a device: credentials and its agent config (shown once)",
     "operator", [], "application/json"),
    ("get", "/api/v1/devices/{device_id}", "A device: status, reported state, tags, delivery (loss, reinstalls)",
     "viewer", [("device_id", P, "string", "device id")], None),
    ("post", "/api/v1/devices/{device_id}/revoke", "Revoke a device's broker and download access",
     "operator", [("device_id", P, "string", "device id")], None),
    ("post", "/api/v1/devices/{device_id}/rotate-password",
     "Start a password rotation: the device takes a new password over its own channel (202)",
     "operator", [("device_id", P, "string", "device id")], None),
    ("post", "/api/v1/device/credentials",
     "The device takes the new password of its pending rotation (HTTP Basic: its current password; "
     "JSON {rotation_id})", "device", [], "application/json"),
    ("post", "/api/v1/device/credentials/confirm",
     "The device confirms its new password (HTTP Basic: the new password; JSON {rotation_id})",
     "device", [], "application/json"),
    ("get", "/api/v1/devices/{device_id}/events", "Update history of a device (newest first)", "viewer",
     [("device_id", P, "string", "device id"), ("limit", Q, "integer", "max events")], None),
    ("get", "/api/v1/devices/{device_id}/samples",
     "Recent sampled (input, output) rows, newest first, with each model version's column names", "viewer",
     [("device_id", P, "string", "device id"), ("limit", Q, "integer", "max rows (default 50, max 1000)")], None),
    ("get", "/api/v1/devices/{device_id}/bandwidth", "Telemetry messages and bytes per hour over time", "viewer", [
        ("device_id", P, "string", "device id"), ("start", Q, "number", "unix time (default: 24 hours ago)"),
        ("step_s", Q, "number", "seconds per point (default 3600)"),
    ], None),
    ("get", "/api/v1/models", "List registered model versions with their manifests' reports", "viewer",
     [("name", Q, "string", "only this model")], None),
    ("post", "/api/v1/models", "Upload a signed bundle (verified against the trusted keys)", "operator", [],
     "application/octet-stream"),
    ("get", "/api/v1/models/{name}/{version}", "One model version with its full manifest", "viewer",
     [("name", P, "string", "model name"), ("version", P, "string", "model version")], None),
    ("put", "/api/v1/models/{name}/{version}/policy", "Override the drift alert policy of a model version",
     "operator", [("name", P, "string", "model name"), ("version", P, "string", "model version")],
     "application/json"),
    ("get", "/api/v1/models/{name}/{version}/bundle",
     "Download the bundle (device HTTP Basic or token; Range, ETag)", "device",
     [("name", P, "string", "model name"), ("version", P, "string", "model version")], None),
    ("get", "/api/v1/wheelhouse", "The offline wheelhouses devices install the agent from", "device", [], None),
    ("get", "/api/v1/wheelhouse/install.py", "The device installer (standard library only)", "device", [], None),
    ("get", "/api/v1/wheelhouse/{name}/{filename}",
     "One wheel or SHA256SUMS of a wheelhouse (device HTTP Basic or token; Range, ETag)", "device",
     [("name", P, "string", "wheelhouse, e.g. cp311-aarch64"), ("filename", P, "string", "a file SHA256SUMS lists")],
     None),
    ("get", "/api/v1/models/{name}/{version}/drift", "Drift per feature and for the prediction", "viewer", [
        ("name", P, "string", "model name"), ("version", P, "string", "model version"),
        ("scope", Q, "string", "fleet | device:ID | tag:KEY=VALUE"),
        ("start", Q, "number", "unix time, inclusive"), ("end", Q, "number", "unix time, exclusive"),
    ], None),
    ("get", "/api/v1/models/{name}/{version}/drift/timeline", "PSI per bucket (over time)", "viewer", [
        ("name", P, "string", "model name"), ("version", P, "string", "model version"),
        ("scope", Q, "string", "fleet | device:ID | tag:KEY=VALUE"),
        ("start", Q, "number", "unix time"), ("end", Q, "number", "unix time"),
    ], None),
    ("get", "/api/v1/models/{name}/{version}/drift/cohorts", "Drift per device or per tag value", "viewer", [
        ("name", P, "string", "model name"), ("version", P, "string", "model version"),
        ("by", Q, "string", "device | tag:KEY"),
        ("start", Q, "number", "unix time"), ("end", Q, "number", "unix time"),
    ], None),
    ("get", "/api/v1/telemetry/summary", "Predictions, error rates, latency percentiles", "viewer", [
        ("group_by", Q, "string", "version | device"), ("device", Q, "string", "one device"),
        ("start", Q, "number", "unix time"),
    ], None),
    ("get", "/api/v1/performance", "Model versions with ground-truth feedback: labels, realized score, baseline",
     "viewer", [("model", Q, "string", "one model's versions")], None),
    ("get", "/api/v1/performance/{name}/{version}",
     "Realized performance (accuracy, per-class precision/recall/F1, calibration, MAE/RMSE) with label counts",
     "viewer", [
        ("name", P, "string", "model name"), ("version", P, "string", "model version"),
        ("scope", Q, "string", "fleet | device:ID | tag:KEY=VALUE"),
        ("start", Q, "number", "unix time, inclusive"), ("end", Q, "number", "unix time, exclusive"),
    ], None),
    ("get", "/api/v1/performance/{name}/{version}/groups", "Realized performance per device, tag value or bucket",
     "viewer", [
        ("name", P, "string", "model name"), ("version", P, "string", "model version"),
        ("by", Q, "string", "device | tag:KEY | bucket"),
        ("start", Q, "number", "unix time"), ("end", Q, "number", "unix time"),
    ], None),
    ("get", "/api/v1/performance/{name}/{version}/timeline",
     "Realized performance per bucket with its drop below the validation score and alert level", "viewer", [
        ("name", P, "string", "model name"), ("version", P, "string", "model version"),
        ("scope", Q, "string", "fleet | device:ID | tag:KEY=VALUE"),
        ("start", Q, "number", "unix time"), ("end", Q, "number", "unix time"),
    ], None),
    ("get", "/api/v1/performance/{name}/{version}/concept-drift",
     "Input drift and realized performance per bucket on one time axis, with a diagnosis", "viewer", [
        ("name", P, "string", "model name"), ("version", P, "string", "model version"),
        ("scope", Q, "string", "fleet | device:ID | tag:KEY=VALUE"),
        ("start", Q, "number", "unix time"), ("end", Q, "number", "unix time"),
    ], None),
    ("get", "/api/v1/performance/{name}/{version}/estimated",
     "Estimated performance without labels (accuracy with its noise interval; binary: precision, recall, F1, "
     "ROC AUC) beside realized accuracy", "viewer", [
        ("name", P, "string", "model name"), ("version", P, "string", "model version"),
        ("scope", Q, "string", "fleet | device:ID | tag:KEY=VALUE"),
        ("start", Q, "number", "unix time, inclusive"), ("end", Q, "number", "unix time, exclusive"),
    ], None),
    ("get", "/api/v1/performance/{name}/{version}/estimated/timeline",
     "Estimated accuracy per bucket with its interval, beside realized accuracy where labels arrived", "viewer", [
        ("name", P, "string", "model name"), ("version", P, "string", "model version"),
        ("scope", Q, "string", "fleet | device:ID | tag:KEY=VALUE"),
        ("start", Q, "number", "unix time"), ("end", Q, "number", "unix time"),
    ], None),
    ("get", "/api/v1/performance/{name}/{version}/estimated/groups",
     "Estimated performance per device, tag value or bucket", "viewer", [
        ("name", P, "string", "model name"), ("version", P, "string", "model version"),
        ("by", Q, "string", "device | tag:KEY | bucket"),
        ("start", Q, "number", "unix time"), ("end", Q, "number", "unix time"),
    ], None),
    ("get", "/api/v1/alerts", "List drift, performance, estimated, multivariate and data-quality alerts", "viewer", [
        ("state", Q, "string", "open | resolved"), ("model", Q, "string", "model name"),
        ("scope", Q, "string", "fleet | device:ID | tag:KEY=VALUE"), ("kind", Q, "string", "drift | performance | estimated | multivariate | quality"),
        ("limit", Q, "integer", "max alerts"),
    ], None),
    ("post", "/api/v1/alerts/{alert_id}/ack", "Acknowledge an alert", "operator",
     [("alert_id", P, "integer", "alert id")], None),
    ("get", "/api/v1/webhooks", "List webhooks and recent deliveries", "viewer", [], None),
    ("post", "/api/v1/webhooks", "Add a webhook (url, optional secret; the secret is shown once)", "operator",
     [], "application/json"),
    ("delete", "/api/v1/webhooks/{webhook_id}", "Remove a webhook", "operator",
     [("webhook_id", P, "integer", "webhook id")], None),
    ("get", "/api/v1/keys", "Trusted bundle-signing keys", "viewer", [], None),
    ("post", "/api/v1/keys", "Trust a bundle-signing public key (pem, comment)", "operator", [],
     "application/json"),
    ("get", "/api/v1/rollouts", "List rollouts, newest first", "viewer", [
        ("state", Q, "string", "running | paused | completed | aborting | aborted"),
        ("limit", Q, "integer", "max rollouts (1000)"),
    ], None),
    ("post", "/api/v1/rollouts", "Create a rollout (model, version, target, stages, gates, on_failure); "
     "409 when a target device is in another active rollout", "operator", [], "application/json"),
    ("get", "/api/v1/rollouts/{rollout_id}",
     "A rollout: stages, cohorts, gates (value, threshold, sample), timeout bucket, devices, audit log",
     "viewer", [("rollout_id", P, "string", "rollout id"),
                ("audit_limit", Q, "integer", "max audit entries")], None),
    ("post", "/api/v1/rollouts/{rollout_id}/pause", "Pause a running rollout (optional JSON {reason})",
     "operator", [("rollout_id", P, "string", "rollout id")], None),
    ("post", "/api/v1/rollouts/{rollout_id}/resume", "Resume a paused rollout (fresh gate window)", "operator",
     [("rollout_id", P, "string", "rollout id")], None),
    ("post", "/api/v1/rollouts/{rollout_id}/advance",
     "Approve: end the current stage now and start the next (or complete)", "operator",
     [("rollout_id", P, "string", "rollout id")], None),
    ("post", "/api/v1/rollouts/{rollout_id}/abort",
     "Abort: every device of the rollout back to its previous version (optional JSON {reason})", "operator",
     [("rollout_id", P, "string", "rollout id")], None),
    ("get", "/api/v1/ingest/stats", "Ingest workers, rejects by reason and device, loss by seq", "viewer",
     [], None),
    ("get", "/api/v1/groups", "Saved device groups (tag queries) with member counts: members, online, offline",
     "viewer", [], None),
    ("get", "/api/v1/groups/{name}", "A device group, its counts and the ids of the devices it holds now",
     "viewer", [("name", P, "string", "group name")], None),
    ("put", "/api/v1/groups/{name}", "Create a device group or change its query (JSON {query, description})",
     "operator", [("name", P, "string", "group name")], "application/json"),
    ("delete", "/api/v1/groups/{name}", "Remove a device group (rollouts keep the query they started with)",
     "operator", [("name", P, "string", "group name")], None),
    ("put", "/api/v1/devices/{device_id}/tags", "Replace a device's tags (JSON {tags}); its groups follow",
     "operator", [("device_id", P, "string", "device id")], "application/json"),
]


def document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for method, path, summary, role, params, body in OPERATIONS:
        op: dict[str, Any] = {
            "summary": summary,
            "parameters": [
                {"name": n, "in": where, "required": where == P, "schema": {"type": t}, "description": d}
                for n, where, t, d in params
            ],
            "responses": {
                "200": {"description": "OK (JSON)"},
                "default": {"description": "Error", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Error"}}}},
            },
        }
        if role == "device":
            op["security"] = [{"device": []}, {"token": []}]
            op["responses"]["206"] = {"description": "Partial content (Range)"}
            op["responses"]["416"] = {"description": "Range not satisfiable"}
        elif role:
            op["security"] = [{"token": []}]
            op["x-role"] = role
        else:
            op["security"] = []
        schema = REQUEST_BODIES.get((method, path))
        if body or schema:
            op["requestBody"] = {"required": schema not in OPTIONAL_BODY, "content": {
                body or "application/json": {"schema": {"$ref": f"#/components/schemas/{schema.__name__}"}
                                             if schema is not None else {"type": "string", "format": "binary"}}}}
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "edgefleet fleet server", "version": "1"},
        "paths": paths,
        "components": {
            "securitySchemes": {
                "token": {"type": "http", "scheme": "bearer"},
                "device": {"type": "http", "scheme": "basic"},
            },
            "schemas": {
                "Error": {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]},
                **json_schemas(),
            },
        },
        "security": [{"token": []}],
    }


@bp.get("/openapi.json")
def openapi():
    return jsonify(document())
