"""Run every benchmark and write docs/benchmarks.md: each figure beside its baseline, the
machine, and the command that made it. `make bench` calls this; `--quick` shortens each run."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

# (result file, script, title); each script prints a markdown table and writes its file.
BENCHMARKS = [
    ("inference.md", "bench/inference.py", "Model inference: sklearn vs onnxruntime"),
    ("agent.md", "bench/agent.py", "Agent serving"),
    ("arm64.md", "bench/arm64.py", "Agent on emulated arm64 (qemu-user) beside native"),
    ("drift.md", "bench/drift.py", "Drift computation"),
    ("monitoring.md", "bench/monitoring.py", "Monitoring cost on the agent"),
    ("ingest.md", "bench/ingest.py", "Telemetry ingest"),
    ("ingest_scale.md", "bench/ingest_scale.py", "Ingest across processes"),
    ("sim.md", "bench/sim.py", "Simulated fleet"),
    ("rollout.md", "bench/rollout.py", "Rollout controller"),
    ("cluster.md", "bench/cluster.py", "Several nodes: leader takeover and the controller pass on both backends"),
]


def machine() -> str:
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem_kb / 1048576:.0f} GiB RAM, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    parser.add_argument("--only", nargs="*", help="result names to run, e.g. agent ingest")
    parser.add_argument("--collect", action="store_true",
                        help="run nothing; rebuild docs/benchmarks.md from bench/results/")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    failed = []
    for result, script, title in BENCHMARKS:
        name = Path(result).stem
        if args.collect or (args.only and name not in args.only):
            continue
        if not (ROOT / script).exists():
            continue
        cmd = [sys.executable, script] + (["--quick"] if args.quick else [])
        print(f"== {title}: {' '.join(cmd)}", flush=True)
        started = time.monotonic()
        proc = subprocess.run(cmd, cwd=ROOT)
        print(f"   ({time.monotonic() - started:.0f} s, exit {proc.returncode})", flush=True)
        if proc.returncode != 0:
            failed.append(script)
    sections = [
        "# Benchmarks\n",
        "Written by `make bench` (`python bench/run_all.py`); every figure stands beside a baseline "
        "measured in the same run. Timings are never test assertions: they live here.\n",
        f"Machine: {machine()}.\n",
    ]
    for result, script, title in BENCHMARKS:
        path = RESULTS / result
        if path.exists():
            # Each result file is a page of its own; drop its title, keep its body under ours.
            body = "\n".join(
                ("##" + line if line.startswith("## ") else line)
                for line in path.read_text().strip().splitlines()
                if not line.startswith("# ")
            ).strip()
            sections.append(f"## {title}\n\nCommand: `python {script}`\n\n{body}\n")
    (ROOT / "docs" / "benchmarks.md").write_text("\n".join(sections))
    print("wrote docs/benchmarks.md")
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
