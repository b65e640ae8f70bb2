"""Rollout controller at fleet scale: a 5-stage rollout of a good model on 1,000 simulated devices.

Runs `firmware_sim.rehearse` (real agents, managed broker, fleet server, lockstep simulated clock)
and reports the simulated and real time from create to 100 %, each stage's time against its soak
time, bytes sent per device (MQTT desired states and bundle downloads) and the CPU time of the
controller's reconcile passes. Prints a markdown table and writes bench/results/rollout.md.

    .venv/bin/python bench/rollout.py            # 1,000 devices
    .venv/bin/python bench/rollout.py --quick    # 200 devices
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from firmware_sim.models import build_model
from firmware_sim.rehearse import RehearsalReport, rehearse
from firmware_sim.scenario import parse_scenario
from model_tools.signing import generate_keypair

RESULTS = Path(__file__).resolve().parent / "results"
SOAK_S = 300.0
INTERVAL_S = 10.0
STAGES = [
    {"percent": 5, "mode": "shadow", "min_soak_s": SOAK_S},
    {"percent": 1, "min_soak_s": SOAK_S},
    {"percent": 10, "min_soak_s": SOAK_S},
    {"percent": 50, "min_soak_s": SOAK_S},
    {"percent": 100, "min_soak_s": SOAK_S},
]


def run(devices: int) -> RehearsalReport:
    private, public = generate_keypair()
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    v1 = build_model(private, version="1.0.0")
    v2 = build_model(private, version="2.0.0")  # the same good model under a new version
    plan = {"model": v2.name, "version": "2.0.0", "target": {"all": True}, "stages": STAGES}
    scenario = parse_scenario({"rate_per_s": 1.0, "window_s": 60.0}, "bench-rollout")
    return rehearse(plan, devices=devices, scenario=scenario, current_bundle=v1.bundle_bytes,
                    candidate_bundle=v2.bundle_bytes, trusted_keys=[pem], interval_s=INTERVAL_S,
                    max_sim_s=6 * 3600, settle_timeout_s=300,
                    progress=lambda m: print(m, file=sys.stderr, flush=True))


def render(report: RehearsalReport, command: str) -> str:
    n = report.devices
    lines = [
        "# Rollout controller at fleet scale",
        "",
        f"`{command}` on {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}: "
        f"{n} simulated devices (real agents, one prediction a second each, 60 s telemetry windows), "
        f"managed broker and fleet server in one process, a 5-stage rollout (shadow 5 % → live 1 % → 10 % → "
        f"50 % → 100 %, soak {SOAK_S:.0f} s each) of a good model, one controller pass every "
        f"{INTERVAL_S:.0f} simulated seconds.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| outcome | {report.outcome} |",
        f"| simulated time, create → 100 % | {report.sim_s:.0f} s ({report.sim_s / 60:.1f} min) |",
        f"| real time (whole run: provisioning, boot, rollout) | {report.real_s:.0f} s |",
        f"| reconcile passes | {report.passes} |",
        f"| controller CPU, all passes | {report.controller_cpu_s:.2f} s "
        f"({report.controller_cpu_s / max(report.passes, 1) * 1000:.1f} ms a pass) |",
        f"| slowest pass (wall) | {report.controller_max_pass_s * 1000:.0f} ms |",
        f"| MQTT desired per device | {report.desired_bytes / n:.0f} B |",
        f"| bundle download per device | {report.download_bytes / n / 1024:.1f} KiB |",
        f"| devices on the new version at the end | {report.versions.get('2.0.0', 0)} of {n} |",
        "",
        "| stage | mode | devices | soak | took | beyond soak | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in report.stages:
        took = s.duration_s
        beyond = None if took is None else took - s.min_soak_s
        lines.append(f"| {s.index + 1} | {s.mode} | {s.devices} | {s.min_soak_s:.0f} s | "
                     f"{'-' if took is None else f'{took:.0f} s'} | "
                     f"{'-' if beyond is None else f'{beyond:.0f} s'} | {s.verdict} |")
    lines += [
        "",
        f"Goal: no more than one reconcile interval ({INTERVAL_S:.0f} s) beyond the soak time per stage. A stage "
        "ends at the first pass after its soak time in which every device of the stage reports the version and "
        "every gate has its sample; passes run on the interval, so a stage takes its soak time rounded up to the "
        "next pass, plus whatever the devices still need (download, install, self-test) when the soak ends.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 devices instead of 1,000")
    parser.add_argument("--devices", type=int, help="override the number of devices")
    args = parser.parse_args()
    devices = args.devices or (200 if args.quick else 1000)
    report = run(devices)
    command = "python bench/rollout.py" + (" --quick" if args.quick else "") + (
        f" --devices {args.devices}" if args.devices else "")
    text = render(report, command)
    print(report.table(), file=sys.stderr)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rollout.md").write_text(text)


if __name__ == "__main__":
    main()
