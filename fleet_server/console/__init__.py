"""The web console: one blueprint per area, server-rendered pages whose small JS modules poll
JSON endpoints, every asset served by the fleet server itself (factory LANs have no internet).

`init_console(app)` registers the blueprints, the gzip static route and the security headers.
"""

from __future__ import annotations

from flask import Blueprint, Flask

from fleet_server.console import (
    assets,
    audit,
    devices,
    drift,
    login,
    models,
    overview,
    performance,
    rollouts,
)

BLUEPRINTS: list[Blueprint] = [
    login.bp,
    overview.bp,
    devices.bp,
    models.bp,
    drift.bp,
    performance.bp,
    rollouts.bp,
    audit.bp,
    assets.bp,
]

# script-src 'self' only: no inline scripts or handlers anywhere; Chart.js styles the canvas from
# JS (CSSOM), which CSP allows without 'unsafe-inline' styles.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def init_console(app: Flask) -> None:
    """Register the console on an app built by `create_app`."""
    for bp in BLUEPRINTS:
        app.register_blueprint(bp)

    @app.after_request
    def security_headers(response):
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response


__all__ = ["BLUEPRINTS", "CSP", "SECURITY_HEADERS", "init_console"]
