"""fleet_server: device and model registry, MQTT ingest, fleet drift and alerts, REST API.

The public API is loaded lazily so that `import fleet_server.drift` (used by the simulator and
tools) does not pull in Flask, paho or SQLite.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "create_app": "fleet_server.app",
    "ServerConfig": "fleet_server.config",
    "load_config": "fleet_server.config",
    "FleetServer": "fleet_server.service",
    "Services": "fleet_server.context",
    "bootstrap": "fleet_server.service",
    "publish_desired": "fleet_server.desired",
    "Storage": "fleet_server.storage",
    "SqliteStorage": "fleet_server.storage.sqlite",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fleet_server' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
