"""What a rollout is: target, stages, gates and on-failure action, with defaults and validation.

Pure data; the controller (`fleet_server.rollouts`) stores and drives it.
"""

from __future__ import annotations

import enum
import hashlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from fleet_server.group_query import GroupQueryError, parse_query


class RolloutError(ValueError):
    """A rollout request that cannot be accepted; the message says why and what to change."""

    status = 400  # the HTTP status the REST API answers with


class RolloutState(enum.StrEnum):
    RUNNING = "running"
    PAUSED = "paused"  # by an operator or a failed gate with on_failure = pause
    COMPLETED = "completed"
    ABORTING = "aborting"  # devices being sent back to their previous version
    ABORTED = "aborted"


ACTIVE_STATES = (RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.ABORTING)

# One table for the rollout's own flow: (state, action) -> next state.
TRANSITIONS: dict[tuple[RolloutState, str], RolloutState] = {
    (RolloutState.RUNNING, "pause"): RolloutState.PAUSED,
    (RolloutState.RUNNING, "gate_failed_pause"): RolloutState.PAUSED,
    (RolloutState.RUNNING, "gate_failed_rollback"): RolloutState.ABORTING,
    (RolloutState.RUNNING, "abort"): RolloutState.ABORTING,
    (RolloutState.RUNNING, "complete"): RolloutState.COMPLETED,
    (RolloutState.RUNNING, "advance"): RolloutState.RUNNING,
    (RolloutState.PAUSED, "resume"): RolloutState.RUNNING,
    (RolloutState.PAUSED, "advance"): RolloutState.RUNNING,
    (RolloutState.PAUSED, "abort"): RolloutState.ABORTING,
    (RolloutState.ABORTING, "aborted"): RolloutState.ABORTED,
    (RolloutState.COMPLETED, "abort"): RolloutState.ABORTING,  # blue-green: instant way back
}


class RolloutStateError(RolloutError):
    """An action that does not apply to the rollout's state (any more): a conflict, not bad input."""

    status = 409


OPERATOR_ACTIONS = ("pause", "resume", "advance", "abort")


def next_state(state: RolloutState, action: str) -> RolloutState:
    try:
        return TRANSITIONS[(state, action)]
    except KeyError:
        raise RolloutStateError(f"cannot {action} a rollout that is {state.value}") from None


def is_blue_green(stages: tuple[Stage, ...]) -> bool:
    """One live stage of every device: what `blue_green` makes (its abort is the way back)."""
    return len(stages) == 1 and stages[0].mode == "live" and stages[0].percent == 100


def allowed_actions(state: RolloutState, *, blue_green: bool, still_current: bool) -> list[str]:
    """The operator actions that apply now; the console enables only these and the API refuses
    the others with 409. A completed rollout can be aborted only if it is blue-green (its abort is
    the documented instant way back) and no later rollout has replaced the version it set."""
    actions = [a for a in OPERATOR_ACTIONS if (state, a) in TRANSITIONS]
    if state is RolloutState.COMPLETED and not (blue_green and still_current):
        actions.remove("abort")
    return actions


@dataclass(frozen=True)
class Stage:
    """One step: how many devices, in which mode, and how long they must prove themselves."""

    percent: float | None = None
    count: int | None = None
    mode: str = "live"  # "shadow": candidate runs beside the active model, answers come from it
    min_soak_s: float = 300.0
    min_reporting: int = 1  # canary devices that must have reported the stage's version
    approval: bool = False  # wait for an operator's `advance` after the gates pass

    def size(self, population: int) -> int:
        """Devices in this stage's cohort for a target of `population` devices (at least one)."""
        if population == 0:
            return 0
        if self.count is not None:
            return min(self.count, population)
        return min(population, max(1, math.ceil(population * (self.percent or 0.0) / 100.0)))


@dataclass(frozen=True)
class Target:
    """Which devices a rollout is for: all of them, a tag match, a group, a saved device group's
    query, or a list."""

    all: bool = False
    tags: dict[str, str] = field(default_factory=dict)
    group: str | None = None  # shorthand for the tag group=<name>
    devices: tuple[str, ...] = ()
    # A saved device group (fleet_server.device_groups): its name, and its query as it was when
    # the rollout was created (editing the group later does not move a rollout's target).
    device_group: str | None = None
    query: str | None = None

    def matches(self, device_id: str, device_tags: dict[str, str]) -> bool:
        if self.all:
            return True
        if self.devices and device_id in self.devices:
            return True
        if self.query and parse_query(self.query).matches(device_id, device_tags):
            return True
        wanted = dict(self.tags)
        if self.group:
            wanted["group"] = self.group
        return bool(wanted) and all(device_tags.get(k) == v for k, v in wanted.items())


# Gate defaults: (threshold, comparison, minimum sample, what the sample counts).
GATE_DEFAULTS: dict[str, dict[str, Any]] = {
    "update_failure_rate": {"max": 0.10, "min_sample": 1, "unit": "devices"},
    "error_rate_delta": {"max": 0.02, "min_sample": 200, "unit": "predictions"},
    # Both p95s are raised to floor_ms first: below a millisecond, differences are scheduling
    # noise (the agent's probation uses the same idea), not a slower model.
    "p95_latency_ratio": {"max": 2.0, "min_sample": 200, "unit": "predictions", "floor_ms": 1.0},
    "prediction_js": {"max": 0.10, "min_sample": 500, "unit": "predictions"},
    "shadow_agreement": {"min": 0.95, "min_sample": 200, "unit": "comparisons"},
    "input_drift_psi": {"max": 0.25, "min_sample": 500, "unit": "predictions"},
    "timeout_share": {"max": 0.25, "min_sample": 1, "unit": "devices"},
    # Realized accuracy (ground-truth feedback) of the canary minus the control, live stages only.
    # Pending while either cohort has fewer than min_sample labels, for at most wait_s after the
    # stage started; then skipped, so a fleet without labels never blocks a rollout.
    "accuracy_delta": {"min": -0.05, "min_sample": 200, "unit": "labels", "wait_s": 0.0},
    # Label-free: the canary's estimated accuracy (calibrated confidence, see docs/performance.md)
    # minus the control's, live stages; it fails only when the difference is also beyond its
    # sampling noise. Skipped once accuracy_delta has its labels: realized accuracy decides then.
    # The controller re-judges it on every pass as rows arrive: the noise bar is high (3 standard
    # errors) and the sample large, or identical models would now and then fail it by chance.
    "estimated_accuracy_delta": {"min": -0.05, "min_sample": 500, "unit": "predictions"},
    # The canary's PCA reconstruction errors against the version's reference (multivariate drift).
    "multivariate_drift_psi": {"max": 0.25, "min_sample": 500, "unit": "predictions"},
    # Share of rows refused by input validation, canary minus control (a schema that refuses
    # what devices send, or a sensor the new model cannot take).
    "input_error_rate_delta": {"max": 0.02, "min_sample": 200, "unit": "rows"},
}

DEFAULT_STAGES: tuple[Stage, ...] = (
    Stage(percent=5, mode="shadow"),
    Stage(percent=1, mode="live"),
    Stage(percent=10, mode="live"),
    Stage(percent=50, mode="live"),
    Stage(percent=100, mode="live"),
)


@dataclass(frozen=True)
class RolloutSpec:
    model: str
    version: str
    target: Target
    stages: tuple[Stage, ...] = DEFAULT_STAGES
    gates: dict[str, dict[str, Any]] = field(default_factory=lambda: {})
    on_failure: str = "pause"  # or "rollback"
    device_timeout_s: float = 600.0  # a device that has not reported by then is timed out
    name: str = ""
    # When it may act (fleet_server.rollouts.schedule, normalized): not_before, maintenance
    # window, per-device windows. None: at once, any time.
    schedule: dict[str, Any] | None = None

    def gate(self, name: str) -> dict[str, Any]:
        """A gate's settings: the defaults overlaid with this rollout's overrides."""
        return {**GATE_DEFAULTS[name], **self.gates.get(name, {})}

    def enabled_gates(self) -> list[str]:
        return [g for g in GATE_DEFAULTS if self.gates.get(g, {}).get("enabled", True)]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["target"]["devices"] = list(self.target.devices)
        for key in ("device_group", "query"):  # absent, not null: older targets compare equal
            if out["target"][key] is None:
                del out["target"][key]
        out["stages"] = [asdict(s) for s in self.stages]
        if self.schedule is None:  # absent, not null: specs stored before schedules compare equal
            del out["schedule"]
        return out


def parse_spec(data: dict[str, Any]) -> RolloutSpec:
    """Validate a rollout request (API/CLI JSON) and fill in the defaults."""
    if not isinstance(data, dict):
        raise RolloutError("a rollout is a JSON object with model, version, target and stages")
    known = {"model", "version", "target", "stages", "gates", "on_failure", "device_timeout_s",
             "name", "blue_green", "schedule"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RolloutError(f"unknown rollout field(s) {unknown}; allowed: {sorted(known)}")
    for key in ("model", "version"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise RolloutError(f"'{key}' is required: the registered model's {key}")
    target = parse_target(data.get("target", {"all": True}))
    if data.get("blue_green"):
        stages: tuple[Stage, ...] = (Stage(percent=100, mode="live", min_soak_s=0.0),)
    else:
        stages = tuple(_parse_stage(s, i) for i, s in enumerate(data.get("stages") or []))
        stages = stages or DEFAULT_STAGES
    gates = data.get("gates") or {}
    if not isinstance(gates, dict):
        raise RolloutError("'gates' is an object: gate name -> settings")
    for name, settings in gates.items():
        if name not in GATE_DEFAULTS:
            raise RolloutError(f"unknown gate {name!r}; gates: {sorted(GATE_DEFAULTS)}")
        if not isinstance(settings, dict):
            raise RolloutError(f"gate {name!r}: settings must be an object, e.g. {{\"max\": 0.1}}")
        bad = set(settings) - {"max", "min", "min_sample", "enabled", "floor_ms", "wait_s"}
        if bad:
            raise RolloutError(f"gate {name!r}: unknown setting(s) {sorted(bad)}")
    on_failure = data.get("on_failure", "pause")
    if on_failure not in ("pause", "rollback"):
        raise RolloutError("'on_failure' is 'pause' or 'rollback'")
    timeout = float(data.get("device_timeout_s", 600.0))
    if timeout <= 0:
        raise RolloutError("'device_timeout_s' must be positive")
    # Imported here: the rollouts package imports this module.
    from fleet_server.rollouts.schedule import ScheduleError, parse_schedule

    try:
        schedule = parse_schedule(data.get("schedule"))
    except ScheduleError as exc:
        raise RolloutError(str(exc)) from None
    return RolloutSpec(
        model=data["model"], version=data["version"], target=target, stages=stages,
        gates=gates, on_failure=on_failure, device_timeout_s=timeout, name=str(data.get("name", "")),
        schedule=schedule.to_dict() if schedule else None,
    )


def parse_target(raw: Any) -> Target:
    """A target from its JSON form (a rollout request, a stored spec or fleet target)."""
    if not isinstance(raw, dict):
        raise RolloutError("'target' is an object: {\"all\": true} or tags/group/device_group/query/devices")
    bad = set(raw) - {"all", "tags", "group", "devices", "device_group", "query"}
    if bad:
        raise RolloutError(f"unknown target field(s) {sorted(bad)}")
    if raw.get("device_group") and not raw.get("query"):
        raise RolloutError(f"device group {raw['device_group']!r} has no query: create the rollout through the "
                           "server, which resolves the group")
    if raw.get("query"):
        try:
            parse_query(raw["query"])
        except GroupQueryError as exc:
            raise RolloutError(f"target query: {exc}") from exc
    target = Target(
        all=bool(raw.get("all", False)),
        tags={str(k): str(v) for k, v in (raw.get("tags") or {}).items()},
        group=raw.get("group"),
        devices=tuple(str(d) for d in raw.get("devices") or ()),
        device_group=raw.get("device_group") or None,
        query=raw.get("query") or None,
    )
    if not (target.all or target.tags or target.group or target.devices or target.query):
        raise RolloutError("the target selects no devices: give all, tags, group, device_group, query or devices")
    return target


def _parse_stage(raw: Any, index: int) -> Stage:
    where = f"stage {index + 1}"
    if not isinstance(raw, dict):
        raise RolloutError(f"{where}: a stage is an object with percent or count and mode")
    bad = set(raw) - {"percent", "count", "mode", "min_soak_s", "min_reporting", "approval"}
    if bad:
        raise RolloutError(f"{where}: unknown field(s) {sorted(bad)}")
    if (raw.get("percent") is None) == (raw.get("count") is None):
        raise RolloutError(f"{where}: give exactly one of percent or count")
    if raw.get("percent") is not None and not 0 < float(raw["percent"]) <= 100:
        raise RolloutError(f"{where}: percent must be in (0, 100]")
    if raw.get("count") is not None and int(raw["count"]) < 1:
        raise RolloutError(f"{where}: count must be at least 1")
    mode = raw.get("mode", "live")
    if mode not in ("live", "shadow"):
        raise RolloutError(f"{where}: mode is 'live' or 'shadow'")
    return Stage(
        percent=float(raw["percent"]) if raw.get("percent") is not None else None,
        count=int(raw["count"]) if raw.get("count") is not None else None,
        mode=mode,
        min_soak_s=float(raw.get("min_soak_s", 300.0)),
        min_reporting=int(raw.get("min_reporting", 1)),
        approval=bool(raw.get("approval", False)),
    )


def cohort_rank(rollout_id: str, device_id: str) -> int:
    """A device's place in a rollout's order: stage k takes the first size(k) devices by rank,
    so every stage's cohort includes the previous one's, and any server computes the same."""
    return int.from_bytes(hashlib.sha256(f"{rollout_id}\x00{device_id}".encode()).digest()[:8], "big")


def order_devices(rollout_id: str, device_ids: list[str]) -> list[str]:
    return sorted(device_ids, key=lambda d: (cohort_rank(rollout_id, d), d))


def stage_assignment(
    spec: RolloutSpec, rollout_id: str, device_ids: list[str], stage_index: int
) -> dict[str, str]:
    """device -> mode for every device in the cohorts of stages 0..stage_index.

    A device takes the mode of the latest stage so far whose cohort holds it: with shadow 5 %
    then live 1 %, the 1 % go live and the other 4 % stay in shadow.
    """
    ordered = order_devices(rollout_id, device_ids)
    modes: dict[str, str] = {}
    for stage in spec.stages[: stage_index + 1]:
        for device in ordered[: stage.size(len(ordered))]:
            modes[device] = stage.mode
    return modes
