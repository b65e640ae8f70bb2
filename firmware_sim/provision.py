"""Getting simulated devices registered: through the server's services, its data dir, or REST.

Whichever way, the result is the agent configuration the server generates for a real device
(its MQTT account, download password and trusted keys). It is kept in the simulation's work dir
so that a rerun against the same server reuses the devices instead of failing on duplicates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import requests


class ProvisionError(RuntimeError):
    """A device could not be registered; the message says why and what to do."""


class Provisioner(Protocol):
    def provision(self, device_id: str, tags: dict[str, str], window_s: float) -> str:
        """Register a device; return its agent configuration (TOML text)."""
        ...


class ServicesProvisioner:
    """In-process: call `fleet_server.devices.provision_device` on a running server's services."""

    def __init__(self, svc: Any) -> None:
        self.svc = svc

    def provision(self, device_id: str, tags: dict[str, str], window_s: float) -> str:
        from fleet_server.devices import DeviceError, provision_device

        try:
            return provision_device(self.svc, device_id, tags, window_s=window_s).agent_config
        except DeviceError as exc:
            raise ProvisionError(str(exc)) from exc


class DataDirProvisioner(ServicesProvisioner):
    """Through the server's data dir, as `edgefleet server add-device` does (the running
    server's broker picks up the new accounts within its broker-sync interval)."""

    def __init__(self, data_dir: str | Path) -> None:
        from fleet_server.config import load_config
        from fleet_server.service import bootstrap

        path = Path(data_dir)
        if not (path / "fleet.db").exists():
            raise ProvisionError(f"{path} is not a fleet server data dir (no fleet.db); pass the server's --data-dir")
        super().__init__(bootstrap(load_config(path)))

    def close(self) -> None:
        self.svc.storage.close()


class RestProvisioner:
    """Through the REST API with an operator token (`POST /api/v1/devices`)."""

    def __init__(self, server_url: str, token: str) -> None:
        self.url = server_url.rstrip("/")
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"

    def provision(self, device_id: str, tags: dict[str, str], window_s: float) -> str:
        try:
            r = self.session.post(
                f"{self.url}/api/v1/devices", json={"id": device_id, "tags": tags, "window_s": window_s}, timeout=30
            )
        except requests.RequestException as exc:
            raise ProvisionError(f"cannot reach the fleet server at {self.url}: {exc}") from exc
        if r.status_code != 201:
            try:
                message = r.json().get("error", r.text)
            except ValueError:
                message = r.text
            raise ProvisionError(f"provisioning {device_id} failed: HTTP {r.status_code}: {message}")
        return r.json()["agent_config"]
