"""Every telemetry window as the devices queued it: what the server's store is checked against."""

from __future__ import annotations

import threading

import msgspec

from edge_agent.protocol import TelemetryWindow, decode


class WindowRecorder:
    """Every telemetry window as a device queued it, keyed by (device, seq); samples dropped."""

    def __init__(self) -> None:
        self.windows: dict[tuple[str, int], TelemetryWindow] = {}
        self._lock = threading.Lock()

    def __call__(self, device_id: str, seq: int, payload: bytes) -> None:
        w = decode("telemetry", payload)
        assert isinstance(w, TelemetryWindow)
        with self._lock:
            self.windows[(device_id, seq)] = msgspec.structs.replace(w, sample=[])
