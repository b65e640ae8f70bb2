"""Failed-login counting for the console: a sliding window per operator name and per client address."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

# Failed logins allowed per window, per operator name and per client address.
MAX_FAILURES_PER_NAME = 5
MAX_FAILURES_PER_ADDRESS = 20
FAILURE_WINDOW_S = 300.0


class LoginLimiter:
    """Counts failed logins in a sliding window per operator name and per client address.

    In memory, per server process: enough to stop password guessing against one console (a
    guesser gets 5 tries per name per 5 minutes); successes do not reset the address counter.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def _recent(self, key: str, now: float) -> deque[float]:
        q = self._failures.setdefault(key, deque())
        while q and q[0] <= now - FAILURE_WINDOW_S:
            q.popleft()
        return q

    def retry_after(self, name: str, address: str) -> int | None:
        """Seconds until another attempt is allowed, or None when it is allowed now."""
        now = self._clock()
        with self._lock:
            waits = []
            for key, limit in ((f"n:{name.lower()}", MAX_FAILURES_PER_NAME), (f"a:{address}", MAX_FAILURES_PER_ADDRESS)):
                q = self._recent(key, now)
                if len(q) >= limit:
                    waits.append(int(q[0] + FAILURE_WINDOW_S - now) + 1)
            return max(waits) if waits else None

    def failed(self, name: str, address: str) -> None:
        now = self._clock()
        with self._lock:
            for key in (f"n:{name.lower()}", f"a:{address}"):
                self._recent(key, now).append(now)
            if len(self._failures) > 10_000:  # forget quiet keys so memory stays bounded
                for key in [k for k, q in self._failures.items() if not q]:
                    del self._failures[key]

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._failures.pop(f"n:{name.lower()}", None)
