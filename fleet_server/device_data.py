"""What one device sent: its recent sampled rows (named after its model's inputs) and its
telemetry bandwidth over time. Shared by the REST API and the console's device page."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fleet_server.devices import DeviceError, get_device

if TYPE_CHECKING:
    from fleet_server.context import Services

MAX_SAMPLES = 1000
MAX_BANDWIDTH_POINTS = 10_000


def sample_columns(svc: Services, model: str, version: str, width: int) -> dict[str, Any]:
    """Column names of one model version's sampled rows: its manifest's inputs and output, or
    `x0, x1, ...` and `y` when the version is not registered here."""
    row = svc.storage.get_model(model, version) if model and version else None
    if row is None:
        return {"model": model, "model_version": version, "registered": False,
                "features": [f"x{i}" for i in range(width)], "output": "y"}
    manifest = row["manifest"]
    outputs = manifest.get("outputs") or {}
    return {
        "model": model,
        "model_version": version,
        "registered": True,
        "features": [f["name"] for f in manifest.get("inputs", [])],
        "output": outputs.get("label") or outputs.get("value") or "prediction",
    }


def recent_samples(svc: Services, device_id: str, limit: int = 50) -> dict[str, Any]:
    """The device's newest sampled (input, output) rows, newest first, and the column names of
    each model version among them. Features the device keeps private arrive and stay null."""
    get_device(svc, device_id)
    if not 1 <= limit <= MAX_SAMPLES:
        raise DeviceError(f"limit must be between 1 and {MAX_SAMPLES}")
    # Storage keeps the window holding the K-th newest row whole: trim to K here.
    rows = svc.storage.recent_samples(device_id, min(limit, svc.config.samples_per_device))
    widths: dict[tuple[str, str], int] = {}
    for r in rows:
        key = (r["model"], r["model_version"])
        widths[key] = max(widths.get(key, 0), len(r["x"]))
    return {
        "device": device_id,
        "samples": rows,
        "columns": [sample_columns(svc, m, v, n) for (m, v), n in widths.items()],
        "kept_per_device": svc.config.samples_per_device,
    }


def bandwidth(svc: Services, device_id: str, start: float | None = None, step_s: float = 3600.0) -> dict[str, Any]:
    """Telemetry messages and payload bytes per `step_s` (by window end time) since `start`
    (default: the last 24 hours), with rates per hour per step and over the whole period."""
    get_device(svc, device_id)
    now = svc.clock()
    start = now - 24 * 3600.0 if start is None else start
    if step_s < 1.0:
        raise DeviceError("step_s must be at least 1 second")
    if (now - start) / step_s > MAX_BANDWIDTH_POINTS:
        raise DeviceError(f"too many points: pick a later start or a step_s of at least {(now - start) / MAX_BANDWIDTH_POINTS:.0f}")
    rows = svc.storage.device_bandwidth(device_id, start, step_s)
    points = []
    for r in rows:
        # The current step is not over yet: its rate is over the part that has passed.
        seconds = max(1.0, min(step_s, now - r["start"]))
        points.append(
            {
                "start": r["start"],
                "messages": r["messages"],
                "bytes": r["bytes"],
                "bytes_per_hour": r["bytes"] * 3600.0 / seconds,
                "messages_per_hour": r["messages"] * 3600.0 / seconds,
            }
        )
    total_bytes = sum(p["bytes"] for p in points)
    total_messages = sum(p["messages"] for p in points)
    # Over the period the device was sending in, not before its first window.
    first = min((r["first_window_start"] for r in rows), default=now)
    span = max(1.0, now - max(start, first))
    return {
        "device": device_id,
        "start": start,
        "step_s": step_s,
        "points": points,
        "bytes": total_bytes,
        "messages": total_messages,
        "bytes_per_hour": total_bytes * 3600.0 / span if points else 0.0,
        "messages_per_hour": total_messages * 3600.0 / span if points else 0.0,
        "bytes_per_message": total_bytes / total_messages if total_messages else None,
    }
