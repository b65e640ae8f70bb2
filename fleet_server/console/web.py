"""Plumbing shared by the console's blueprints: who is logged in, page guards, rendering."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from flask import Response, redirect, render_template, request, url_for

from fleet_server.api.common import audit, services, session_identity
from fleet_server.auth import Role

NAV = (
    ("overview", "Overview", "console_overview.page"),
    ("devices", "Devices", "console_devices.page"),
    ("models", "Models", "console_models.page"),
    ("drift", "Drift", "console_drift.page"),
    ("performance", "Performance", "console_performance.page"),
    ("rollouts", "Rollouts", "console_rollouts.page"),
    ("audit", "Audit log", "console_audit.page"),
)
POLL_MS = 3000  # how often pages refresh their data


def page(role: Role = Role.VIEWER) -> Callable:
    """Decorator for HTML pages: log in first; a role too low gets a 403 page (and an audit row)."""

    def wrap(view: Callable) -> Callable:
        @functools.wraps(view)
        def inner(*args: Any, **kwargs: Any) -> Any:
            identity = session_identity()
            if identity is None:
                return redirect(url_for("console_auth.login", next=request.full_path.rstrip("?")))
            if not Role(identity["role"]).allows(role):
                audit(request.endpoint or request.path, "denied", identity, reason=f"needs {role.value}")
                return render("error.html", status=403, active="",
                              message=f"This page needs the {role.value} role; you are a {identity['role']}."), 403
            return view(*args, **kwargs)

        return inner

    return wrap


def render(template: str, *, active: str, status: int = 200, **context: Any) -> str:
    """Render a console page with the operator, the CSRF token and the navigation."""
    identity = session_identity()
    return render_template(
        f"console/{template}",
        operator=identity,
        can_act=bool(identity and Role(identity["role"]).allows(Role.OPERATOR)),
        csrf_token=identity["csrf_token"] if identity else "",
        nav=NAV,
        active=active,
        poll_ms=POLL_MS,
        fleet=services().config.fleet,
        **context,
    )


def no_store(response: Response) -> Response:
    response.headers["Cache-Control"] = "no-store"
    return response
