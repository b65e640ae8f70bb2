"""The nodes of the deployment, readiness, and the answer while the database is unreachable."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from fleet_server.api.common import require, services
from fleet_server.auth import Role
from fleet_server.cluster import cluster_view
from fleet_server.context import Services
from fleet_server.storage import StorageUnavailable
from fleet_server.storage.open import backend, redact

bp = Blueprint("cluster", __name__, url_prefix="/api/v1")

# Answered even while the database is unreachable: liveness, readiness, the API's own description.
NO_DATABASE = ("/api/v1/health", "/api/v1/ready", "/api/v1/openapi.json")


def database_name(svc: Services) -> str:
    url = svc.config.storage_location
    return f"PostgreSQL database {redact(url)}" if backend(url) == "postgresql" else f"SQLite database {url}"


def unavailable(svc: Services, reason: str):
    message = f"the {database_name(svc)} is unavailable ({reason}); retry when /api/v1/ready says ready"
    response = jsonify(error=message, status=503, ready=False)
    response.headers["Retry-After"] = "2"
    return response, 503


@bp.get("/cluster")
@require(Role.VIEWER)
def cluster():
    svc = services()
    return jsonify(
        node=svc.node.node_id if svc.node else None,
        leader=svc.leadership.is_leader(),
        nodes=cluster_view(svc.storage),
    )


@bp.get("/ready")
def ready():
    """Readiness for a load balancer: 200 while this node reaches its database, else 503."""
    svc = services()
    ok, reason = svc.leadership.database_ok()
    if not ok:
        return unavailable(svc, reason)
    return jsonify(ready=True, node=svc.node.node_id if svc.node else None, leader=svc.leadership.is_leader())


@bp.before_app_request
def database_gate():
    """While this node's database check fails, API and console data requests get a 503 at once
    instead of waiting for a pooled connection that cannot be made."""
    path = request.path
    if not (path.startswith("/api/") or path.startswith("/console/api/")) or path in NO_DATABASE:
        return None
    svc: Services = current_app.extensions["edgefleet"]
    ok, reason = svc.leadership.database_ok()
    return None if ok else unavailable(svc, reason)


def _database_error(exc: Exception):
    svc: Services = current_app.extensions["edgefleet"]
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return unavailable(svc, text)


# A request that meets the outage before the node's check does: a 503 too (the storage backend
# turns its driver's connection errors into StorageUnavailable).
bp.app_errorhandler(StorageUnavailable)(_database_error)
