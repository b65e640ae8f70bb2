"""Console area: the audit log (logins, every change, every refusal)."""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from fleet_server.api.common import arg_int, require, services
from fleet_server.auth import Role
from fleet_server.console import accounts
from fleet_server.console.web import page, render

bp = Blueprint("console_audit", __name__, url_prefix="/console")


@bp.get("/audit", endpoint="page")
@page()
def audit_page():
    return render("audit.html", active="audit")


@bp.get("/api/audit")
@require(Role.VIEWER)
def audit_log():
    return jsonify(audit=accounts.audit_log(services(), request.args.get("target") or None,
                                            min(arg_int("limit", 200), 1000)))


@bp.get("/api/locked-logins")
@require(Role.OPERATOR)
def locked_logins():
    """Operator names and client addresses locked out by too many failed logins (all processes)."""
    return jsonify(locked=accounts.locked_logins(services()))
