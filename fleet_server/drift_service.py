"""Drift and telemetry services: roll bucket sums up to a scope, then score them (fleet_server.drift).

A scope is `fleet`, `device:ID` or `tag:KEY=VALUE`. Every roll-up is a sum of stored
(model version, device, bucket) rows, so the fleet's numbers equal the sum of its devices'.
Features are identified by index (names are arbitrary strings and stay in the payload only).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from fleet_server.alerts import DriftPolicy
from fleet_server.drift import DriftReport, FeatureDrift, drift_report
from fleet_server.registry import effective_policy, get_model
from fleet_server.telemetry import EXTRA_SLOTS, BucketSums, sum_rows, summary
from model_tools.manifest import ReferenceProfile

if TYPE_CHECKING:
    from fleet_server.context import Services


class DriftQueryError(ValueError):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def parse_scope(scope: str) -> tuple[str, str | None, str | None]:
    """`fleet` / `device:ID` / `tag:KEY=VALUE` -> (kind, key, value)."""
    if scope == "fleet":
        return "fleet", None, None
    kind, _, rest = scope.partition(":")
    if kind == "device" and rest:
        return "device", rest, None
    if kind == "tag" and "=" in rest:
        key, _, value = rest.partition("=")
        return "tag", key, value
    raise DriftQueryError(f"scope {scope!r} must be 'fleet', 'device:ID' or 'tag:KEY=VALUE'")


def scope_devices(svc: Services, scope: str) -> list[str] | None:
    """Device ids in a scope; None means every device (the fleet)."""
    kind, key, value = parse_scope(scope)
    if kind == "fleet":
        return None
    if kind == "device":
        return [key or ""]
    devices = svc.storage.list_devices(tags={key or "": value or ""}, include_revoked=True, limit=1_000_000)
    return [d["id"] for d in devices]


def scopes_for(svc: Services, model: str, version: str, rows: list[dict[str, Any]]) -> list[str]:
    """The fleet, every device with data for this version, and every tag value among them."""
    device_ids = sorted({r["device"] for r in rows})
    scopes = ["fleet"] + [f"device:{d}" for d in device_ids]
    tag_scopes: set[str] = set()
    wanted = set(device_ids)
    for d in svc.storage.list_devices(include_revoked=True, limit=1_000_000):
        if d["id"] in wanted:
            tag_scopes.update(f"tag:{k}={v}" for k, v in d["tags"].items())
    return scopes + sorted(tag_scopes)


def profile_of(row: dict[str, Any]) -> ReferenceProfile:
    return msgspec.convert(row["manifest"]["profile"], ReferenceProfile)


def _counts(packed: list[int]) -> tuple[list[int], int]:
    return packed[:-EXTRA_SLOTS], packed[-EXTRA_SLOTS]


def report_for(profile: ReferenceProfile, sums: BucketSums) -> DriftReport | None:
    """Drift of summed counts against the profile; None when no feature counts arrived."""
    if not sums.features:
        return None
    return drift_report(
        profile,
        [_counts(f) for f in sums.features],
        _counts(sums.prediction) if sums.prediction is not None else None,
    )


def _feature_entry(
    index: int | None, name: str, fd: FeatureDrift, policy: DriftPolicy, packed: list[int] | None
) -> dict[str, Any]:
    level = policy.level(fd.psi, fd.noise_psi, fd.n_cur)
    entry = {"index": index, "name": name, **fd.to_dict(), "level": level.value if level else None}
    if packed is not None:
        entry["below_min"], entry["above_max"], entry["unseen"] = packed[-3:]
    return entry


def describe(
    profile: ReferenceProfile, sums: BucketSums, policy: DriftPolicy
) -> dict[str, Any]:
    report = report_for(profile, sums)
    if report is None:
        return {"features": [], "prediction": None}
    feats = [
        _feature_entry(i, fp.name, report.features[fp.name], policy, sums.features[i] if sums.features else None)
        for i, fp in enumerate(profile.features)
    ]
    pred = (
        _feature_entry(None, "prediction", report.prediction, policy, sums.prediction)
        if report.prediction is not None
        else None
    )
    return {"features": feats, "prediction": pred}


K = TypeVar("K", str, float)


def _described_groups(
    rows: Iterable[dict[str, Any]],
    key: Callable[[dict[str, Any]], K | None],
    profile: ReferenceProfile,
    policy: DriftPolicy,
) -> Iterator[tuple[K, BucketSums, dict[str, Any]]]:
    """Bucket rows grouped by `key` (a row whose key is None is left out), in key order: each
    group's key, summed counts and drift description."""
    groups: dict[K, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        k = key(r)
        if k is not None:
            groups[k].append(r)
    for k in sorted(groups):
        sums = sum_rows(groups[k])
        yield k, sums, describe(profile, sums, policy)


def _view_inputs(
    svc: Services, model: str, version: str, scope: str | None, start: float | None, end: float | None
) -> tuple[ReferenceProfile, DriftPolicy, list[dict[str, Any]]]:
    """What every drift view reads: the version's reference profile and effective policy, and its
    bucket rows in [start, end) within `scope` (None: every device, for the per-cohort view)."""
    row = get_model(svc, model, version)
    devices = scope_devices(svc, scope) if scope is not None else None
    rows = svc.storage.bucket_rows(model, version, start, end, devices)
    return profile_of(row), effective_policy(svc, row), rows


_POINT = ("psi", "js", "noise_psi", "level")  # a timeline point's numbers per feature


def _pick(entry: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: entry[k] for k in keys}


def drift(
    svc: Services,
    model: str,
    version: str,
    scope: str = "fleet",
    start: float | None = None,
    end: float | None = None,
) -> dict[str, Any]:
    """Drift per feature and for the prediction of one model version in one scope and time range."""
    profile, policy, rows = _view_inputs(svc, model, version, scope, start, end)
    sums = sum_rows(rows)
    return {
        "model": model,
        "version": version,
        "scope": scope,
        "start": start,
        "end": end,
        "buckets": len({r["bucket_start"] for r in rows}),
        "devices": len({r["device"] for r in rows}),
        "policy": policy.to_dict(),
        **summary(sums),
        **describe(profile, sums, policy),
    }


def timeline(
    svc: Services,
    model: str,
    version: str,
    scope: str = "fleet",
    start: float | None = None,
    end: float | None = None,
) -> dict[str, Any]:
    """Per-bucket PSI of every feature and the prediction (for charts and alert evaluation)."""
    profile, policy, rows = _view_inputs(svc, model, version, scope, start, end)
    points = [
        {
            "bucket_start": bucket,
            "bucket_end": bucket + svc.config.bucket_s,
            "predictions": sums.predictions,
            "features": [_pick(f, "index", *_POINT) for f in d["features"]],
            "prediction": _pick(d["prediction"], *_POINT) if d["prediction"] else None,
        }
        for bucket, sums, d in _described_groups(rows, lambda r: r["bucket_start"], profile, policy)
    ]
    return {
        "model": model,
        "version": version,
        "scope": scope,
        "bucket_s": svc.config.bucket_s,
        "features": [{"index": i, "name": f.name} for i, f in enumerate(profile.features)],
        "points": points,
    }


def cohorts(
    svc: Services,
    model: str,
    version: str,
    by: str = "device",
    start: float | None = None,
    end: float | None = None,
) -> dict[str, Any]:
    """Drift per device, or per value of a tag (`by=tag:KEY`), side by side."""
    profile, policy, rows = _view_inputs(svc, model, version, None, start, end)
    if by == "device":
        cohort_of = {r["device"]: f"device:{r['device']}" for r in rows}
    elif by.startswith("tag:") and len(by) > 4:
        key = by[4:]
        cohort_of = {
            d["id"]: f"tag:{key}={d['tags'][key]}"
            for d in svc.storage.list_devices(include_revoked=True, limit=1_000_000)
            if d["tags"].get(key) is not None
        }
    else:
        raise DriftQueryError(f"by={by!r} must be 'device' or 'tag:KEY'")
    out = []
    for scope, sums, d in _described_groups(rows, lambda r: cohort_of.get(r["device"]), profile, policy):
        worst = max(d["features"], key=lambda f: f["psi"] if f["psi"] is not None else -1, default=None)
        out.append(
            {
                "scope": scope,
                **summary(sums),
                "max_feature_psi": worst["psi"] if worst else None,
                "max_feature_index": worst["index"] if worst else None,
                "prediction_psi": d["prediction"]["psi"] if d["prediction"] else None,
                "features": [_pick(f, "index", "psi", "level") for f in d["features"]],
            }
        )
    return {"model": model, "version": version, "by": by, "cohorts": out}


def telemetry_summary(
    svc: Services,
    *,
    group_by: str = "version",
    device: str | None = None,
    start: float | None = None,
) -> list[dict[str, Any]]:
    """Predictions, error rates and latency percentiles per model version or per device x version."""
    if group_by not in ("version", "device"):
        raise DriftQueryError(f"group_by={group_by!r} must be 'version' or 'device'")
    groups: dict[tuple[str, ...], BucketSums] = defaultdict(BucketSums)
    if device is not None:
        rows = svc.storage.device_bucket_rows(device, start)
    else:
        rows = []
        for v in svc.storage.bucketed_versions(start):
            rows += svc.storage.bucket_rows(v["model"], v["model_version"], start)
    for r in rows:
        key = (r["model"], r["model_version"]) + ((r["device"],) if group_by == "device" else ())
        groups[key].add_sums(BucketSums.from_row(r))
    out = []
    for key in sorted(groups):
        entry = {"model": key[0] or None, "version": key[1] or None}
        if group_by == "device":
            entry["device"] = key[2]
        out.append({**entry, **summary(groups[key])})
    return out
