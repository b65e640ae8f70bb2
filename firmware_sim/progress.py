"""The progress line of `edgefleet sim run`: devices online, predictions/s, windows, states."""

from __future__ import annotations

import time

from firmware_sim.fleet import FleetStats


class Progress:
    """Turns successive `FleetStats` into lines with rates over the last interval (real time)."""

    def __init__(self) -> None:
        self._last: FleetStats | None = None
        self._last_real = time.monotonic()

    def line(self, stats: FleetStats) -> str:
        now = time.monotonic()
        dt = max(1e-9, now - self._last_real)
        prev = self._last
        pps = (stats.predictions - prev.predictions) / dt if prev else 0.0
        wps = (stats.windows - prev.windows) / dt if prev else 0.0
        self._last, self._last_real = stats, now
        states = " ".join(f"{k}={v}" for k, v in sorted(stats.states.items()))
        versions = " ".join(f"{k}={v}" for k, v in sorted(stats.versions.items()))
        return (
            f"sim {stats.elapsed_s / 60:6.1f} min | online {stats.online}/{stats.devices} | "
            f"{pps:7.0f} predictions/s | windows {stats.windows} ({wps:.0f}/s) | "
            f"states {states} | versions {versions}"
            + (f" | crashes {stats.crashes}" if stats.crashes else "")
        )
