"""Console area: realized performance per model version (concept-drift view: input drift beside
realized accuracy on one time axis, per-class figures, reliability diagram, devices)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from fleet_server import performance_service
from fleet_server.api.common import services
from fleet_server.console.web import page, render

bp = Blueprint("console_performance", __name__, url_prefix="/console")


def performance_versions(svc: Any) -> list[dict[str, Any]]:
    """Registered model versions, those with feedback first, with their label counts."""
    labels = {(v["model"], v["version"]): v.get("labels", 0) for v in performance_service.versions(svc)}
    rows = [{"model": m["name"], "version": m["version"], "labels": labels.get((m["name"], m["version"]), 0)}
            for m in svc.storage.list_models()]
    rows.sort(key=lambda r: (not r["labels"], r["model"]))
    return rows


@bp.get("/performance", endpoint="page")
@page()
def performance_page():
    return render("performance.html", active="performance", versions=performance_versions(services()))
