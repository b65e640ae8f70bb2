"""The Flask app factory: JSON API blueprints, the web console, error handlers and /metrics."""

from __future__ import annotations

from collections.abc import Iterable

from flask import Blueprint, Flask, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fleet_server.api import BLUEPRINTS
from fleet_server.api.common import register_error_handlers
from fleet_server.body_gate import limit_app_bodies
from fleet_server.broker import BrokerCollector
from fleet_server.config import ServerConfig
from fleet_server.context import Services
from fleet_server.metrics import make_registry, tls_certificates


def create_app(
    config: ServerConfig,
    *,
    services: Services,
    blueprints: Iterable[Blueprint] | None = None,
    console: bool = True,
) -> Flask:
    """Build the WSGI app over `services`, which the composition root (`fleet_server.service`) built.
    `console` adds the web console (its pages, static files and security headers)."""
    app = Flask(__name__, static_folder=None)
    limit_app_bodies(app)  # a body limit per route: bundle uploads large, everything else small
    app.json.sort_keys = False  # type: ignore[attr-defined]
    svc = services
    app.extensions["edgefleet"] = svc
    for bp in blueprints if blueprints is not None else BLUEPRINTS:
        app.register_blueprint(bp)
    if console:
        from fleet_server.console.site import init_console

        init_console(app)
    register_error_handlers(app)
    registry = make_registry(svc.storage, tls_certificates(svc.config))
    registry.register(BrokerCollector(svc))  # this process's managed broker: up, restarts

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)

    return app
