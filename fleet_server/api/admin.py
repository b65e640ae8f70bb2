"""Ingest statistics and health."""

from __future__ import annotations

from flask import Blueprint, jsonify

from fleet_server.api.common import require, services
from fleet_server.auth import Role
from fleet_server.devices import loss_summary

bp = Blueprint("admin", __name__, url_prefix="/api/v1")


@bp.get("/health")
def health():
    return jsonify(status="ok")


@bp.get("/ingest/stats")
@require(Role.VIEWER)
def ingest_stats():
    svc = services()
    loss = [{"device": s["device"], **loss_summary(s)} for s in svc.storage.seq_stats()]
    return jsonify(
        workers=svc.storage.worker_stats(),
        rejects=svc.storage.reject_counts(),
        delivery={
            "devices": len(loss),
            "lost": sum(x["lost"] for x in loss),
            "dropped_by_devices": sum(x["dropped_by_device"] for x in loss),
            "reinstalls": sum(x["reinstalls"] for x in loss),
            "lossy_devices": [x for x in loss if x["lost"]][:100],
        },
    )
