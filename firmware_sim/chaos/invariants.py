"""The chaos run's invariants, checked once the run has settled and the fleet has stopped.

They compare what the devices hold (data dirs, outboxes, the windows they queued) with what the
server stored, read straight from its database file (read only) and through its services.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import msgspec

from firmware_sim.chaos.plan import CURRENT, MODEL, TARGET, ChaosPlan
from firmware_sim.chaos.recorder import WindowRecorder
from firmware_sim.chaos.report import Invariant
from firmware_sim.fleet import SimFleet


def read_server_db(data_dir: Path) -> sqlite3.Connection:
    """The server's database, read only (the server may still be writing it)."""
    return sqlite3.connect(f"file:{data_dir / 'fleet.db'}?mode=ro", uri=True)


def _outbox_state(path: Path) -> tuple[range, set[int], int]:
    """(the seqs the outbox made, those still queued, dropped total) of a stopped device's outbox."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        pending = {r[0] for r in db.execute("SELECT seq FROM messages")}
    finally:
        db.close()
    next_seq = max(int(meta.get("next_seq", 0)), max(pending, default=-1) + 1)
    return range(int(meta.get("first_seq", 0)), next_seq), pending, int(meta.get("dropped_total", 0))


def _row(name: str, expected: str, observed: str, problems: list[str]) -> Invariant:
    return Invariant(name, expected, observed, not problems, tuple(problems))


def check_invariants(svc: Any, plan: ChaosPlan, fleet: SimFleet, states: dict[str, Any],
                     recorder: WindowRecorder, rollout_id: str, trusted_pems: list[bytes]) -> list[Invariant]:
    """Every invariant of a settled, stopped chaos run, in the order the table shows them."""
    db = read_server_db(svc.config.data_dir)
    try:
        return [*_model_invariants(svc, plan, fleet, states, rollout_id),
                *_delivery_invariants(db, fleet),
                *_sum_invariants(svc, db, plan, recorder)]
    finally:
        db.close()


def _model_invariants(svc: Any, plan: ChaosPlan, fleet: SimFleet, states: dict[str, Any],
                      rollout_id: str) -> list[Invariant]:
    from edge_agent.agent import trusted_keys_from_config
    from edge_agent.store import DataDir
    from fleet_server import rollouts
    from model_tools.bundle import BundleError, load_extracted

    status = rollouts.rollout_status(svc, rollout_id)
    members = {m["device"]: m for m in status["devices"]}
    registry = {d: svc.storage.get_device(d) or {} for d in fleet.ids}
    faults = plan.device_faults()
    standing = {d: k for k, ds in faults.items() for d in ds}

    verified, unverified = 0, []
    reasons: Counter[str] = Counter()
    unexplained: list[str] = []
    mismatched: list[str] = []
    registry_off: list[str] = []
    for device_id in fleet.ids:
        s = states[device_id]
        device = fleet.devices[device_id]
        data = DataDir(device.config.data_dir)
        active, _ = data.committed()
        version = s.active_version
        try:
            if version is None or active != version:
                raise BundleError(f"serves {version} but committed {active}")
            load_extracted(data.version_dir(version), trusted_keys_from_config(device.config))
            verified += 1
        except (BundleError, ValueError, OSError) as exc:
            unverified.append(f"{device_id}: {exc}")
        m = members.get(device_id)
        m_status = m["status"] if m else None
        if version == TARGET:
            reasons["updated"] += 1
        elif version == CURRENT:
            if m_status == "failed":
                why = s.last_error or "failed (no error recorded)"
                reasons[f"failed: {_short(why)}"] += 1
            elif m_status == "timed_out":
                reasons["timed out"] += 1
            elif status["state"] != "completed" and m is None:
                reasons["not in a stage yet"] += 1
            else:
                unexplained.append(f"{device_id}: on {version}, rollout says {m_status}, update state "
                                   f"{s.update_state}, last error {s.last_error!r}, fault {standing.get(device_id)}")
        else:
            unexplained.append(f"{device_id}: runs {version!r}, neither {TARGET} nor {CURRENT}")
        # What the rollout stored about the device against what it runs.
        if m_status == "updated" and version != TARGET:
            mismatched.append(f"{device_id}: rollout says updated, device runs {version}"
                              f" ({_update_story(svc, rollout_id, device_id, m)})")
        if m_status == "failed" and version == TARGET:
            mismatched.append(f"{device_id}: rollout says failed, device runs {TARGET}"
                              f" ({_update_story(svc, rollout_id, device_id, m)})")
        if m is None and status["state"] == "completed":
            mismatched.append(f"{device_id}: the completed rollout never took it")
        reg = registry[device_id]
        if reg.get("active_version") != version or reg.get("update_state") != s.update_state:
            registry_off.append(f"{device_id}: server has {reg.get('active_version')}/{reg.get('update_state')}, "
                                f"device {version}/{s.update_state}")
    n = len(fleet.ids)
    by_status = Counter(m["status"] for m in status["devices"])
    return [
        _row("signature of the running model verifies", f"{n}/{n}", f"{verified}/{n}", unverified),
        _row("model is the target or previous, with a reason", f"{n} explained",
             f"{n - len(unexplained)} explained: " + ", ".join(f"{v} {k}" for k, v in sorted(reasons.items())),
             unexplained),
        _row("rollout finished", "completed", status["state"] + (f" ({status['reason']})" if status["reason"] else ""),
             [] if status["state"] == "completed" else [f"{status['state']}: {status['reason']}"]),
        _row("rollout state matches the devices", "0 mismatches",
             f"{len(mismatched)} mismatches ({', '.join(f'{v} {k}' for k, v in sorted(by_status.items()))})",
             mismatched),
        _row("server registry matches the devices", "0 differences", f"{len(registry_off)} differences",
             registry_off),
    ]


def retained_desired_invariant(svc: Any, fleet: SimFleet) -> Invariant:
    """The broker's retained `desired` of every device equals the server's `device_desired`, signed
    with the key the devices trust (read from the broker, with the server and broker running)."""
    from edge_agent.trust import DesiredTrustError, parse_document, raw_keys, verify_desired
    from firmware_sim.chaos.broker_view import retained_desired

    told = svc.storage.device_desired()
    retained = retained_desired(svc.config)
    keys = raw_keys(fleet.devices[fleet.ids[0]].config.trust.desired_keys_pem)
    fields = ("model", "version", "mode", "rollout_id", "allow_downgrade")
    equal, differ = 0, []
    for device_id in fleet.ids:
        row, payload = told.get(device_id), retained.get(device_id, b"")
        if row is None:
            if payload:
                differ.append(f"{device_id}: the broker retains a desired, the server told it none")
            else:
                equal += 1
            continue
        want = {k: row[k] if k != "allow_downgrade" else bool(row[k]) for k in fields}
        if not payload:
            differ.append(f"{device_id}: the broker retains no desired, the server told it {want['version']}")
            continue
        try:
            doc = parse_document(payload)
            verify_desired(doc, keys)
        except DesiredTrustError as exc:
            differ.append(f"{device_id}: the retained desired is refused: {exc}")
            continue
        got = {k: doc.get(k) for k in fields}
        if got != want:
            differ.append(f"{device_id}: the broker retains {got}, the server told it {want}")
        else:
            equal += 1
    n = len(fleet.ids)
    return _row("broker's retained desired equals the server's", f"{n}/{n} equal, signed",
                f"{equal}/{n} equal ({len(told)} told a desired)", differ)


def _update_story(svc: Any, rollout_id: str, device_id: str, member: dict[str, Any]) -> str:
    """What a device did in the rollout, for a mismatch message: its member row and outcomes."""
    events = [e for e in svc.storage.rollout_events(rollout_id) if e["device"] == device_id
              and e["kind"] in ("outcome", "refused")]
    told = {k: member.get(k) for k in ("stage", "mode", "status_at", "desired_at", "live_at")}
    return f"member {told}; events " + "; ".join(
        f"seq {e['seq']} {e['kind']} {e.get('version')} {e.get('outcome')} {e.get('reason')!r}" for e in events[-6:])


def _short(text: str, n: int = 32) -> str:
    """A reason's head, so that equal reasons count together in the table."""
    return text.split(":")[0].split(" (")[0][:n]


def _delivery_invariants(db: sqlite3.Connection, fleet: SimFleet) -> list[Invariant]:
    from edge_agent.store import DataDir

    stored: dict[str, set[int]] = defaultdict(set)
    for device, seq in db.execute("SELECT device, seq FROM seqs"):
        stored[device].add(seq)
    server_dropped = dict(db.execute("SELECT device, dropped_total FROM seq_stats").fetchall())
    acked_total = stored_total = missing_total = dropped_total = 0
    lost, phantom, unreported = [], [], []
    for device_id in fleet.ids:
        made, pending, dropped = _outbox_state(DataDir(fleet.devices[device_id].config.data_dir).outbox_file)
        acked = set(made) - pending  # acknowledged by the server, or dropped by the device
        have = stored[device_id]
        missing = acked - have
        acked_total += len(acked) - dropped
        stored_total += len(have & acked)
        missing_total += len(missing)
        dropped_total += dropped
        if len(missing) > dropped:
            lost.append(f"{device_id}: {len(missing) - dropped} acknowledged seqs not stored "
                        f"(first {sorted(missing)[:5]}), device dropped {dropped}")
        extra = {seq for seq in have if seq not in made}
        if extra:
            phantom.append(f"{device_id}: stored seqs the device never made: {sorted(extra)[:5]}")
        if dropped != server_dropped.get(device_id, 0) and (dropped or missing):
            unreported.append(f"{device_id}: device dropped {dropped}, server was told {server_dropped.get(device_id)}")
    # A window counted twice would show in the bucket sums: each device's windows once.
    doubled = [f"{device}: buckets count {b} windows, {w} stored"
               for device, b, w in db.execute(
                   "SELECT b.device, b.n, w.n FROM (SELECT device, SUM(windows) n FROM buckets GROUP BY device) b "
                   "JOIN (SELECT device, COUNT(*) n FROM windows GROUP BY device) w USING (device) WHERE b.n != w.n")]
    return [
        _row("acknowledged messages stored (seq accounting)", f"{acked_total} of {acked_total}",
             f"{stored_total} of {acked_total}, {missing_total} missing", lost + phantom),
        _row("no window counted twice", "0 devices", f"{len(doubled)} devices", doubled),
        _row("every gap is a drop the device reported", f"{dropped_total} reported drops",
             f"{missing_total} gaps, {len(unreported)} unreported", unreported + lost),
    ]


def _sum_invariants(svc: Any, db: sqlite3.Connection, plan: ChaosPlan, recorder: WindowRecorder) -> list[Invariant]:
    from fleet_server.drift_service import drift, profile_of, report_for
    from fleet_server.registry import get_model
    from fleet_server.telemetry import BucketSums, bucket_start, sum_rows

    stored = db.execute("SELECT device, seq, model_version, predictions, requests, errors, latency, prediction "
                        "FROM windows").fetchall()
    differ: list[str] = []
    recomputed: dict[tuple[str, str, float], BucketSums] = defaultdict(BucketSums)
    totals: dict[str, BucketSums] = defaultdict(BucketSums)
    for device, seq, version, predictions, n_requests, errors, latency, prediction in stored:
        w = recorder.windows.get((device, seq))
        if w is None:
            differ.append(f"{device} seq {seq}: stored, but the device never queued it")
            continue
        sent = (w.model_version, w.predictions, w.requests, sum(w.errors.values()), list(w.latency.counts),
                msgspec.to_builtins(w.prediction))
        if sent != (version, predictions, n_requests, errors, json.loads(latency), json.loads(prediction or "null")):
            differ.append(f"{device} seq {seq}: stored {version, predictions, n_requests, errors} "
                          f"but sent {sent[:4]}")
        recomputed[(version, device, bucket_start(w, plan.bucket_s))].add_window(w)
        totals[version].add_window(w)
    windows_row = _row("stored windows are what the devices sent", f"{len(stored)} identical",
                       f"{len(stored) - len(differ)} identical", differ)
    bucket_diffs: list[str] = []
    drift_diffs: list[str] = []
    checked = 0
    for version in sorted(totals):
        rows = svc.storage.bucket_rows(MODEL, version, None, None, None)
        server: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            server[(r["device"], r["bucket_start"])].append(r)
        mine = {(d, b): s for (v, d, b), s in recomputed.items() if v == version}
        for key in sorted(set(server) | set(mine)):
            checked += 1
            got, want = sum_rows(server.get(key, [])), mine.get(key, BucketSums())
            a, b = _comparable(got), _comparable(want)
            if a != b or abs(got.latency_sum_ms - want.latency_sum_ms) > 1e-6 * max(1.0, want.latency_sum_ms):
                fields = [k for k in a if a[k] != b[k]] or ["latency_sum_ms"]
                bucket_diffs.append(f"{version} {key[0]} bucket {key[1]:.0f}: {', '.join(fields)} differ")
        # Drift the server reports for the whole fleet against drift computed from the windows.
        row = get_model(svc, MODEL, version)
        served = drift(svc, MODEL, version, "fleet")
        mine_report = report_for(profile_of(row), totals[version])
        if mine_report is None:
            continue
        theirs = {f["name"]: f for f in served["features"]}
        if served.get("prediction"):
            theirs["prediction"] = served["prediction"]
        ours = dict(mine_report.features)
        if mine_report.prediction is not None:
            ours["prediction"] = mine_report.prediction
        for name, fd in ours.items():
            t = theirs.get(name)
            for metric in ("psi", "js", "ks"):
                x, y = getattr(fd, metric, None), (t or {}).get(metric)
                if x is None and y is None:
                    continue
                if x is None or y is None or abs(x - y) > 1e-9:
                    drift_diffs.append(f"{version} {name} {metric}: server {y}, recomputed {x}")
    n_drift = sum(1 for v in totals for _ in ("psi",))
    return [
        windows_row,
        _row("bucket sums equal a recomputation", f"{checked} buckets equal", f"{checked - len(bucket_diffs)} equal",
             bucket_diffs),
        _row("drift equals a recomputation", f"{n_drift} versions, 0 differences",
             f"{len(drift_diffs)} differences", drift_diffs),
    ]


def _comparable(s: Any) -> dict[str, Any]:
    return {"windows": s.windows, "predictions": s.predictions, "requests": s.requests,
            "errors": {k: v for k, v in s.errors.items() if v}, "latency": list(s.latency),
            "features": [list(f) for f in s.features or []], "prediction": list(s.prediction or [])}
