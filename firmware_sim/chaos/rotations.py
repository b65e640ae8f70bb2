"""Device password rotations during the chaos: asked for as `edgefleet server rotate-device-password`
does (the server's storage, from another process: the running server announces them), then
checked from both ends once the run has settled: the device, the server's registry and the broker.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from typing import Any

from firmware_sim.chaos.broker_view import login
from firmware_sim.chaos.report import Invariant
from firmware_sim.fleet import SimFleet


@dataclass(frozen=True)
class DeviceCredentials:
    """What a rotated device holds and does once the run has settled (read before the fleet stops)."""

    password: str  # the password in force on the device ("" : still the provisioned one)
    pending: bool  # a rotation taken from the server but not confirmed
    online: bool
    link_password: str  # the password its MQTT link logs in with
    last_error: str | None  # the rotation's last failure on the device


class Rotations:
    """The rotations the driver asked for, and what became of them."""

    def __init__(self, svc: Any, fleet: SimFleet) -> None:
        self.svc, self.fleet = svc, fleet
        self.old: dict[str, str] = {}  # device -> the password it had before its rotation
        self.requested: dict[str, str] = {}  # device -> rotation id

    def rotate(self, device_id: str) -> str:
        """Open a rotation of the device's password; returns the rotation's state (`pending`)."""
        from fleet_server.rotation import request_rotation

        toml = tomllib.loads((self.fleet.device_dir(device_id) / "agent.toml").read_text())
        self.old.setdefault(device_id, toml["mqtt"]["password"])
        status = request_rotation(self.svc, device_id, "chaos")
        self.requested[device_id] = status["rotation_id"]
        return status["state"]

    def announced(self, device_id: str) -> bool:
        """The running server has published the device's rotation notice."""
        row = self.svc.storage.get_rotation(device_id)
        return row is not None and row["notified_at"] is not None

    def server_state(self, device_id: str) -> str | None:
        from fleet_server.rotation import rotation_status

        status = rotation_status(self.svc, device_id)
        return status["state"] if status else None

    def settled(self) -> bool:
        """Every rotation confirmed to the server and in force on its device."""
        observed = self.observe()
        return all(self.server_state(d) == "confirmed" and not c.pending and c.password and c.online
                   and c.link_password == c.password for d, c in observed.items())

    def observe(self) -> dict[str, DeviceCredentials]:
        from edge_agent.credentials import CredentialStore

        out = {}
        for device_id in self.requested:
            device = self.fleet.devices[device_id]
            store = CredentialStore(device.config.data_dir, "")
            agent = device.agent
            link = agent.link if agent is not None else None
            rotator = agent.rotator if agent is not None else None
            out[device_id] = DeviceCredentials(
                password=store.state.password, pending=store.pending is not None,
                online=bool(link is not None and link.connected),
                link_password=link.config.mqtt.password if link is not None else "",
                last_error=rotator.last_error if rotator is not None else None)
        return out

    def invariants(self, observed: dict[str, DeviceCredentials], broker_port: int) -> list:
        """Checked with the fleet stopped (a login with a device's own client id would take over
        its session): each rotated device ran on its new password, which the server and broker
        take and the old one they refuse."""
        switched, server_off, broker_off = [], [], []
        refused = 0
        for device_id, c in sorted(observed.items()):
            old = self.old[device_id]
            state = self.server_state(device_id)
            if not (state == "confirmed" and c.password and c.password != old and not c.pending
                    and c.online and c.link_password == c.password):
                switched.append(f"{device_id}: server says {state}, device has "
                                f"{'a new' if c.password and c.password != old else 'its old'} password"
                                f"{' and one pending' if c.pending else ''}, "
                                f"{'online' if c.online else 'offline'}, its link logs in with "
                                f"{_which(c.link_password, c.password, old)} (last error {c.last_error!r})")
                continue
            stored = self.svc.storage.device_password_hash(device_id)
            if not self.svc.passwords.check(device_id, c.password, stored) or \
                    self.svc.passwords.check(device_id, old, stored):
                server_off.append(f"{device_id}: the registry does not take the new password only")
            with_new = login("127.0.0.1", broker_port, device_id, c.password)
            with_old = login("127.0.0.1", broker_port, device_id, old)
            if with_new != "Success" or with_old == "Success":
                broker_off.append(f"{device_id}: broker login with the new password: {with_new}; "
                                  f"with the old one: {with_old}")
            else:
                refused += 1
        n = len(observed)
        return [
            Invariant("rotated devices run on their new password", f"{n}/{n}", f"{n - len(switched)}/{n}",
                      not switched, tuple(switched)),
            Invariant("the registry takes only the new password", f"{n - len(switched)}/{n - len(switched)}",
                      f"{n - len(switched) - len(server_off)}/{n - len(switched)}", not server_off,
                      tuple(server_off)),
            Invariant("broker refuses the old password, takes the new", f"{n - len(switched)} refused",
                      f"{refused} refused", not broker_off, tuple(broker_off)),
        ]


def _which(password: str, new: str, old: str) -> str:
    if new and password == new:
        return "the new password"
    return "the old password" if password == old else "another password"
