"""The update machine: runs states, persists each one before it acts, and reports transitions.

Blocking work (download, verify, self-test) runs on an executor the host provides, never on
the predict path. After a restart the saved state maps to a safe re-entry (`RESTART_ENTRY`).

Testing hook: the environment variable EDGEFLEET_FAULT (e.g. "crash_in=Install" or
"fail_in=SelfTest", comma-separated) makes the machine kill its own process with SIGKILL right
after saving the named state, or post `failure` from it. Never set it in production.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from edge_agent.protocol import DesiredState
from edge_agent.store import atomic_write_bytes, free_bytes, is_disk_full, read_json
from edge_agent.update.context import UpdateContext, UpdateHost, UpdateSnapshot
from edge_agent.update.events import (
    LIVE_STATES,
    RESTART_ENTRY,
    TRANSITIONS,
    Event,
    Outcome,
    State,
    next_state,
    reduce_outcome,
)
from edge_agent.update.states import HANDLERS, attempts_left, desired_key, window_open

log = logging.getLogger("edge_agent.update")

MAX_SAVES = 64  # saves within one update; more means a loop
DISK_CHECK_S = 2.0  # how often an update that failed on a full disk looks for free space
# States that only finish an update: they go on when update.json cannot be saved (a restart in
# them re-enters safely from the last state saved), instead of failing again.
FINISHING = (State.CHECK_ROLLBACK, State.ROLLBACK, State.FAILED, State.CLEANUP)


def parse_faults(spec: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in (spec or "").split(","):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
    return out


class UpdateMachine:
    """Drives UpdateContext through TRANSITIONS; thread-safe; one run at a time."""

    def __init__(self, host: UpdateHost, faults: dict[str, str] | None = None) -> None:
        self.host = host
        self.faults = faults or {}
        self.ctx = UpdateContext()
        self.candidate: Any = None  # the loaded candidate runtime (memory only)
        self._lock = threading.RLock()
        self._pending: Event | None = None
        self._running = False
        self._again = False
        self._history: list[tuple[str, str, str]] = []
        self._snapshot = UpdateSnapshot()
        self._disk_checked = 0.0

    # ------------------------------------------------------------------ what others see

    @property
    def snapshot(self) -> UpdateSnapshot:
        """The machine at its last change, as one immutable object (build reports from it)."""
        return self._snapshot

    def _publish(self) -> None:
        ctx = self.ctx
        self._snapshot = UpdateSnapshot(state=ctx.state, desired=ctx.desired, outcome=ctx.outcome,
                                        last_error=ctx.last_error, retry=self.will_retry)

    # ------------------------------------------------------------------ persistence

    def _save(self) -> bool:
        self.ctx.save_count += 1
        atomic_write_bytes(self.host.data.update_file, self.ctx.to_json())
        return self.ctx.save_count <= MAX_SAVES

    def recover(self) -> None:
        """Load update.json after a (re)start and move to the safe re-entry state."""
        data = read_json(self.host.data.update_file)
        if data is None:
            return
        saved = UpdateContext.from_json(data)
        self.ctx = saved
        entry = RESTART_ENTRY[saved.state]
        if saved.state is State.IDLE:
            self._publish()
            return
        if saved.state in LIVE_STATES:
            self.ctx.went_live = True
        if entry is not saved.state:
            self.ctx.last_error = f"interrupted in {saved.state.value} (agent restarted)"
        self.host.emit(
            kind="transition",
            from_state=saved.state.value,
            to_state=entry.value,
            event="restart",
            version=saved.desired.version if saved.desired else None,
            reason=f"agent restarted in {saved.state.value}",
        )
        self.ctx.state = entry
        self._publish()

    # ------------------------------------------------------------------ driving

    @property
    def state(self) -> State:
        return self.ctx.state

    @property
    def busy(self) -> bool:
        return self.ctx.state is not State.IDLE

    @property
    def will_retry(self) -> bool:
        """Idle after a transient failure (a restart, the network) with attempts left: the device
        tries the same desired again, at once when it knows it, else when it arrives."""
        ctx = self.ctx
        if ctx.state is not State.IDLE or ctx.desired is None or ctx.outcome in (None, Outcome.SUCCESS, Outcome.CANCELLED):
            return False
        return attempts_left(ctx.attempts, ctx.desired)

    def kick(self) -> None:
        """Schedule a run on the host's executor (desired changed, restart, verdict posted)."""
        with self._lock:
            if self._running:
                self._again = True
                return
            self._running = True
            self._again = False
        self.host.submit(self._run_guarded)

    def post(self, event: Event) -> None:
        """Deliver an event to a waiting state (Probation verdict, Shadow switch)."""
        with self._lock:
            self._pending = event
        self.kick()

    def _run_guarded(self) -> None:
        try:
            while True:
                self.run()
                with self._lock:
                    if not self._again:
                        self._running = False
                        return
                    self._again = False
        except Exception:
            log.exception("update machine crashed")
            with self._lock:
                self._running = False

    def run(self) -> None:
        """Enter states until one waits (returns None). Call from a worker thread."""
        while True:
            with self._lock:
                event, self._pending = self._pending, None
            if event is None:
                event = self._enter(self.ctx.state)
            if event is None:
                return
            self._transition(event)

    def _enter(self, state: State) -> Event | None:
        if state is State.IDLE:
            self.ctx.save_count = 0
            return HANDLERS[state](self)
        if state is State.ACTIVATE:
            self.ctx.went_live = True  # saved with the state: a crash from here on rolls back
        try:
            saved = self._save()
        except OSError as exc:
            saved = True
            if state not in FINISHING:  # do not start work that could not be resumed safely
                disk = self._disk(exc, len(self.ctx.to_json()))
                what = f"disk full: {disk[0]} bytes free, {disk[1]} needed" if disk else str(exc)
                return self.fail(f"{state.value.lower()}: cannot save update.json: {what}", final=False, disk=disk)
            log.warning("update.json not saved in %s (%s); finishing the update in memory", state.value, exc)
        if not saved:
            self.ctx.last_error = f"loop detected in {state.value} after {MAX_SAVES} saves"
            return Event.LOOP_DETECTED
        self._publish()
        self.host.state_changed()
        if self.faults.get("crash_in") == state.value:
            log.warning("EDGEFLEET_FAULT: killing the agent in %s", state.value)
            self.crash()
        if self.faults.get("fail_in") == state.value:
            return self.fail(f"{state.value.lower()}: injected failure (EDGEFLEET_FAULT)", final=True)
        try:
            return HANDLERS[state](self)
        except Exception as exc:  # a bug or an unexpected OS error must still end on a valid model
            log.exception("state %s raised", state.value)
            if state in (State.CHECK_ROLLBACK, State.ROLLBACK, State.FAILED, State.CLEANUP):
                self.ctx.last_error = f"{state.value.lower()}: {exc}"
                return Event.FAILURE if (state, Event.FAILURE) in TRANSITIONS else Event.SUCCESS
            return self.fail(f"{state.value.lower()}: unexpected error: {exc}")

    def _transition(self, event: Event) -> None:
        old = self.ctx.state
        new = next_state(old, event)
        outcome = reduce_outcome(self.ctx.outcome, old, event)
        if outcome in (Outcome.FAILURE, Outcome.ROLLED_BACK) and self.ctx.disk_needed is not None:
            outcome = Outcome.DISK_FULL  # the device kept (or went back to) its model; retried with space
        self.ctx.outcome = outcome
        self.ctx.state = new
        self._history.append((old.value, event.value, new.value))
        d = self.ctx.desired
        self.host.emit(
            kind="transition",
            from_state=old.value,
            to_state=new.value,
            event=event.value,
            version=d.version if d else None,
            rollout_id=d.rollout_id if d else None,
            reason=self.ctx.last_error if event in (Event.FAILURE, Event.LOOP_DETECTED) else None,
        )
        if new is State.IDLE:
            self.host.emit(
                kind="outcome",
                version=d.version if d else None,
                rollout_id=d.rollout_id if d else None,
                outcome=self.ctx.outcome.value if self.ctx.outcome else None,
                reason=self.ctx.last_error if self.ctx.outcome is not Outcome.SUCCESS else None,
            )
            try:
                self._save()
            except OSError as exc:  # Idle needs no resume: a restart re-enters the last saved state safely
                log.warning("update.json not saved in Idle: %s", exc)
        self._publish()
        self.host.state_changed()

    def crash(self) -> None:
        """What the `crash_in` fault does: kill this process. A simulator running many agents in
        one process replaces it (per instance) with a crash of one simulated device."""
        os.kill(os.getpid(), signal.SIGKILL)

    # ------------------------------------------------------------------ used by states

    def begin(self, d: DesiredState) -> None:
        attempts = self.ctx.attempts
        # Keep attempts of the current desired only, so the file stays small.
        keep = {k: v for k, v in attempts.items() if k == desired_key(d)}
        self.ctx = UpdateContext(
            desired=d, previous_version=self.host.active_version(), attempts=keep
        )

    def fail(self, reason: str, final: bool = True, disk: tuple[int, int] | None = None) -> Event:
        """Record why the update fails; `disk` = (free, needed) bytes when a write did not fit."""
        log.warning("update failed: %s", reason)
        self.ctx.last_error = reason
        self.ctx.final = final
        if disk is not None:
            self.ctx.final = False
            self.ctx.disk_free, self.ctx.disk_needed = disk
        return Event.FAILURE

    def _disk(self, exc: BaseException, needed: int) -> tuple[int, int] | None:
        """(free, needed) bytes if `exc` is a full disk, else None."""
        return (free_bytes(self.host.data.root), needed) if is_disk_full(exc) else None

    def disk_full_waiting(self) -> bool:
        """Idle after a full disk, and there is still not the space the failed write needed."""
        ctx = self.ctx
        if ctx.state is not State.IDLE or ctx.outcome is not Outcome.DISK_FULL or ctx.disk_needed is None:
            return False
        return free_bytes(self.host.data.root) < ctx.disk_needed

    def check_disk(self, now: float) -> None:
        """After a full disk, try the update again once the space it needed is free (from tick)."""
        ctx = self.ctx
        if ctx.state is not State.IDLE or ctx.outcome is not Outcome.DISK_FULL or self._running:
            return
        if now - self._disk_checked < DISK_CHECK_S:
            return
        self._disk_checked = now
        if not self.disk_full_waiting():
            self.kick()

    def refuse(self, d: DesiredState | None, reason: str) -> None:
        log.warning("refusing desired: %s", reason)
        self.ctx.last_error = reason
        self.host.emit(
            kind="refused",
            version=d.version if d else None,
            rollout_id=d.rollout_id if d else None,
            reason=reason,
        )
        self._publish()
        self.host.state_changed()

    # ------------------------------------------------------------------ called from tick / desired

    def on_desired(self) -> None:
        """Desired changed: start from Idle, or tell a waiting Shadow."""
        state = self.ctx.state
        if state is State.IDLE:
            self.kick()
        elif state is State.SHADOW:
            d, mine = self.host.desired(), self.ctx.desired
            if d is None or mine is None or d.version != mine.version or d.sha256 != mine.sha256:
                self.post(Event.NOTHING_TO_DO)
            elif d.mode == "live" and window_open(d, self.host.clock()):
                self.post(Event.SUCCESS)

    def check_window(self, now: float) -> None:
        """A live update ready in Shadow, held for its maintenance window: activate it once the
        window is open (from tick)."""
        if self.ctx.state is not State.SHADOW or self._pending is not None or self._running:
            return
        d = self.host.desired()
        mine = self.ctx.desired
        if d is None or mine is None or d.version != mine.version or d.sha256 != mine.sha256:
            return
        if d.mode == "live" and d.activate_windows is not None and window_open(d, now):
            self.post(Event.SUCCESS)

    def check_probation(self, now: float) -> None:
        """Post the Probation verdict once enough predictions or time have passed."""
        if self.ctx.state is not State.PROBATION or self._pending is not None or self._running:
            return
        cfg = self.host.config.update
        predictions, errors, p50 = self.host.probation_stats()
        elapsed = now - (self.ctx.activated_at or now)
        total = predictions + errors
        error_limit = cfg.probation_max_error_rate * max(total, cfg.probation_predictions)
        if errors > error_limit and total >= min(20, cfg.probation_predictions):
            self.fail(f"probation: {errors} errors in {total} predictions (limit {cfg.probation_max_error_rate:.1%})")
            self.post(Event.FAILURE)
            return
        if predictions < cfg.probation_predictions and elapsed < cfg.probation_s:
            return
        if total and errors / total > cfg.probation_max_error_rate:
            self.fail(f"probation: error rate {errors / total:.1%} over {cfg.probation_max_error_rate:.1%}")
            self.post(Event.FAILURE)
            return
        # Compare with the replaced model under the same load (or the self-test without one);
        # below half a millisecond, differences are scheduling noise on a shared CPU.
        reference = max(getattr(self.host, "baseline_latency_ms", None) or 0.0, self.ctx.selftest_p50_ms or 0.0)
        limit = max(cfg.probation_latency_floor_ms, reference * cfg.probation_latency_factor)
        if p50 is not None and p50 > limit:
            self.fail(f"probation: median latency {p50:.3f} ms per row over {limit:.3f} ms")
            self.post(Event.FAILURE)
            return
        self.post(Event.SUCCESS)
