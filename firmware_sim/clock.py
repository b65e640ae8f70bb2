"""Simulated time: a clock that runs `speed` times faster than real time, or only when advanced.

Every part of a simulation reads this one clock — agents (telemetry windows, probation, MQTT
backoff), the data streams (drift start times) and, when it runs in the same process, the fleet
server (drift buckets, alert evaluation, rollout soak times) — so an hour of fleet life can take
a minute and still be consistent end to end. MQTT keepalives and HTTP timeouts stay in real
time: they protect real sockets.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

TICK_S = 1e-6  # the least time between two readings


@dataclass(frozen=True)
class ClockState:
    """Enough to rebuild a running clock in another process (no shared memory needed)."""

    sim_origin: float
    real_origin: float
    speed: float


class SimClock:
    """Simulated seconds since the epoch; call the instance to read it (`clock()`).

    `speed` > 0: time runs by itself, `speed` simulated seconds per real second.
    `speed` == 0: time stands still until `advance()` moves it (deterministic tests).
    """

    def __init__(self, speed: float = 60.0, start: float | None = None) -> None:
        if speed < 0:
            raise ValueError("speed must be >= 0 (0 = advance by hand)")
        self._lock = threading.Lock()
        self._speed = float(speed)
        self._sim_origin = time.time() if start is None else float(start)
        self._real_origin = time.monotonic()
        self._last = self._sim_origin

    def __call__(self) -> float:
        with self._lock:
            t = self._sim_origin + self._speed * (time.monotonic() - self._real_origin)
            # Time never stands still between two readings, even on a hand-driven clock: the
            # server keeps the newest `reported` snapshot by timestamp, and two snapshots taken
            # one after the other must not tie.
            self._last = max(t, self._last + TICK_S)
            return self._last

    now = __call__

    @property
    def speed(self) -> float:
        return self._speed

    @speed.setter
    def speed(self, value: float) -> None:
        if value < 0:
            raise ValueError("speed must be >= 0")
        with self._lock:
            # Re-anchor so that changing speed never makes time jump or run backwards.
            real = time.monotonic()
            self._sim_origin += self._speed * (real - self._real_origin)
            self._real_origin = real
            self._speed = float(value)

    def advance(self, seconds: float) -> float:
        """Jump forward by `seconds` of simulated time (never backwards); returns the new time."""
        if seconds < 0:
            raise ValueError("simulated time never runs backwards")
        with self._lock:
            self._sim_origin += seconds
            self._last = max(self._sim_origin + self._speed * (time.monotonic() - self._real_origin), self._last)
            return self._last

    def state(self) -> ClockState:
        with self._lock:
            return ClockState(self._sim_origin, self._real_origin, self._speed)

    @classmethod
    def from_state(cls, state: ClockState) -> SimClock:
        """The same running clock in a child process (`time.monotonic` is system-wide on Linux)."""
        clock = cls(state.speed)
        clock._sim_origin, clock._real_origin = state.sim_origin, state.real_origin
        clock._last = state.sim_origin
        return clock
