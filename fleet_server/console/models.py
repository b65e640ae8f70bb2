"""Console area: the model registry (reports, sizes, lineage, reference profile) and downloads."""

from __future__ import annotations

from flask import Blueprint, jsonify, send_file

from fleet_server import registry
from fleet_server.api.common import require, services
from fleet_server.auth import Role
from fleet_server.console import data
from fleet_server.console.web import page, render

bp = Blueprint("console_models", __name__, url_prefix="/console")


@bp.get("/models", endpoint="page")
@page()
def models_page():
    return render("models.html", active="models")


@bp.get("/api/models")
@require(Role.VIEWER)
def models():
    return jsonify(data.models(services()))


@bp.get("/models/<name>/<version>/bundle", endpoint="download")
@page()
def download(name: str, version: str):
    path, row = registry.bundle_file(services(), name, version)
    return send_file(path, mimetype="application/zip", as_attachment=True,
                     download_name=f"{row['name']}-{row['version']}.efb", etag=row["sha256"], conditional=True)
