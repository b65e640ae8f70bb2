"""Alerts and webhooks API."""

from __future__ import annotations

import secrets
from urllib.parse import urlsplit

from flask import Blueprint, g, jsonify, request

from fleet_server import alerts_service
from fleet_server.api.common import ApiError, arg_int, require, services
from fleet_server.api.schemas import WebhookCreate, body
from fleet_server.auth import Role

bp = Blueprint("alerts", __name__, url_prefix="/api/v1")


@bp.get("/alerts")
@require(Role.VIEWER)
def list_alerts():
    state = request.args.get("state") or None
    if state not in (None, "open", "resolved"):
        raise ApiError("state must be 'open' or 'resolved'")
    return jsonify(
        alerts=alerts_service.list_alerts(
            services(),
            state=state,
            model=request.args.get("model") or None,
            scope=request.args.get("scope") or None,
            kind=_kind(),
            limit=min(arg_int("limit", 500), 5000),
        )
    )


def _kind() -> str | None:
    kind = request.args.get("kind") or None
    if kind not in (None, "drift", "performance", "estimated", "multivariate", "quality"):
        raise ApiError("kind must be 'drift', 'performance', 'estimated', 'multivariate' or 'quality'")
    return kind


@bp.post("/alerts/<int:alert_id>/ack")
@require(Role.OPERATOR)
def acknowledge(alert_id: int):
    return jsonify(alert=alerts_service.acknowledge(services(), alert_id, g.identity["name"]))


@bp.get("/webhooks")
@require(Role.VIEWER)
def list_webhooks():
    hooks = [{k: v for k, v in h.items() if k != "secret"} for h in services().storage.list_webhooks()]
    return jsonify(webhooks=hooks, deliveries=services().storage.deliveries(100))


@bp.post("/webhooks")
@require(Role.OPERATOR)
def add_webhook():
    req = body(WebhookCreate)
    url = req.url
    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # e.g. a bad IPv6 literal or port
        valid = False
    if not valid:
        raise ApiError('"url" must be an http:// or https:// URL')
    secret = req.secret or secrets.token_urlsafe(32)
    hook_id = services().storage.add_webhook(url, secret, services().clock())
    # The secret is shown once: receivers verify X-Edgefleet-Signature with it.
    return jsonify(id=hook_id, url=url, secret=secret), 201


@bp.delete("/webhooks/<int:webhook_id>")
@require(Role.OPERATOR)
def delete_webhook(webhook_id: int):
    # Ids are 64-bit integers in both databases: a larger number names no webhook (and would
    # overflow the driver's integer binding).
    if webhook_id >= 2**63 or not services().storage.delete_webhook(webhook_id):
        raise ApiError(f"no webhook {webhook_id}", 404)
    return jsonify(deleted=webhook_id)
