"""Publishing a device's desired state: the seam rollouts (and tests) use to move devices."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge_agent.protocol import DesiredState

if TYPE_CHECKING:
    from fleet_server.context import Services


def publish_desired(svc: Services, device_id: str, desired: DesiredState) -> bool:
    """Publish a device's desired state (retained) and remember what the device was last told."""
    if svc.publisher is None:
        raise RuntimeError("no MQTT publisher: publish_desired needs a running server")
    ok = svc.publisher.publish_desired(device_id, desired)
    if ok:  # what each device was last told: rollouts publish only what differs from it
        svc.storage.put_device_desired(device_id, {
            "model": desired.model, "version": desired.version, "mode": desired.mode,
            "rollout_id": desired.rollout_id, "allow_downgrade": desired.allow_downgrade,
            "published_at": svc.clock(),
        })
    return ok
