"""Plain-text rendering of a rollout's status for the CLI (`edgefleet server rollout show`)."""

from __future__ import annotations

from typing import Any


def _value(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def render_status(s: dict[str, Any]) -> str:
    lines = [
        f"rollout {s['id']}  {s['model']} {s['version']}  {s['state']}"
        + (f"  ({s['reason']})" if s.get("reason") else ""),
        f"target {s['target']}  population {_value(s.get('population'))}  on failure: {s['on_failure']}",
        "",
        "stages:",
    ]
    for st in s["stages"]:
        size = f"{st['percent']:g} %" if st["percent"] is not None else f"{st['count']} devices"
        lines.append(f"  {st['index'] + 1}. {st['mode']:6} {size:>12}  soak {st['min_soak_s']:g} s  "
                     f"{st['state']:8} {st['verdict'] or ''}")
    canary = (s.get("cohorts") or {}).get("canary") or {}
    control = (s.get("cohorts") or {}).get("control") or {}
    if canary:
        lines += ["", f"canary: {canary.get('devices')} devices, {canary.get('updated')} updated, "
                      f"{canary.get('failed')} failed, {canary.get('timed_out')} timed out, "
                      f"{canary.get('predictions')} predictions",
                  f"control: {control.get('devices')} devices, {control.get('predictions')} predictions"]
    if s.get("gates"):
        lines += ["", f"{'gate':22} {'status':8} {'value':>10} {'threshold':>12} {'sample':>14}"]
        for g in s["gates"]:
            lines.append(f"{g['name']:22} {g['status']:8} {_value(g['value']):>10} "
                         f"{g['comparison'] + ' ' + _value(g['threshold']):>12} "
                         f"{str(g['sample']) + '/' + str(g['min_sample']):>8} {g['unit']}")
    if s.get("waiting_for"):
        lines += ["", "waiting for:"] + [f"  - {w}" for w in s["waiting_for"]]
    t = s.get("timeouts") or {}
    if t.get("count"):
        lines += ["", f"timeout bucket: {t['count']} device(s): {', '.join(t['devices'][:20])}"]
    f = s.get("failures") or {}
    if f.get("count"):
        lines += ["", f"failed: {f['count']} device(s):"]
        lines += [f"  {d['device']}: {d['reason']}" for d in f["devices"][:20]]
    lines += ["", "audit log:"]
    for a in s.get("audit", [])[-20:]:
        lines.append(f"  {a['ts']:.1f} {a['actor']:12} {a['action']}")
    return "\n".join(lines)
