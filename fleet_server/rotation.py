"""Device password rotation: a new password reaches the online device over its own authenticated
channels, and replaces the old one (registry, downloads, broker) only once the device proves it
holds it.

1. `request_rotation` (CLI, API, console) opens a rotation and announces it, retained, on the
   device's `credentials` topic, which only that device (and the server) may read. The notice
   holds no secret.
2. The device asks for its new password (`issue_password`), authenticated with its current one
   over HTTP(S); only hashes are stored, the password itself exists only in that answer.
3. The device saves it and confirms with it (`confirm_rotation`): the registry's hashes switch,
   the broker gets the new password (the plugin disconnects the old session; the device logs in
   again with the new one) and the notice is cleared. From then on the old password is refused.
Until the confirmation the old password stays valid. A rotation not confirmed within
`rotation_grace_s` expires (the old password stays; nothing was switched) and shows as expired;
a lost device is revoked instead, which takes effect on the broker at once.
"""

from __future__ import annotations

import json
import logging
import secrets
from typing import TYPE_CHECKING, Any

from edge_agent.protocol import topic
from fleet_server.auth import hash_password, mosquitto_hash, new_device_password
from fleet_server.broker_accounts import DynsecError, password_changed
from fleet_server.devices import DeviceError

if TYPE_CHECKING:
    from fleet_server.context import Services

log = logging.getLogger(__name__)


def _active_device(svc: Services, device_id: str) -> dict[str, Any]:
    device = svc.storage.get_device(device_id)
    if device is None:
        raise DeviceError(f"no device {device_id!r}; list devices with 'edgefleet server list-devices'", 404)
    if device["revoked_at"] is not None:
        raise DeviceError(f"device {device_id!r} is revoked; provision a new device instead", 409)
    return device


def rotation_status(svc: Services, device_id: str) -> dict[str, Any] | None:
    """The device's latest rotation: pending, issued (the device took the password), confirmed or
    expired; None if it never had one."""
    row = svc.storage.get_rotation(device_id)
    if row is None:
        return None
    if row["confirmed_at"] is not None:
        state = "confirmed"
    elif row["expires_at"] <= svc.clock():
        state = "expired"
    elif row["issued_at"] is not None:
        state = "issued"
    else:
        state = "pending"
    return {
        "rotation_id": row["rotation_id"], "state": state, "requested_at": row["requested_at"],
        "requested_by": row["requested_by"], "notified_at": row["notified_at"], "issued_at": row["issued_at"],
        "confirmed_at": row["confirmed_at"], "expires_at": row["expires_at"],
    }


def request_rotation(svc: Services, device_id: str, requested_by: str = "cli") -> dict[str, Any]:
    """Open a new rotation (replacing one still pending) and announce it to the device."""
    _active_device(svc, device_id)
    now = svc.clock()
    rotation_id = secrets.token_hex(8)
    svc.storage.put_rotation(device_id, rotation_id, requested_by, now, now + svc.config.rotation_grace_s)
    announce(svc, device_id)
    return rotation_status(svc, device_id) or {}


def notice_payload(device_id: str, rotation_id: str, requested_at: float) -> bytes:
    return json.dumps({"v": 1, "device": device_id, "rotation_id": rotation_id, "requested_at": requested_at}).encode()


def announce(svc: Services, device_id: str) -> bool:
    """Publish the rotation notice (retained). Without a publisher (a CLI process), the broker-sync
    loop of a running server publishes it within seconds (`announce_pending`)."""
    row = svc.storage.get_rotation(device_id)
    if svc.publisher is None or row is None or row["confirmed_at"] is not None:
        return False
    payload = notice_payload(device_id, row["rotation_id"], row["requested_at"])
    if not svc.publisher.publish(topic(svc.config.fleet, device_id, "credentials"), payload, retain=True):  # type: ignore[arg-type]
        return False
    svc.storage.mark_rotation_notified(device_id, row["rotation_id"], svc.clock())
    return True


def announce_pending(svc: Services) -> int:
    """Announce rotations opened by another process (or while the broker was away)."""
    return sum(announce(svc, r["device"]) for r in svc.storage.rotations_to_announce(svc.clock()))


def announce_open(svc: Services) -> int:
    """Announce every open rotation again: a restarted broker holds the retained notices of its
    last save only, so a device that was offline when its notice went out would never see it."""
    now = svc.clock()
    open_rotations = [d for d in svc.storage.active_device_ids()
                      if (row := svc.storage.get_rotation(d)) is not None
                      and row["confirmed_at"] is None and row["expires_at"] > now]
    return sum(announce(svc, d) for d in open_rotations)


def _open_rotation(svc: Services, device_id: str, rotation_id: str) -> dict[str, Any]:
    row = svc.storage.get_rotation(device_id)
    if row is None or row["rotation_id"] != rotation_id or row["confirmed_at"] is not None:
        raise DeviceError(f"no password rotation {rotation_id!r} is pending for {device_id!r}", 409)
    if row["expires_at"] <= svc.clock():
        raise DeviceError(f"password rotation {rotation_id!r} of {device_id!r} expired; ask for a new one", 409)
    return row


def issue_password(svc: Services, device_id: str, rotation_id: str) -> str:
    """The device (authenticated with its current password) takes its new password. Asking again
    replaces it: a device that lost the answer before saving it just asks again."""
    _active_device(svc, device_id)
    _open_rotation(svc, device_id, rotation_id)
    password = new_device_password()
    if not svc.storage.issue_rotation(device_id, rotation_id, hash_password(password), mosquitto_hash(password),
                                      svc.clock()):
        raise DeviceError(f"password rotation {rotation_id!r} of {device_id!r} changed meanwhile; try again", 409)
    return password


def confirm_rotation(svc: Services, device_id: str, rotation_id: str, password: str) -> dict[str, Any]:
    """The device proves it holds the new password (by sending it): switch to it everywhere.

    Idempotent: a device that confirmed but did not hear the answer confirms again. Raises
    DeviceError 403 for a wrong password, 409 for no such rotation, 503 when the broker could not
    take the password (the device keeps its old one in use and confirms again later)."""
    _active_device(svc, device_id)
    row = svc.storage.get_rotation(device_id)
    if row is None or row["rotation_id"] != rotation_id:
        raise DeviceError(f"no password rotation {rotation_id!r} for {device_id!r}", 409)
    if row["confirmed_at"] is None:
        _open_rotation(svc, device_id, rotation_id)
        if not row["password_hash"] or not svc.passwords.check(device_id, password, row["password_hash"]):
            raise DeviceError("this is not the password issued for the rotation", 403)
        svc.storage.confirm_rotation(device_id, rotation_id, svc.clock())
        log.info("device %s confirmed password rotation %s", device_id, rotation_id)
    elif not svc.passwords.check(device_id, password, svc.storage.device_password_hash(device_id)):
        raise DeviceError("this is not the password issued for the rotation", 403)
    try:
        password_changed(svc, device_id, password)
    except DynsecError as exc:
        raise DeviceError(f"the broker did not take the new password yet ({exc}); confirm again", 503) from exc
    if svc.publisher is not None:  # the notice has done its job
        svc.publisher.publish(topic(svc.config.fleet, device_id, "credentials"), b"", retain=True)  # type: ignore[arg-type]
    return rotation_status(svc, device_id) or {}
