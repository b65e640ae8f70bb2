"""Saved device groups: a name for a tag query, its members and their counts, device tags that
change, and a rollout target that names a group (resolved to the group's query when created).

Membership is never stored: it is the query evaluated over the devices' current tags, so a device
whose tags change, or a new device, is in every group it matches from then on.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from fleet_server.group_query import GroupQueryError, parse_query

if TYPE_CHECKING:
    from fleet_server.context import Services

GROUP_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
TAG_KEY = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")
MAX_TAG_VALUE = 256


class DeviceGroupError(ValueError):
    """A group request that cannot be done; the message says why and what to do."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _all_devices(svc: Services) -> list[dict[str, Any]]:
    return svc.storage.list_devices(limit=10_000_000)


def _with_counts(row: dict[str, Any], devices: list[dict[str, Any]]) -> dict[str, Any]:
    query = parse_query(row["query"])
    members = [d for d in devices if query.matches(d["id"], d["tags"])]
    by_status: dict[str, int] = {}
    for d in members:
        by_status[d["status"]] = by_status.get(d["status"], 0) + 1
    return {**row, "members": len(members), "online": by_status.get("online", 0),
            "offline": by_status.get("offline", 0)}


def save_group(svc: Services, name: str, query: str, description: str = "", actor: str = "") -> dict[str, Any]:
    """Create a group or change its query; returns it with its member counts."""
    if not isinstance(name, str) or not GROUP_NAME.match(name):
        raise DeviceGroupError(
            f"group name {name!r}: 1-64 of a-z 0-9 . _ - starting with a letter or digit, e.g. madrid-pumps"
        )
    try:
        parsed = parse_query(query)
    except GroupQueryError as exc:
        raise DeviceGroupError(f"group {name!r}: {exc}") from exc
    if not isinstance(description, str) or len(description) > 500:
        raise DeviceGroupError("a group's description is text of at most 500 characters")
    now = svc.clock()
    existing = svc.storage.get_device_group(name)
    row = {
        "name": name,
        "query": parsed.text,
        "description": description,
        "created_at": existing["created_at"] if existing else now,
        "created_by": existing["created_by"] if existing else actor,
        "updated_at": now,
    }
    svc.storage.put_device_group(row)
    return _with_counts(row, _all_devices(svc))


def get_group(svc: Services, name: str) -> dict[str, Any]:
    row = svc.storage.get_device_group(name)
    if row is None:
        raise DeviceGroupError(f"no device group {name!r}; list them with GET /api/v1/groups", 404)
    return row


def list_groups(svc: Services) -> list[dict[str, Any]]:
    """Every group with its member counts (members, online, offline), by name."""
    devices = _all_devices(svc)
    return [_with_counts(row, devices) for row in svc.storage.list_device_groups()]


def group_with_members(svc: Services, name: str) -> dict[str, Any]:
    row = get_group(svc, name)
    devices = _all_devices(svc)
    query = parse_query(row["query"])
    members = sorted(d["id"] for d in devices if query.matches(d["id"], d["tags"]))
    return {**_with_counts(row, devices), "devices": members}


def delete_group(svc: Services, name: str) -> None:
    """Remove a group. Rollouts keep the query they were created with."""
    if not svc.storage.delete_device_group(name):
        raise DeviceGroupError(f"no device group {name!r}", 404)


def set_device_tags(svc: Services, device_id: str, tags: Any) -> dict[str, Any]:
    """Replace a device's tags; the groups it matches, and so the rollouts it joins, follow."""
    if not isinstance(tags, dict):
        raise DeviceGroupError('"tags" must be an object of string values, e.g. {"site": "madrid"}')
    for key, value in tags.items():
        if not isinstance(key, str) or not TAG_KEY.match(key):
            raise DeviceGroupError(f"tag key {key!r}: 1-64 of A-Z a-z 0-9 _ . : / -")
        if not isinstance(value, str) or len(value) > MAX_TAG_VALUE:
            raise DeviceGroupError(f"tag {key!r}: the value must be a string of at most {MAX_TAG_VALUE} characters")
    with svc.rollouts_lock:  # a reconcile pass sees the old tags or the new ones, never half
        if not svc.storage.set_device_tags(device_id, dict(tags)):
            raise DeviceGroupError(f"no device {device_id!r}", 404)
    device = svc.storage.get_device(device_id)
    assert device is not None
    return device


def resolve_target(svc: Services, data: dict[str, Any]) -> dict[str, Any]:
    """A rollout request whose target names a device group, with the group's query filled in."""
    target = data.get("target") if isinstance(data, dict) else None
    if not isinstance(target, dict) or not target.get("device_group"):
        return data
    name = target["device_group"]
    row = svc.storage.get_device_group(name) if isinstance(name, str) else None
    if row is None:
        raise DeviceGroupError(f"the target names device group {name!r}, which does not exist; "
                               "create it first (PUT /api/v1/groups/NAME)")
    if target.get("query") not in (None, row["query"]):
        raise DeviceGroupError(f"the target gives device group {name!r} and another query: give one of them")
    return {**data, "target": {**target, "query": row["query"]}}
