"""What the update machine and its states share: the host they act on, and the persisted context.

States receive the running machine as an `UpdateRun` (its context, host and a few verbs), so
they never import the machine that calls them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import msgspec

from edge_agent.protocol import DesiredState
from edge_agent.store import DataDir
from edge_agent.update.events import Event, Outcome, State

log = logging.getLogger("edge_agent.update")


class UpdateHost(Protocol):
    """What the machine needs from the agent."""

    config: Any
    data: DataDir
    clock: Callable[[], float]

    def desired(self) -> DesiredState | None: ...
    def active_version(self) -> str | None: ...
    def active_manifest(self) -> Any: ...
    def trusted_keys(self) -> list[Any]: ...
    def load_runtime(self, bundle: Any) -> Any: ...
    def set_shadow(self, runtime: Any) -> None: ...
    def activate(self, runtime: Any) -> None: ...
    def start_probation(self) -> None: ...
    def probation_stats(self) -> tuple[int, int, float | None]: ...
    def commit(self, version: str, previous: str | None) -> None: ...
    def rollback(self, previous: str | None) -> None: ...
    def prune_versions(self) -> None: ...
    def emit(self, **fields: Any) -> None: ...
    def state_changed(self) -> None: ...
    def submit(self, fn: Callable[[], None]) -> None: ...
    def download_via(self, url: str) -> str: ...


@dataclass
class UpdateContext:
    """The persisted part of the machine (update.json)."""

    state: State = State.IDLE
    desired: DesiredState | None = None
    previous_version: str | None = None
    outcome: Outcome | None = None
    last_error: str | None = None
    final: bool = False  # the failure will not go away by retrying
    went_live: bool = False
    activated_at: float | None = None
    selftest_p50_ms: float | None = None
    save_count: int = 0
    attempts: dict[str, int] = field(default_factory=dict)
    # Set when the failure was a full disk: bytes free then, and bytes the write needed.
    disk_free: int | None = None
    disk_needed: int | None = None

    def to_json(self) -> bytes:
        data = asdict(self)
        data["state"] = self.state.value
        data["outcome"] = self.outcome.value if self.outcome else None
        data["desired"] = msgspec.to_builtins(self.desired) if self.desired else None
        return json.dumps(data).encode()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UpdateContext:
        ctx = cls()
        try:
            ctx.state = State(data.get("state", "Idle"))
            ctx.desired = msgspec.convert(data["desired"], DesiredState) if data.get("desired") else None
            ctx.previous_version = data.get("previous_version")
            ctx.outcome = Outcome(data["outcome"]) if data.get("outcome") else None
            ctx.last_error = data.get("last_error")
            ctx.final = bool(data.get("final"))
            ctx.went_live = bool(data.get("went_live"))
            ctx.activated_at = data.get("activated_at")
            ctx.selftest_p50_ms = data.get("selftest_p50_ms")
            ctx.save_count = int(data.get("save_count", 0))
            ctx.attempts = {str(k): int(v) for k, v in (data.get("attempts") or {}).items()}
            ctx.disk_free = int(data["disk_free"]) if data.get("disk_free") is not None else None
            ctx.disk_needed = int(data["disk_needed"]) if data.get("disk_needed") is not None else None
        except (ValueError, KeyError, TypeError, msgspec.ValidationError):
            log.warning("update.json is unreadable; starting idle")
            return cls()
        return ctx


class UpdateRun(Protocol):
    """What a state's handler uses of the machine running it (`UpdateMachine` is one)."""

    host: UpdateHost
    ctx: UpdateContext
    candidate: Any  # the loaded candidate runtime (memory only)

    def begin(self, d: DesiredState) -> None: ...
    def fail(self, reason: str, final: bool = True, disk: tuple[int, int] | None = None) -> Event: ...
    def refuse(self, d: DesiredState | None, reason: str) -> None: ...
    def disk_full_waiting(self) -> bool: ...


@dataclass(frozen=True)
class UpdateSnapshot:
    """What the machine shows the outside (`reported`, `/v1/model`), taken at one moment.

    The machine publishes a new one each time it changes state; readers take the whole object
    (one reference read), so a report never mixes fields from before and after a transition
    (e.g. Idle / rolled_back while still naming the interrupted candidate)."""

    state: State = State.IDLE
    desired: DesiredState | None = None
    outcome: Outcome | None = None
    last_error: str | None = None
    retry: bool = False  # idle after a transient failure, with attempts left

    @property
    def busy(self) -> bool:
        return self.state is not State.IDLE

    @property
    def candidate(self) -> DesiredState | None:
        """The desired being worked on (None when idle)."""
        return self.desired if self.busy else None
