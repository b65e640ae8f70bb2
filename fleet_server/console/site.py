"""The console's pages on an app: every blueprint, plus the security headers on every response."""

from __future__ import annotations

from flask import Blueprint, Flask

from fleet_server.console import (
    SECURITY_HEADERS,
    assets,
    audit,
    devices,
    drift,
    login,
    models,
    oidc,
    overview,
    performance,
    rollouts,
)

BLUEPRINTS: list[Blueprint] = [
    login.bp,
    oidc.bp,
    overview.bp,
    devices.bp,
    models.bp,
    drift.bp,
    performance.bp,
    rollouts.bp,
    audit.bp,
    assets.bp,
]


def init_console(app: Flask) -> None:
    """Register the console on an app built by `create_app`."""
    for bp in BLUEPRINTS:
        app.register_blueprint(bp)

    @app.after_request
    def security_headers(response):
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response
