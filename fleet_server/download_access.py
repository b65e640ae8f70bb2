"""Which bundles a device may download: only versions it is, or was, told to take.

A device's credentials open the version named by its current desired state, those of every
rollout it took part in (the version, and the one it ran before, which an abort sends it back
to), and the fleet target that matches it (a device that joins later is told it). Only the
server's own records count: what a device reports or sends as events never opens a download
(a stolen password must not be able to ask for any version by claiming to run it). Anything
else is refused: the registry is not a download site for every model to every device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fleet_server.rollout_model import Target

if TYPE_CHECKING:
    from fleet_server.context import Services


def allowed_versions(svc: Services, device_id: str, model: str) -> set[str]:
    """The versions of `model` that `device_id` may download."""
    storage = svc.storage
    device = storage.get_device(device_id)
    if device is None or device["revoked_at"] is not None:
        return set()
    allowed = {version for m, version in storage.device_told_versions(device_id) if m == model}
    for row in storage.fleet_targets():
        if row["model"] != model or not row["version"]:
            continue
        t = row["target"]
        target = Target(all=t.get("all", False), tags=t.get("tags") or {}, group=t.get("group"),
                        devices=tuple(t.get("devices") or ()))
        if target.matches(device_id, device.get("tags") or {}):
            allowed.add(row["version"])
    return allowed


def may_download(svc: Services, device_id: str, model: str, version: str) -> bool:
    return version in allowed_versions(svc, device_id, model)
