"""The REST API under /api/v1: one blueprint per area. Later areas append to `BLUEPRINTS`."""

from __future__ import annotations

from flask import Blueprint

from fleet_server.api import (
    admin,
    alerts,
    cluster,
    credentials,
    devices,
    drift,
    groups,
    models,
    openapi,
    performance,
    rollouts,
    wheelhouse,
)

BLUEPRINTS: list[Blueprint] = [
    devices.bp,
    credentials.bp,
    models.bp,
    drift.bp,
    alerts.bp,
    admin.bp,
    rollouts.bp,
    performance.bp,
    openapi.bp,
    cluster.bp,
    groups.bp,
    wheelhouse.bp,
]

__all__ = ["BLUEPRINTS"]
