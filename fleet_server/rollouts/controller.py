"""The controller's reconcile pass: one idempotent pass over every active rollout and the fleet targets.

It computes what each device should run, publishes only what differs from what the device was
last told, follows `reported`/`events`, evaluates the gates and moves the rollout on. Killing the
server at any point loses nothing: the next pass recomputes the same cohorts from the stored
assignments and continues.

A pass does not walk the fleet in Python: it reads device ids (one column; the tags only for a
device group query), the rollout's assignments as tuples, and asks the database for what differs
(devices to tell, statuses that change, with the device's status derived in SQL as
`device_status` defines it). Cohort ranks are hashed only when a stage takes new devices.

While a node leads it remembers (`Memory`) each rollout's assignments, the registered device ids
and a cursor into the devices' change numbers (`Storage.device_changes`: reported state, online
status, update events, what a device was last told). A steady pass then asks the database about
the devices that changed since the previous pass, those whose timeout has come and those on
probation, not about every assigned device. The first pass of a leadership term, a pass after one
that failed and one pass every `FULL_PASS_S` look at every device: what a pass concludes never
depends on the memory being right for longer than that.
"""

from __future__ import annotations

import heapq
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fleet_server.desired import publish_desired
from fleet_server.gates import CohortStats, GateResult, evaluate_gates, verdict
from fleet_server.group_query import parse_query
from fleet_server.rollout_model import (
    RolloutSpec,
    RolloutState,
    Stage,
    Target,
    cohort_rank,
    parse_target,
)
from fleet_server.rollout_stats import (
    canary_feature_psi,
    canary_multivariate,
    sum_feedback,
    sum_monitoring,
    sum_windows,
)
from fleet_server.rollouts.records import (
    ACTIVE,
    CONTROLLER,
    FAILED_OUTCOMES,
    PROBATION_STATES,
    spec_of,
)
from fleet_server.rollouts.schedule import Schedule, schedule_of
from fleet_server.rollouts.stages import next_stage, transition

if TYPE_CHECKING:
    from fleet_server.context import Services

log = logging.getLogger(__name__)


class Members(dict[str, tuple[int, str, str, float]]):
    """A rollout's assignments as the pass keeps them: device -> (stage, mode, status, since),
    `since` being when the device was last told (what its timeout counts from), with the pending
    devices' timeouts in a heap so that a pass finds those that came without looking at all."""

    def __init__(self, rows: Iterable[tuple[str, int, str, str, float]] = ()) -> None:
        rows = list(rows)
        super().__init__({r[0]: r[1:] for r in rows})
        self._deadlines = [(r[4], r[0]) for r in rows if r[3] == "pending"]
        heapq.heapify(self._deadlines)
        self.counts = Counter(r[3] for r in rows)  # devices by status
        self.settled: tuple[int, int] | None = None  # (stage, devices) when none needed moving (`_take`)

    def __setitem__(self, device: str, value: tuple[int, str, str, float]) -> None:
        old = self.get(device)
        if old is not None:
            self.counts[old[2]] -= 1
        self.counts[value[2]] += 1
        super().__setitem__(device, value)
        if value[2] == "pending":
            heapq.heappush(self._deadlines, (value[3], device))

    def due(self, before: float) -> set[str]:
        """The pending devices last told before `before`: their timeout has come."""
        out = set()
        while self._deadlines and self._deadlines[0][0] < before:
            since, device = heapq.heappop(self._deadlines)
            m = self.get(device)
            if m is not None and m[2] == "pending" and m[3] == since:
                out.add(device)
        return out


FULL_PASS_S = 60.0  # at least this often a pass looks at every device, whatever it remembers


@dataclass
class Memory:
    """What the leader keeps from one pass to the next (`Services.rollout_memory`)."""

    term: int  # the leadership term it belongs to: a new term starts from nothing
    cursor: int  # into `Storage.device_changes`
    full_at: float  # when the last pass that looked at every device ran
    members: dict[str, Members] = field(default_factory=dict)  # rollout -> its assignments
    probation: dict[str, set[str]] = field(default_factory=dict)  # rollout -> devices on probation
    generation: int | None = None  # `Storage.devices_generation` when `ids` was read
    ids: list[str] | None = None


@dataclass
class _Pass:
    """What one reconcile pass reads at most once and shares between rollouts."""

    svc: Services
    now: float
    memory: Memory
    changed: set[str] | None  # devices changed since the previous pass; None: look at every device
    taken: set[str] = field(default_factory=set)  # devices claimed by an older active rollout
    published: int = 0
    _ids: list[str] | None = None
    _tags: dict[str, dict[str, str]] | None = None
    _desired: dict[str, dict[str, Any]] | None = None

    def device_ids(self) -> list[str]:
        """Every registered device (not revoked); read again only when the registry changed."""
        if self._ids is None:
            m = self.memory
            generation = self.svc.storage.devices_generation()
            if m.ids is None or m.generation != generation:
                m.ids, m.generation = self.svc.storage.device_ids(), generation
            self._ids = m.ids
        return self._ids

    def tags(self) -> dict[str, dict[str, str]]:
        """Every registered device's tags (read only for device group queries)."""
        if self._tags is None:
            self._tags = self.svc.storage.device_tag_map()
        return self._tags

    def desired(self) -> dict[str, dict[str, Any]]:
        """What every device was last told (read only by an abort and a device group's target)."""
        if self._desired is None:
            self._desired = self.svc.storage.device_desired()
        return self._desired


def reconcile(svc: Services) -> dict[str, int]:
    """One idempotent pass over every active rollout and the fleet targets; returns counters."""
    with svc.rollouts_lock:
        try:
            p = _begin(svc)
            active = sorted(svc.storage.list_rollouts(states=ACTIVE, limit=10_000), key=lambda r: r["created_at"])
            for row in active:
                try:
                    _reconcile_rollout(svc, p, row)
                except Exception:
                    # What it remembers of this rollout may be half updated: the next pass reads it afresh.
                    p.memory.members.pop(row["id"], None)
                    log.exception("reconcile of rollout %s failed; the next pass retries", row["id"])
            ids = {row["id"] for row in active}
            for kept in (p.memory.members, p.memory.probation):
                for gone in set(kept) - ids:
                    del kept[gone]
            _converge_fleet_targets(svc, p)
        except BaseException:
            svc.rollout_memory = None
            raise
        return {"rollouts": len(active), "published": p.published}


def _begin(svc: Services) -> _Pass:
    """A pass, with what the leader remembers and the devices changed since its previous pass,
    or a pass that looks at every device (a new term, nothing remembered, or time for one)."""
    now, term = svc.clock(), svc.leadership.terms
    m: Memory | None = svc.rollout_memory
    if m is None or m.term != term or not m.full_at <= now < m.full_at + FULL_PASS_S:
        cursor, _ = svc.storage.device_changes(None)  # before reading anything: no change is missed
        fresh = Memory(term=term, cursor=cursor, full_at=now)
        if m is not None and m.term == term:  # the device ids stay good while the registry's generation does
            fresh.ids, fresh.generation = m.ids, m.generation
        svc.rollout_memory = fresh
        return _Pass(svc=svc, now=now, memory=fresh, changed=None)
    m.cursor, changed = svc.storage.device_changes(m.cursor)
    return _Pass(svc=svc, now=now, memory=m, changed=set(changed))


def _matching(svc: Services, p: _Pass, target: Target) -> list[str]:
    """The registered devices `target` selects (`Target.matches`): tags and groups are matched in
    SQL, a list against the registry; only a device group query reads every device's tags."""
    if target.all:
        return p.device_ids()
    found: set[str] = set()
    if target.devices:
        found.update(svc.storage.device_tag_map(list(target.devices)))
    wanted = dict(target.tags)
    if target.group:
        wanted["group"] = target.group
    if wanted:
        found.update(svc.storage.device_ids(tags=wanted))
    if target.query:
        query = parse_query(target.query)
        found.update(d for d, tags in p.tags().items() if query.matches(d, tags))
    return list(found)


def _publish(svc: Services, p: _Pass, device: str, model: str, version: str, mode: str,
             rollout_id: str | None, last: dict[str, Any] | None, allow_downgrade: bool = False,
             windows: tuple[Schedule, dict[str, str]] | None = None) -> bool:
    """Publish a device's desired only when it differs from `last`, what it was last told.

    `windows` (the rollout's schedule, the device's tags): a live desired carries the device's
    activation windows; it is published again once the windows it was sent have all closed."""
    import msgspec

    from fleet_server.registry import desired_state

    if (last is not None and last["model"] == model and last["version"] == version and last["mode"] == mode
            and last["rollout_id"] == rollout_id and not _windows_used_up(p, last, mode, windows)):
        return False
    if svc.publisher is None:
        return False
    desired = desired_state(svc, model, version, mode=mode, rollout_id=rollout_id,  # type: ignore[arg-type]
                            allow_downgrade=allow_downgrade)
    if windows is not None and mode == "live":
        intervals = windows[0].activate_windows(windows[1], p.now)
        if intervals is not None:
            desired = msgspec.structs.replace(desired, activate_windows=intervals)
    if publish_desired(svc, device, desired):
        if p._desired is not None:
            p._desired[device] = {"model": model, "version": version, "mode": mode, "rollout_id": rollout_id}
        p.published += 1
        return True
    return False


def _windows_used_up(p: _Pass, last: dict[str, Any], mode: str,
                     windows: tuple[Schedule, dict[str, str]] | None) -> bool:
    """Whether the activation windows a live desired published at `last["published_at"]` carried
    have all closed (the device missed them: it is sent the next ones)."""
    if windows is None or mode != "live":
        return False
    sent = windows[0].activate_windows(windows[1], last.get("published_at") or p.now)
    return bool(sent) and sent[-1][1] <= p.now


def _cohort(rollout_id: str, members: Members, everyone: set[str], size: int) -> list[str]:
    """The stage's cohort: the first `size` devices in the rollout's order, assigned devices first
    (by the stage that took them, then rank), then the rest by rank, so that a device that joins
    later never pushes an assigned one out. Ranks are hashed only for the devices that order:
    none when the cohort is exactly the assigned devices."""
    if size == len(members):
        return list(members)
    if size < len(members):
        return sorted(members, key=lambda d: (members[d][0], cohort_rank(rollout_id, d), d))[:size]
    rest = (d for d in everyone if d not in members)
    return [*members, *heapq.nsmallest(size - len(members), rest, key=lambda d: (cohort_rank(rollout_id, d), d))]


def _reconcile_rollout(svc: Services, p: _Pass, row: dict[str, Any]) -> None:
    spec = spec_of(row)
    rid, state = row["id"], RolloutState(row["state"])
    memory = p.memory
    members = memory.members.get(rid) if p.changed is not None else None
    changed = p.changed if members is not None else None  # None: look at every assigned device
    if members is None:
        members = memory.members[rid] = Members(svc.storage.rollout_assignments(rid))
    probation = memory.probation.setdefault(rid, set())
    population = _matching(svc, p, spec.target)
    if p.taken:
        population = [d for d in population if d not in p.taken or d in members]
    p.taken.update(population)
    p.taken.update(members)
    if state is RolloutState.ABORTING:
        memory.members.pop(rid, None)  # an abort reads its devices whole
        _reconcile_abort(svc, p, row, spec)
        return
    stage_i = row["stage"]
    stage = spec.stages[stage_i]
    schedule = schedule_of(spec)
    if schedule is not None and not schedule.started(p.now):
        _not_started(svc, p, row, schedule)
        return
    # Outside the maintenance window no device is taken into a stage nor moved to its mode; the
    # devices already taken go on (and an abort, above, is never held).
    in_window = schedule is None or schedule.window_open(p.now)
    everyone = set(population)
    everyone.update(members)
    cohort = _cohort(rid, members, everyone, stage.size(len(everyone)))
    if not in_window:
        cohort = [d for d in cohort if d in members]
    elif schedule is not None and schedule.window is not None:
        row = _open_stage(svc, p, row)
    touched = _take(svc, p, rid, stage_i, stage, members, cohort) if in_window else set()
    # Publish to every assigned device (a device that came back or was missed converges), once
    # the server knows what it runs: that version is the one an abort sends it back to. A device
    # taken before its first report waits for it (pending, then timed out like any silent one);
    # told at once, an abort could not return it and would leave it on this version.
    if changed is not None:
        touched |= changed & members.keys()
    _tell(svc, p, rid, spec, schedule, members, None if changed is None else touched)
    # Every assigned device's status, derived afresh from its latest reported state and update
    # events (a device counted as updated that rolls back moves to failed): of the devices that
    # changed, those whose timeout has come and those on probation, or of every one.
    look = None
    if changed is not None:
        look = touched | probation | members.due(p.now - spec.device_timeout_s)
    changes = [] if look is not None and not look else svc.storage.rollout_status_changes(
        rid, spec.version, p.now, spec.device_timeout_s, failed_outcomes=FAILED_OUTCOMES,
        probation_states=PROBATION_STATES, devices=None if look is None else list(look))
    moved = [(d, status) for d, status, _ in changes if d in members and status != members[d][2]]
    svc.storage.set_rollout_device_statuses(rid, moved, p.now)
    for d, status in moved:
        members[d] = (*members[d][:2], status, members[d][3])
    if look is None:
        probation.clear()
    else:
        probation -= look
    probation.update(d for d, _, trial in changes if trial)

    in_cohort = set(cohort)
    counts = +members.counts if len(cohort) == len(members) else Counter(members[d][2] for d in cohort)
    trying = len(probation & in_cohort)
    canary, control = _cohort_stats(svc, row, spec, stage, counts, in_cohort, everyone - members.keys())
    results = evaluate_gates(spec, stage.mode, canary, control)
    result = verdict(results)
    waiting = _waiting_for(p, row, spec, stage, counts, len(cohort), trying, results, result)
    if not in_window and schedule is not None:
        waiting.insert(0, f"schedule: {schedule.waiting(p.now)}")
    gates = {"evaluated_at": p.now, "verdict": result, "results": [r.to_dict() for r in results],
             "waiting_for": waiting, "population": len(everyone),
             "canary": _stats_view(canary, stage.mode), "control": _stats_view(control, "live")}
    svc.storage.update_rollout(rid, {"gates": gates}, p.now, expect={"state": row["state"], "stage": stage_i})
    row = {**row, "gates": gates}
    if state is not RolloutState.RUNNING:
        return
    if result == "fail":
        failed = [r for r in results if r.status == "fail"]
        why = "; ".join(_explain(r) for r in failed)
        action = "gate_failed_pause" if spec.on_failure == "pause" else "gate_failed_rollback"
        stages = list(row["stages"] or [])
        if stages:
            stages[-1] = {**stages[-1], "verdict": "fail", "gates": gates["results"]}
        transition(svc, row, action, CONTROLLER, {"failed": [r.to_dict() for r in failed]},
                    reason=f"stage {stage_i + 1} ({stage.mode}): {why}", stages=stages)
        return
    if not waiting:
        next_stage(svc, row, spec, CONTROLLER, "stage_passed", ended_by="gates passed")


def _take(svc: Services, p: _Pass, rid: str, stage_i: int, stage: Stage, members: Members,
          cohort: list[str]) -> set[str]:
    """Assign the cohort's new devices to the stage and move the assigned ones to its mode (live
    stays live when a later stage is in shadow); `members` follows. Returns the devices taken or moved."""
    whole = len(cohort) == len(members)  # the cohort is exactly the assigned devices (see _cohort)
    if whole and members.settled == (stage_i, len(members)):
        return set()  # nothing was new or in another mode at the previous pass, and nothing moved since
    new = [] if whole else [d for d in cohort if d not in members]
    moving = [d for d, (_, mode, _, _) in
              (members.items() if whole else ((d, members[d]) for d in cohort if d in members))
              if mode != stage.mode and not (mode == "live" and stage.mode == "shadow")]
    if not new and not moving:
        if whole:
            members.settled = (stage_i, len(members))
        return set()
    changed: list[dict[str, Any]] = []
    reports = svc.storage.device_reports(new) if new else {}
    for device in new:
        changed.append({"rollout_id": rid, "device": device, "stage": stage_i, "mode": stage.mode,
                        "previous_version": (reports.get(device) or {}).get("active_version"),
                        "assigned_at": p.now, "desired_at": p.now, "status": "pending", "status_at": p.now,
                        "live_at": p.now if stage.mode == "live" else None})
    for m in svc.storage.rollout_devices(rid, devices=moving) if moving else ():
        m.update(mode=stage.mode, desired_at=p.now, status="pending", status_at=p.now)
        if stage.mode == "live" and m["live_at"] is None:
            m["live_at"] = p.now
        changed.append(m)
    svc.storage.put_rollout_devices(changed)
    for m in changed:
        members[m["device"]] = (m["stage"], m["mode"], m["status"], m["desired_at"] or m["assigned_at"])
    return {m["device"] for m in changed}


def _tell(svc: Services, p: _Pass, rid: str, spec: RolloutSpec, schedule: Schedule | None, members: Members,
          look: set[str] | None) -> None:
    """Publish the rollout's version to the assigned devices whose last desired differs from it
    (the database picks them, among `look` or all), and fill in a previous version learnt from a
    late first report. With a schedule every reporting device is looked at: its activation
    windows may be used up."""
    if schedule is not None:
        look = None
    elif look is not None and not look:
        return
    rows = svc.storage.rollout_devices_to_tell(rid, spec.model, spec.version, every_reported=schedule is not None,
                                               devices=None if look is None else list(look))
    tags = svc.storage.device_tag_map([m["device"] for m in rows]) if schedule is not None and rows else {}
    changed = []
    for m in rows:
        device, told, active = m["device"], m.pop("told"), m.pop("active_version")
        touched = False
        if m["previous_version"] is None and active not in (None, spec.version):
            m["previous_version"] = active
            touched = True
        windows = (schedule, tags.get(device) or {}) if schedule is not None else None
        if _publish(svc, p, device, spec.model, spec.version, m["mode"], rid, told, windows=windows) and windows:
            # A device that may activate only later is timed out from when its window opens.
            intervals = schedule.activate_windows(windows[1], p.now) if m["mode"] == "live" else None  # type: ignore[union-attr]
            if intervals and intervals[0][0] > (m["desired_at"] or 0):
                m["desired_at"] = intervals[0][0]
                if device in members:
                    members[device] = (*members[device][:3], intervals[0][0])
                touched = True
        if touched:
            changed.append(m)
    svc.storage.put_rollout_devices(changed)


def _open_stage(svc: Services, p: _Pass, row: dict[str, Any]) -> dict[str, Any]:
    """A stage that waited for its maintenance window starts when it first takes devices in
    one: its soak and gate window count from then, not from the hours it waited."""
    stages = list(row["stages"] or [])
    if not stages or stages[-1].get("opened_at") is not None:
        return row
    stages[-1] = {**stages[-1], "opened_at": p.now, "started_at": p.now}
    if svc.storage.update_rollout(row["id"], {"stages": stages, "stage_started_at": p.now}, p.now,
                                  expect={"state": row["state"], "stage": row["stage"]}):
        return {**row, "stages": stages, "stage_started_at": p.now}
    return row


def _not_started(svc: Services, p: _Pass, row: dict[str, Any], schedule: Schedule) -> None:
    """Before `not_before` the rollout takes and tells no device; its status says when it starts."""
    gates = {"evaluated_at": p.now, "verdict": None, "results": [], "population": None,
             "waiting_for": [f"schedule: {schedule.waiting(p.now)}"], "canary": None, "control": None}
    svc.storage.update_rollout(row["id"], {"gates": gates}, p.now, expect={"state": row["state"], "stage": row["stage"]})


def _unique(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return list({r["device"]: r for r in rows}.values())


def _explain(r: GateResult) -> str:
    value = "n/a" if r.value is None else f"{r.value:.4g}"
    bound = "max" if r.comparison == "<=" else "min"
    return f"{r.name} = {value} ({bound} {r.threshold:g}, sample {r.sample} {r.unit})"


def _cohort_stats(svc: Services, row: dict[str, Any], spec: RolloutSpec, stage: Stage,
                  counts: Counter[str], cohort: set[str],
                  control_ids: set[str]) -> tuple[CohortStats, CohortStats]:
    """Canary (the cohort: `counts` by status) and control (the population not assigned)."""
    windows = svc.storage.windows_since(row["stage_started_at"], spec.model)
    canary = CohortStats(devices=len(cohort), updated=counts["updated"], update_failed=counts["failed"],
                         timed_out=counts["timed_out"])
    control = CohortStats(devices=len(control_ids))
    mine = [w for w in windows if w["device"] in cohort]
    if stage.mode == "live":
        sum_windows(canary, mine, version=spec.version)
        canary.max_feature_psi = canary_feature_psi(svc, spec.model, spec.version, cohort)
    else:
        sum_windows(canary, mine, exclude_version=spec.version, shadow_version=spec.version)
    sum_windows(control, (w for w in windows if w["device"] in control_ids), exclude_version=spec.version)
    feedback = svc.storage.feedback_since(spec.model, row["stage_started_at"])
    sum_feedback(canary, feedback, cohort, version=spec.version)
    sum_feedback(control, feedback, control_ids, exclude_version=spec.version)
    monitoring = svc.storage.monitoring_since(spec.model, row["stage_started_at"])
    canary_sums = sum_monitoring(canary, monitoring, cohort, version=spec.version)
    sum_monitoring(control, monitoring, control_ids, exclude_version=spec.version)
    if stage.mode == "live":
        canary_multivariate(svc, spec.model, spec.version, canary, canary_sums)
    canary.stage_age_s = svc.clock() - row["stage_started_at"]
    return canary, control


def _stats_view(s: CohortStats, mode: str) -> dict[str, Any]:
    out = {"devices": s.devices, "updated": s.updated, "failed": s.update_failed, "timed_out": s.timed_out,
           "predictions": s.predictions, "errors": s.errors, "mode": mode}
    if mode == "shadow":
        out |= {"shadow_compared": s.shadow_compared, "shadow_agreed": s.shadow_agreed}
    return out


def _waiting_for(p: _Pass, row: dict[str, Any], spec: RolloutSpec, stage: Stage, counts: Counter[str],
                 cohort: int, trying: int, results: list[GateResult], result: str) -> list[str]:
    """Why the stage cannot end yet, in words; empty when it can. `counts`: the cohort's devices
    by status; `trying`: those updated live that have not committed the version (probation)."""
    waiting = []
    soaked = p.now - row["stage_started_at"]
    if soaked < stage.min_soak_s:
        waiting.append(f"soak: {soaked:.0f} s of {stage.min_soak_s:g} s")
    pending = counts["pending"]
    if pending:
        waiting.append(f"devices: {pending} of {cohort} still updating (timeout {spec.device_timeout_s:g} s)")
    # A device on probation may still roll back: the stage (and so the rollout) ends only when
    # its devices have committed, failed or timed out.
    if trying:
        waiting.append(f"probation: {trying} of {cohort} devices have not committed the version yet")
    reporting = counts["updated"]
    needed = min(stage.min_reporting, cohort)
    if reporting < needed:
        waiting.append(f"reporting: {reporting} of the {needed} devices needed run the version")
    waiting += [r.waiting() for r in results if r.status == "pending"]
    if not waiting and result == "pass" and stage.approval:
        waiting.append("approval: gates passed; an operator must advance the rollout")
    return waiting


def _reconcile_abort(svc: Services, p: _Pass, row: dict[str, Any], spec: RolloutSpec) -> None:
    """Send every assigned device back to its previous version; done when all are back or
    timed out (those converge on reconnect: their retained desired already says so). An abort
    lasts until then, so this path reads the assigned devices whole."""
    rid = row["id"]
    assigned = {m["device"]: m for m in svc.storage.rollout_devices(rid)}
    reports = svc.storage.device_reports(list(assigned))
    changed, open_devices = [], []
    abort_at = row["updated_at"]  # set by the abort transition; nothing else writes the row meanwhile
    for device, m in assigned.items():
        prev = m["previous_version"]
        rep = (reports.get(device) or {}).get("reported") or {}
        if prev is None:
            # Nothing to go back to: stop a shadow candidate, leave a live one in place.
            if m["status"] != "reverted":
                m.update(status="reverted", status_at=p.now)
                changed.append(m)
            continue
        if _publish(svc, p, device, spec.model, prev, "live", rid, p.desired().get(device), allow_downgrade=True):
            m.update(desired_at=p.now)
            changed.append(m)
        if rep.get("active_version") == prev and rep.get("candidate_version") in (None, prev):
            status = "reverted"
        elif p.now - abort_at > spec.device_timeout_s:
            status = "timed_out"
        else:
            status = "reverting"
            open_devices.append(device)
        if status != m["status"]:
            m.update(status=status, status_at=p.now)
            changed.append(m)
    svc.storage.put_rollout_devices(_unique(changed))
    if not open_devices:
        counts: dict[str, int] = {}
        for m in assigned.values():
            counts[m["status"]] = counts.get(m["status"], 0) + 1
        ok = transition(svc, row, "aborted", CONTROLLER, {"devices": counts}, finished_at=p.now)
        prev_target = row.get("previous_target")
        if ok and row.get("finished_at"):  # a completed rollout undone: restore the fleet target
            svc.storage.set_fleet_target(spec.model, spec.to_dict()["target"],
                                         prev_target["version"] if prev_target else None,
                                         prev_target["rollout_id"] if prev_target else None, p.now)


def _converge_fleet_targets(svc: Services, p: _Pass) -> None:
    """A device that was never told anything (joined after a rollout completed) gets the fleet's
    current version for its model and target; devices in an active rollout are left to it.

    A device group's target also takes a device that was told something by another rollout and
    now matches the group (its tags changed): it joins the group's fleet target. What an operator
    set by hand (no rollout) is left alone."""
    targets = svc.storage.fleet_targets()
    if not targets:
        return
    parsed = [(t, parse_target(t["target"])) for t in targets]
    if any(t["target"].get("query") is not None for t in targets):
        candidates, tags, told = p.device_ids(), p.tags(), p.desired()
    else:  # only devices never told anything can converge: the database lists them
        candidates = svc.storage.devices_without_desired()
        candidates = [d for d in candidates if d not in p.taken]
        tags, told = (svc.storage.device_tag_map(candidates) if candidates else {}), {}
    for device_id in candidates:
        if device_id in p.taken or device_id not in tags:
            continue
        match = [t for t, target in parsed if target.matches(device_id, tags[device_id])]
        if not match:
            continue
        newest = match[-1]  # fleet_targets() is ordered by updated_at
        last = told.get(device_id)
        joins_group = (last is not None and newest["target"].get("query") is not None
                       and last["rollout_id"] is not None and last["rollout_id"] != newest["rollout_id"])
        if last is None or joins_group:
            _publish(svc, p, device_id, newest["model"], newest["version"], "live", newest["rollout_id"], last)
