"""Rollout operations (create, pause, resume, advance, abort) and the controller's reconcile pass.

The package: `records` (rows, plans, errors), `operations` (operator actions), `stages` (stage
transitions), `controller` (the reconcile pass), `device_status` (each device's status) and
`status` (the status document).

Every decision is derived from state in storage: operator actions only change a rollout's row
(and write the audit log); `reconcile` computes what each device should run, publishes only
what differs from what the device was last told, follows `reported`/`events`, evaluates the
gates and moves the rollout on. Killing the server at any point loses nothing: the next pass
recomputes the same cohorts from the stored assignments and continues.
"""

from __future__ import annotations

from fleet_server.rollouts.controller import reconcile
from fleet_server.rollouts.operations import abort, advance, create_rollout, pause, resume
from fleet_server.rollouts.records import (
    CONTROLLER,
    FAILED_OUTCOMES,
    PROBATION_STATES,
    RolloutConflict,
    RolloutNotFound,
    get_row,
    load_plan,
    spec_of,
)
from fleet_server.rollouts.status import list_rollouts, rollout_status

__all__ = [
    "CONTROLLER",
    "FAILED_OUTCOMES",
    "PROBATION_STATES",
    "RolloutConflict",
    "RolloutNotFound",
    "abort",
    "advance",
    "create_rollout",
    "get_row",
    "list_rollouts",
    "load_plan",
    "pause",
    "reconcile",
    "resume",
    "rollout_status",
    "spec_of",
]
