"""What the console's pages show, composed from the fleet server's services (no SQL, no Flask).

Each function returns one JSON-ready view model; the blueprints only parse arguments and encode.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from edge_agent.protocol import LATENCY_EDGES_MS
from fleet_server import alerts_service, device_data, devices, drift_service, registry
from fleet_server.devices import loss_summary
from fleet_server.drift import latency_percentile
from fleet_server.telemetry import EXTRA_SLOTS, BucketSums, sum_rows
from model_tools.manifest import BinnedDistribution

if TYPE_CHECKING:
    from fleet_server.context import Services

PAGE_SIZES = (25, 50, 100, 200)
DEVICE_PAGE_SAMPLES = 50  # sampled rows the device page shows
DEVICE_SORTS = ("id", "last_seen", "version", "status")


class ConsoleQueryError(ValueError):
    """A console query that cannot be answered; the message says what to change."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------ overview


def ingest_health(svc: Services) -> dict[str, Any]:
    """Lag percentiles and queue depth per ingest process, rejects by reason, loss by seq gaps."""
    now = svc.clock()
    workers = []
    for w in svc.storage.worker_stats():
        stats = w["stats"] or {}
        workers.append(
            {
                "worker_id": w["worker_id"],
                "age_s": now - w["updated_at"],
                "lag_s": stats.get("lag_s", {}),  # received off the broker -> stored (this host's clock)
                "delivery_s": stats.get("delivery_s", {}),  # device sent_at -> stored (outages included)
                "late_windows": stats.get("late_windows", 0),
                "queue": stats.get("queue_depth", stats.get("queue")),
                "stored_windows": stats.get("stored_windows", stats.get("windows")),
                "received": stats.get("received"),
            }
        )
    by_reason: dict[str, int] = defaultdict(int)
    for r in svc.storage.reject_counts():
        by_reason[r["reason"]] += r["count"]
    loss = [loss_summary(s) for s in svc.storage.seq_stats()]
    return {
        "workers": workers,
        "rejected": sum(by_reason.values()),
        "rejects_by_reason": dict(sorted(by_reason.items())),
        "lost_messages": sum(x["lost"] for x in loss),
        "dropped_by_devices": sum(x["dropped_by_device"] for x in loss),
    }


def overview(svc: Services) -> dict[str, Any]:
    """The fleet at a glance: device states, versions in use, open alerts, ingest health."""
    counts = svc.storage.fleet_counts()
    open_alerts = alerts_service.list_alerts(svc, state="open", limit=200)
    return {
        "devices": {
            "total": counts["total"],
            "online": counts["by_status"].get("online", 0),
            "offline": counts["by_status"].get("offline", 0),
            "unknown": counts["by_status"].get("unknown", 0),
            "updating": counts["updating"],
        },
        "versions": counts["versions"],
        "update_states": counts["update_states"],
        "alerts": {
            "open": len(open_alerts),
            "unacknowledged": sum(1 for a in open_alerts if a["acknowledged_at"] is None),
            "recent": [alert_row(a) for a in open_alerts[:8]],
        },
        "ingest": ingest_health(svc),
        "server_time": svc.clock(),
    }


def alert_row(a: dict[str, Any]) -> dict[str, Any]:
    return {
        k: a.get(k)
        for k in (
            "id", "model", "model_version", "scope", "target", "target_index", "severity", "state", "value",
            "opened_at", "bucket_start", "resolved_at", "acknowledged_at", "acknowledged_by",
        )
    }


# ------------------------------------------------------------------ devices


def _tag_filters(tag_args: list[str]) -> dict[str, str]:
    try:
        return devices.parse_tags([t for t in tag_args if t])
    except devices.DeviceError as exc:
        raise ConsoleQueryError(str(exc)) from None


def device_page(
    svc: Services,
    *,
    query: str = "",
    tags: list[str] | None = None,
    version: str | None = None,
    state: str | None = None,
    seen: str | None = None,
    sort: str = "id",
    page: int = 1,
    per_page: int = 50,
) -> dict[str, Any]:
    """One page of the device list, searched and filtered on the server (fast at 10,000+)."""
    if per_page not in PAGE_SIZES:
        raise ConsoleQueryError(f"per_page must be one of {list(PAGE_SIZES)}")
    if sort not in DEVICE_SORTS:
        raise ConsoleQueryError(f"sort must be one of {list(DEVICE_SORTS)}")
    if page < 1:
        raise ConsoleQueryError("page starts at 1")
    status = updating = None
    if state in ("online", "offline", "unknown"):
        status = state
    elif state == "updating":
        updating = True
    elif state:
        raise ConsoleQueryError("state must be online, offline, unknown or updating")
    now = svc.clock()
    seen_after = seen_before = None
    if seen:
        try:
            kind, seconds = seen[0], float(seen[1:])
        except (ValueError, IndexError):
            raise ConsoleQueryError("seen looks like <3600 (within an hour) or >86400 (not for a day)") from None
        if kind == "<":
            seen_after = now - seconds
        elif kind == ">":
            seen_before = now - seconds
        else:
            raise ConsoleQueryError("seen looks like <3600 (within an hour) or >86400 (not for a day)")
    rows, total = svc.storage.search_devices(
        query=query.strip(),
        tags=_tag_filters(tags or []),
        model_version=version or None,
        status=status,
        updating=updating,
        seen_after=seen_after,
        seen_before=seen_before,
        sort=sort,
        limit=per_page,
        offset=(page - 1) * per_page,
    )
    return {
        "devices": [device_row(d) for d in rows],
        "total": total,
        "page": page,
        "per_page": per_page,
        "pages": max(1, math.ceil(total / per_page)),
        "server_time": now,
    }


def device_row(d: dict[str, Any]) -> dict[str, Any]:
    reported = d.get("reported") or {}
    return {
        "id": d["id"],
        "status": d["status"],
        "last_seen": d["last_seen"],
        "model": d["model"],
        "active_version": d["active_version"],
        "previous_version": reported.get("previous_version"),
        "candidate_version": reported.get("candidate_version"),
        "update_state": d["update_state"],
        "agent_version": d["agent_version"],
        "tags": d["tags"],
    }


def filter_choices(svc: Services) -> dict[str, Any]:
    """Values the device filters offer: versions in use and tag keys."""
    counts = svc.storage.fleet_counts()
    return {
        "versions": sorted({v["version"] for v in counts["versions"] if v["version"]}),
        "tag_keys": counts["tag_keys"],
    }


def _bucket_point(start: float, sums: BucketSums) -> dict[str, Any]:
    errors = sums.error_count
    return {
        "bucket_start": start,
        "windows": sums.windows,
        "predictions": sums.predictions,
        "requests": sums.requests,
        "error_rate": errors / sums.requests if sums.requests else 0.0,
        "p50_ms": latency_percentile(sums.latency, LATENCY_EDGES_MS, 0.50),
        "p95_ms": latency_percentile(sums.latency, LATENCY_EDGES_MS, 0.95),
    }


def device_detail(svc: Services, device_id: str, since_s: float = 6 * 3600) -> dict[str, Any]:
    """Hardware, versions, update history, latency/error series, telemetry rate and bandwidth,
    drift and the newest sampled rows."""
    d = devices.get_device(svc, device_id)
    reported = d.get("reported") or {}
    events = svc.storage.events(device_id, 200)
    start = svc.clock() - since_s
    rows = svc.storage.device_bucket_rows(device_id, start)
    by_bucket: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_bucket[r["bucket_start"]].append(r)
    series = [_bucket_point(b, sum_rows(by_bucket[b])) for b in sorted(by_bucket)]
    drift = []
    for model, version in sorted({(r["model"], r["model_version"]) for r in rows if r["model"]}):
        if svc.storage.get_model(model, version) is None:
            continue  # no registered bundle, no reference profile
        report = drift_service.drift(svc, model, version, f"device:{device_id}", start)
        drift.append(
            {
                "model": model,
                "version": version,
                "predictions": report["predictions"],
                "features": [
                    {k: f[k] for k in ("index", "name", "psi", "noise_psi", "level")} for f in report["features"]
                ],
                "prediction": (
                    {k: report["prediction"][k] for k in ("psi", "noise_psi", "level")}
                    if report["prediction"]
                    else None
                ),
            }
        )
    bucket_s = svc.config.bucket_s
    windows = sum(p["windows"] for p in series)
    # Bandwidth per drift bucket (at most 500 points), from when the device was added.
    bw_start = max(start, d["created_at"])
    return {
        "device": {**device_row(d), "created_at": d["created_at"], "revoked_at": d["revoked_at"]},
        "hardware": reported.get("hardware") or {},
        "uptime_s": reported.get("uptime_s"),
        "update_outcome": reported.get("update_outcome"),
        "last_error": reported.get("last_error"),
        "rollout_id": reported.get("rollout_id"),
        "mode": reported.get("mode"),
        "delivery": d.get("delivery"),
        "events": events,
        "series": series,
        "bucket_s": bucket_s,
        "telemetry": {
            "windows": windows,
            "windows_per_min": (windows / (len(series) * bucket_s) * 60.0) if series else 0.0,
            "predictions": sum(p["predictions"] for p in series),
        },
        "bandwidth": device_data.bandwidth(svc, device_id, bw_start, max(bucket_s, (svc.clock() - bw_start) / 500)),
        "samples": device_data.recent_samples(svc, device_id, DEVICE_PAGE_SAMPLES),
        "drift": drift,
        "alerts": [alert_row(a) for a in alerts_service.list_alerts(svc, scope=f"device:{device_id}", limit=50)],
        "server_time": svc.clock(),
    }


# ------------------------------------------------------------------ models


def models(svc: Services) -> dict[str, Any]:
    """Every registered version with its reports, and how many devices run each."""
    running: dict[tuple[str, str], int] = {
        (v["model"], v["version"]): v["devices"] for v in svc.storage.fleet_counts()["versions"]
    }
    out = []
    for m in registry.list_models(svc):
        detail = registry.get_model(svc, m["name"], m["version"])
        profile = detail["manifest"].get("profile", {})
        m["devices"] = running.get((m["name"], m["version"]), 0)
        m["profile"] = [
            {
                "name": f["name"],
                "kind": f["kind"],
                "min": f.get("min"),
                "max": f.get("max"),
                "mean": f.get("mean"),
                "std": f.get("std"),
                "bins": len(f["distribution"]["counts"]),
            }
            for f in profile.get("features", [])
        ]
        out.append(m)
    return {"models": out}


# ------------------------------------------------------------------ drift


def _labels(dist: BinnedDistribution) -> list[str]:
    if dist.categories is not None:
        return [*dist.categories, "other"]
    edges = dist.edges or []
    if not edges:
        return ["all"]
    labels = [f"≤ {edges[0]:.3g}"]
    labels += [f"({a:.3g}, {b:.3g}]" for a, b in zip(edges, edges[1:], strict=False)]
    labels.append(f"> {edges[-1]:.3g}")
    return labels


def _shares(counts: list[int]) -> list[float]:
    total = sum(counts)
    return [c / total if total else 0.0 for c in counts]


def distribution(
    svc: Services,
    model: str,
    version: str,
    feature: int | None,
    scope: str = "fleet",
    start: float | None = None,
    end: float | None = None,
) -> dict[str, Any]:
    """Reference and current shares per bin (NaN bin last) of one feature, or of the prediction
    when `feature` is None, for overlaying."""
    row = registry.get_model(svc, model, version)
    profile = drift_service.profile_of(row)
    if feature is None:
        ref, name = profile.prediction, "prediction"
    else:
        if not 0 <= feature < len(profile.features):
            raise ConsoleQueryError(f"feature index {feature} is out of range (0..{len(profile.features) - 1})")
        ref, name = profile.features[feature].distribution, profile.features[feature].name
    sums = sum_rows(svc.storage.bucket_rows(model, version, start, end, drift_service.scope_devices(svc, scope)))
    packed = sums.prediction if feature is None else (sums.features[feature] if sums.features else None)
    current = list(packed[:-EXTRA_SLOTS]) + [packed[-EXTRA_SLOTS]] if packed else [0] * (len(ref.counts) + 1)
    reference = [*ref.counts, ref.nan]
    return {
        "model": model,
        "version": version,
        "scope": scope,
        "feature": feature,
        "name": name,
        "labels": [*_labels(ref), "NaN"],
        "reference": _shares(reference),
        "current": _shares(current),
        "n_reference": sum(reference),
        "n_current": sum(current),
    }


def drift_versions(svc: Services) -> list[dict[str, Any]]:
    """Registered model versions, newest first, with whether they have telemetry."""
    with_data = {(v["model"], v["model_version"]) for v in svc.storage.bucketed_versions()}
    rows = [
        {"model": m["name"], "version": m["version"], "has_data": (m["name"], m["version"]) in with_data}
        for m in svc.storage.list_models()
    ]
    rows.sort(key=lambda r: (not r["has_data"], r["model"]))
    return rows
