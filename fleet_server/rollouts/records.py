"""A rollout's stored row and plan: reading them, the errors they raise, the shared constants."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleet_server.rollout_model import ACTIVE_STATES, RolloutError, RolloutSpec, Target, parse_spec

if TYPE_CHECKING:
    from fleet_server.context import Services

CONTROLLER = "controller"  # the audit log's actor for the controller's own decisions
# disk_full: failed for space; the device retries by itself (reported.update_retry), so it counts
# as failed only if it stops trying.
FAILED_OUTCOMES = ("failure", "rolled_back", "rollback_failed", "disk_full")
PROBATION_STATES = ("Activate", "Probation")  # live but not committed: a restart rolls back
ACTIVE = tuple(s.value for s in ACTIVE_STATES)


class RolloutNotFound(RolloutError):
    status = 404


class RolloutConflict(RolloutError):
    status = 409


def spec_of(row: dict[str, Any]) -> RolloutSpec:
    return parse_spec(row["spec"])


def get_row(svc: Services, rollout_id: str) -> dict[str, Any]:
    row = svc.storage.get_rollout(rollout_id)
    if row is None:
        raise RolloutNotFound(f"no rollout {rollout_id!r}; list rollouts with 'edgefleet server rollout list'")
    return row


def all_devices(svc: Services) -> list[dict[str, Any]]:
    return svc.storage.list_devices(limit=10_000_000)


def matching(target: Target, devices: list[dict[str, Any]]) -> list[str]:
    return [d["id"] for d in devices if target.matches(d["id"], d["tags"])]


def load_plan(path: str | Path) -> dict[str, Any]:
    """A rollout plan file: TOML (`.toml`) or JSON, with the fields of `POST /api/v1/rollouts`."""
    path = Path(path)
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        data = json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise RolloutError(f"{path} is not a valid rollout plan ({exc})") from exc
    if not isinstance(data, dict):
        raise RolloutError(f"{path}: a rollout plan is an object with model, version, target and stages")
    return data
