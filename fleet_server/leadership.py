"""Which node runs the singleton work (rollout controller, alert evaluation and webhooks, broker
account sync): the leader.

On SQLite there is one node, and it always leads (`SoleLeader`). On PostgreSQL every node of a
deployment competes for one session-level advisory lock on a connection of its own
(`AdvisoryLockLeadership`): the lock lives exactly as long as that database session, so a leader
that is killed (its socket closes) or cut off (the server's TCP keepalives end the session) lets
another node take it at its next check. A leader stops leading as soon as a check of its own
session fails, before the database would let anyone else in.

Fencing: the loops run their pass inside `leading_pass()`, which confirms the session with one
round trip first; `FencedPublisher` refuses a desired state or alert published from inside a
pass once leadership is lost, so a pass that outlives its leadership publishes nothing more.
Each pass re-reads its state from the database, so a new leader continues where the old stopped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

log = logging.getLogger(__name__)

# pg_advisory_lock key of leadership (the migration lock is 0x6566_0000; device and compaction
# locks use the two-key form, another key space).
LEADER_LOCK = 0x6566_0010


class NotLeading(RuntimeError):
    """A singleton pass tried to publish after this node lost leadership."""


class Leadership(Protocol):
    """The seam the loops consult; the composition root builds one per node."""

    terms: int  # how many times this node became leader: what a leader remembers is of one term

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def is_leader(self) -> bool: ...
    def confirm(self) -> bool:
        """Leading right now (a round trip to the database where it can be lost)."""
        ...
    def leading_pass(self) -> Any:
        """Context manager around one singleton pass: yields whether to run it; publishing from
        inside it is refused once leadership is lost."""
        ...
    def may_publish(self) -> bool: ...
    def database_ok(self) -> tuple[bool, str]:
        """(True, "") when the database answered the latest check, else (False, what failed)."""
        ...


class _PassGuard:
    """The thread-local 'inside a leader pass' flag shared by both implementations."""

    def __init__(self) -> None:
        self._local = threading.local()

    def is_leader(self) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    def confirm(self) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    @contextmanager
    def leading_pass(self) -> Iterator[bool]:
        leading = self.confirm()
        self._local.in_pass = leading
        try:
            yield leading
        finally:
            self._local.in_pass = False

    def may_publish(self) -> bool:
        """Outside a pass (an operator's request) always; inside one only while still leading."""
        return not getattr(self._local, "in_pass", False) or self.is_leader()


class SoleLeader(_PassGuard):
    """One node on one SQLite file: it always leads."""

    terms = 1

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def is_leader(self) -> bool:
        return True

    def confirm(self) -> bool:
        return True

    def database_ok(self) -> tuple[bool, str]:
        return True, ""


class AdvisoryLockLeadership(_PassGuard):
    """Leadership held as `pg_advisory_lock(LEADER_LOCK)` on a dedicated PostgreSQL connection.

    A thread checks every `check_s`: a follower tries the lock (`pg_try_advisory_lock`, never
    waits), a leader proves its session with `SELECT 1`. Any error closes the connection and ends
    leadership at once; the next check reconnects and competes again.
    """

    def __init__(self, url: str, *, check_s: float = 0.5, key: int = LEADER_LOCK, name: str = "") -> None:
        self.url, self.check_s, self.key, self.name = url, check_s, key, name
        super().__init__()
        self._session: Any = None  # storage.postgres.session.AdvisoryLockSession, made at start
        self._leading = False
        self._db_error = ""  # until a check fails, the database counts as reachable (it was at start)
        self._lock = threading.Lock()  # one statement at a time on the dedicated connection
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="leadership", daemon=True)
        self.changed = threading.Condition()
        self.terms = 0  # how many times this node became leader

    # ---- lifecycle
    def start(self) -> None:
        self.check()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        with self._lock:
            self._drop("stopping")

    def _run(self) -> None:
        while not self._stop.wait(self.check_s):
            self.check()

    # ---- state
    def is_leader(self) -> bool:
        return self._leading

    def database_ok(self) -> tuple[bool, str]:
        error = self._db_error
        return (not error, error)

    def confirm(self) -> bool:
        if not self._leading:
            return False
        self.check()
        return self._leading

    def check(self) -> None:
        """One check: connect if needed, then try the lock (follower) or prove the session (leader)."""
        from fleet_server.storage import StorageUnavailable
        from fleet_server.storage.postgres.session import AdvisoryLockSession

        with self._lock:
            if self._session is None:
                self._session = AdvisoryLockSession(self.url, self.key)
            try:
                if self._leading:
                    self._session.ping()
                elif self._session.try_lock():
                    self._set(True)
                self._db_error = ""
            except StorageUnavailable as exc:  # the session (and the lock) is gone
                self._db_error = str(exc)
                self._drop(str(exc))

    def _drop(self, why: str) -> None:
        if self._leading:
            log.warning("node %s stops leading: %s", self.name, why)
        self._set(False)
        if self._session is not None:
            self._session.close()

    def _set(self, leading: bool) -> None:
        if leading == self._leading:
            return
        self._leading = leading
        if leading:
            self.terms += 1
            log.info("node %s leads (rollouts, alerts, broker sync)", self.name)
        with self.changed:
            self.changed.notify_all()


class FencedPublisher:
    """The MQTT publisher as the loops see it: desired states and alerts from inside a leader pass
    go out only while this node still leads (NotLeading otherwise); operator requests pass."""

    def __init__(self, publisher: Any, leadership: Leadership) -> None:
        self._inner = publisher
        self._leadership = leadership

    @property
    def unfenced(self) -> Any:
        """The publisher underneath, that writes to MQTT (for instruments that count its bytes)."""
        return self._inner

    def _fence(self, what: str) -> None:
        if not self._leadership.may_publish():
            raise NotLeading(f"not publishing {what}: this node no longer leads")

    def publish_desired(self, device_id: str, desired: Any) -> bool:
        self._fence(f"the desired state of {device_id}")
        return self._inner.publish_desired(device_id, desired)

    def clear_desired(self, device_id: str) -> bool:
        self._fence(f"a cleared desired state of {device_id}")
        return self._inner.clear_desired(device_id)

    def publish_alert(self, payload: dict[str, Any]) -> bool:
        self._fence("an alert")
        return self._inner.publish_alert(payload)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
