"""Console area: the fleet overview (devices, versions in use, alerts, rollouts, ingest health)."""

from __future__ import annotations

from flask import Blueprint, jsonify, redirect, url_for

from fleet_server.api.common import require, services
from fleet_server.auth import Role
from fleet_server.cluster import cluster_view
from fleet_server.console import data
from fleet_server.console.web import page, render

bp = Blueprint("console_overview", __name__)


@bp.get("/")
def root():
    return redirect(url_for("console_overview.page"))


@bp.get("/console/", endpoint="page")
@page()
def overview_page():
    return render("overview.html", active="overview")


@bp.get("/console/api/overview")
@require(Role.VIEWER)
def overview():
    svc = services()
    # The deployment's server nodes: which leads, which are gone (fleet_server.cluster).
    return jsonify({**data.overview(svc), "cluster": cluster_view(svc.storage)})
