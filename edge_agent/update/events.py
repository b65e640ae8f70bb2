"""States, events, the one transition table, restart re-entry, and the outcome reducer.

States never name their successor: they post `success`, `failure` or `nothing_to_do`, and
`TRANSITIONS` alone decides where that leads. Every failure edge goes to CheckRollback.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    IDLE = "Idle"
    DOWNLOAD = "Download"
    VERIFY = "Verify"
    INSTALL = "Install"
    SELFTEST = "SelfTest"
    SHADOW = "Shadow"
    ACTIVATE = "Activate"
    PROBATION = "Probation"
    COMMIT = "Commit"
    CHECK_ROLLBACK = "CheckRollback"
    ROLLBACK = "Rollback"
    FAILED = "Failed"
    CLEANUP = "Cleanup"


class Event(StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"
    NOTHING_TO_DO = "nothing_to_do"
    LOOP_DETECTED = "loop_detected"


class Outcome(StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"  # failed before Activate: the device never left its model
    ROLLED_BACK = "rolled_back"
    ROLLBACK_FAILED = "rollback_failed"
    CANCELLED = "cancelled"  # desired moved on before the candidate went live
    # failed (or rolled back) because a write did not fit; tried again once space returns
    DISK_FULL = "disk_full"


S, E = State, Event

# The whole flow. Shadow waits for desired to switch to live (success) or move on (nothing_to_do).
TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.IDLE, E.SUCCESS): S.DOWNLOAD,
    (S.DOWNLOAD, E.SUCCESS): S.VERIFY,
    (S.VERIFY, E.SUCCESS): S.INSTALL,
    (S.INSTALL, E.SUCCESS): S.SELFTEST,
    (S.SELFTEST, E.SUCCESS): S.SHADOW,
    (S.SHADOW, E.SUCCESS): S.ACTIVATE,
    (S.SHADOW, E.NOTHING_TO_DO): S.CLEANUP,
    (S.ACTIVATE, E.SUCCESS): S.PROBATION,
    (S.PROBATION, E.SUCCESS): S.COMMIT,
    (S.COMMIT, E.SUCCESS): S.CLEANUP,
    (S.CHECK_ROLLBACK, E.SUCCESS): S.ROLLBACK,  # the candidate was live: go back
    (S.CHECK_ROLLBACK, E.NOTHING_TO_DO): S.FAILED,  # it never was: nothing to undo
    (S.ROLLBACK, E.SUCCESS): S.FAILED,
    (S.ROLLBACK, E.FAILURE): S.FAILED,
    (S.FAILED, E.SUCCESS): S.CLEANUP,
    (S.CLEANUP, E.SUCCESS): S.IDLE,
    (S.CLEANUP, E.FAILURE): S.IDLE,
}
for _s in (S.DOWNLOAD, S.VERIFY, S.INSTALL, S.SELFTEST, S.SHADOW, S.ACTIVATE, S.PROBATION, S.COMMIT):
    TRANSITIONS[(_s, E.FAILURE)] = S.CHECK_ROLLBACK
    TRANSITIONS[(_s, E.LOOP_DETECTED)] = S.CHECK_ROLLBACK
for _s in (S.DOWNLOAD, S.VERIFY, S.INSTALL, S.SELFTEST):
    TRANSITIONS[(_s, E.NOTHING_TO_DO)] = S.CLEANUP  # desired moved on mid-update
for _s in (S.CHECK_ROLLBACK, S.ROLLBACK, S.FAILED):
    TRANSITIONS[(_s, E.LOOP_DETECTED)] = S.FAILED if _s is not S.FAILED else S.CLEANUP

# States whose work is undone by a restart; the candidate was never live, so the device keeps
# the model it had. Activate and Probation were live in memory only: roll back.
RESTART_ENTRY: dict[State, State] = {
    S.IDLE: S.IDLE,
    S.DOWNLOAD: S.CHECK_ROLLBACK,
    S.VERIFY: S.CHECK_ROLLBACK,
    S.INSTALL: S.CHECK_ROLLBACK,
    S.SELFTEST: S.CHECK_ROLLBACK,
    S.SHADOW: S.CHECK_ROLLBACK,
    S.ACTIVATE: S.CHECK_ROLLBACK,
    S.PROBATION: S.CHECK_ROLLBACK,
    S.COMMIT: S.COMMIT,  # idempotent: finish it
    S.CHECK_ROLLBACK: S.CHECK_ROLLBACK,
    S.ROLLBACK: S.ROLLBACK,
    S.FAILED: S.FAILED,
    S.CLEANUP: S.CLEANUP,
}

LIVE_STATES = frozenset({S.ACTIVATE, S.PROBATION})


def next_state(state: State, event: Event) -> State:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise ValueError(f"no transition from {state.value} on {event.value}") from None


def reduce_outcome(outcome: Outcome | None, state: State, event: Event) -> Outcome | None:
    """Fold one (state, event) into the update's outcome; states never set status flags."""
    if state is S.IDLE and event is E.SUCCESS:
        return None  # a new update starts
    if state is S.COMMIT and event is E.SUCCESS:
        return Outcome.SUCCESS
    if state is S.SHADOW and event is E.NOTHING_TO_DO:
        return Outcome.CANCELLED
    if state in (S.DOWNLOAD, S.VERIFY, S.INSTALL, S.SELFTEST) and event is E.NOTHING_TO_DO:
        return Outcome.CANCELLED
    if state is S.CHECK_ROLLBACK and event is E.NOTHING_TO_DO:
        return Outcome.FAILURE
    if state is S.ROLLBACK:
        return Outcome.ROLLED_BACK if event is E.SUCCESS else Outcome.ROLLBACK_FAILED
    return outcome
