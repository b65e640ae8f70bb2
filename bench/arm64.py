"""The agent on an emulated arm64 device (qemu-user, the Debian root of tests/arm64_fixtures.py,
installed from the aarch64 wheelhouse) next to the same figures natively in the same run: import
time, per-row latency (raw onnxruntime and Agent.predict), RSS.

qemu-user translates every aarch64 instruction into x86 code on the fly: its timings are those
of the emulator on this machine, not of a Raspberry Pi. What the emulated run shows reliably is
that the aarch64 wheels work and what the agent maps and allocates there; the timings are given
as the emulated/native ratio on this machine.

Run: .venv/bin/python bench/arm64.py   (writes bench/results/arm64.md). Not a test. Needs root
(chroot, overlay, cgroup) and the Debian packages `make setup` installs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.agent_fixtures import bundle_bytes, config_toml, install_active, make_config  # noqa: E402
from tests.arm64_fixtures import VENV, Device, agent_wheelhouse, build_root, install_agent  # noqa: E402

# Measured inside the process under test, the same script natively and under emulation.
# argv: agent config, number of timed calls.
MEASURE = r"""
import json, sys, time
t0 = time.perf_counter()

def status():
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024
    return out

steps = {"bare": status()}
times = {}
t = time.perf_counter(); import numpy as np; times["numpy"] = time.perf_counter() - t
steps["numpy"] = status()
t = time.perf_counter(); import onnxruntime as ort; times["onnxruntime"] = time.perf_counter() - t
steps["onnxruntime"] = status()
t = time.perf_counter()
from edge_agent import Agent
from edge_agent.config import load_config
from edge_agent.service import AgentService
times["edge_agent"] = time.perf_counter() - t
steps["edge_agent"] = status()
config = load_config(sys.argv[1])
n = int(sys.argv[2])
t = time.perf_counter(); agent = Agent(config, link_mode="none").start(); times["agent_start"] = time.perf_counter() - t
row = [0.1 * i for i in range(len(agent.active.manifest.inputs))]

def timed(fns, block=100):
    # Alternating blocks of `block` calls: a change in load (or in the emulator's translation
    # cache) falls on every function alike.
    for fn in fns:
        for _ in range(max(20, n // 10)):
            fn()
    outs = [[] for _ in fns]
    for _ in range(max(1, n // block)):
        for fn, out in zip(fns, outs):
            for _ in range(block):
                s = time.perf_counter_ns()
                fn()
                out.append((time.perf_counter_ns() - s) / 1000.0)
    result = []
    for out in outs:
        out.sort()
        result.append({"p50": out[len(out) // 2], "p99": out[int(len(out) * 0.99)]})
    return result

from edge_agent.runtime import session_options
manifest = agent.active.manifest
import glob
model = glob.glob(config.data_dir + "/versions/*/model.onnx")[0]
sess = ort.InferenceSession(open(model, "rb").read(), session_options(1), providers=["CPUExecutionProvider"])
spec = manifest.onnx_inputs[0]
feed = {spec.name: np.asarray([[row[c] for c in spec.columns]], dtype=spec.dtype)}
names = [x for x in (manifest.outputs.label, manifest.outputs.probabilities) if x]
predict, raw = timed([lambda: agent.predict([row]), lambda: sess.run(names, feed)])
steps["agent"] = status()
agent.close()
print(json.dumps({"steps": steps, "times": times, "predict_us": predict, "raw_us": raw,
                  "in_process_s": time.perf_counter() - t0}))
"""

STEP_LABELS = [("bare", "bare python"), ("numpy", "+ numpy"), ("onnxruntime", "+ onnxruntime"),
               ("edge_agent", "+ edge_agent (Agent, config, service)"),
               ("agent", "+ a started Agent with the model, after the timed predictions")]


def measure(argv: list[str], config_path: str, n: int, runner=None) -> dict:
    """Run MEASURE with `argv` (python) natively, or through `runner` (the device); wall time too."""
    cmd = [*argv, "-c", MEASURE, config_path, str(n)]
    started = time.perf_counter()
    if runner is None:
        env = dict(os.environ, PYTHONPATH=str(ROOT), MALLOC_ARENA_MAX="2")
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=True).stdout
    else:
        out = runner(cmd).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - started
    return result


def bare_start(argv: list[str], runner=None, repeats: int = 3) -> float:
    """Median seconds for `python -c pass` (interpreter start, and emulator start)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        if runner is None:
            subprocess.run([*argv, "-c", "pass"], check=True)
        else:
            runner([*argv, "-c", "pass"])
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer timed calls")
    args = parser.parse_args()
    n = 300 if args.quick else 2000
    load_start = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="edgefleet-bench-arm64-"))
    root = build_root()
    house = agent_wheelhouse(tmp / "wheelhouse")
    device = Device.create(root, tmp)
    try:
        install_agent(device, house)
        data = bundle_bytes("lr", "1.0.0")
        # Native: the agent from this checkout; emulated: the agent installed from the wheelhouse.
        native_cfg = make_config(tmp / "native")
        install_active(Path(native_cfg.data_dir), data)
        (tmp / "native.toml").write_text(config_toml(native_cfg))
        device_cfg = make_config(tmp / "device")
        text = config_toml(device_cfg).replace(f'data_dir = "{device_cfg.data_dir}"',
                                               'data_dir = "/var/lib/edgefleet-bench"')
        install_active(device.host("/var/lib/edgefleet-bench"), data)
        device.host("/etc/edgefleet-bench").mkdir(parents=True, exist_ok=True)
        device.host("/etc/edgefleet-bench/agent.toml").write_text(text)

        def on_device(cmd: list[str]):
            return device.run(cmd, timeout=1800)

        native = measure([sys.executable], str(tmp / "native.toml"), n)
        emulated = measure([f"{VENV}/bin/python"], "/etc/edgefleet-bench/agent.toml", n, on_device)
        start_native = bare_start([sys.executable])
        start_emulated = bare_start(["/usr/bin/python3"], on_device)
    finally:
        device.cleanup()
    write(native, emulated, start_native, start_emulated, n, (load_start, os.getloadavg()[0]))


def _ratio(a: float, b: float) -> str:
    return f"{b / a:.1f}×" if a else "—"


def write(native: dict, emulated: dict, start_native: float, start_emulated: float, n: int,
          load: tuple[float, float]) -> None:
    rows = []
    for key, label in (("numpy", "import numpy"), ("onnxruntime", "import onnxruntime"),
                       ("edge_agent", "import edge_agent (Agent, config, service)"),
                       ("agent_start", "Agent start (load, verify and open the model)")):
        a, b = native["times"][key], emulated["times"][key]
        rows.append(f"| {label} | {a * 1000:.0f} ms | {b * 1000:.0f} ms | {_ratio(a, b)} |")
    rows.append(f"| `python -c pass` (interpreter start; emulated: + qemu start) | {start_native * 1000:.0f} ms | "
                f"{start_emulated * 1000:.0f} ms | {_ratio(start_native, start_emulated)} |")
    for key, label in (("raw_us", "raw onnxruntime run, 1 row"), ("predict_us", "Agent.predict, 1 row")):
        a, b = native[key], emulated[key]
        rows.append(f"| {label} p50 / p99 | {a['p50']:.1f} / {a['p99']:.1f} µs | {b['p50']:.1f} / {b['p99']:.1f} µs "
                    f"| {_ratio(a['p50'], b['p50'])} |")
    ratio_native = native["predict_us"]["p50"] / native["raw_us"]["p50"]
    ratio_emulated = emulated["predict_us"]["p50"] / emulated["raw_us"]["p50"]
    rows.append(f"| Agent.predict / raw onnxruntime (p50) | {ratio_native:.2f} | {ratio_emulated:.2f} | |")
    rss = []
    for key, label in STEP_LABELS:
        a, b = native["steps"][key], emulated["steps"][key]
        rss.append(f"| {label} | {a['VmRSS']:.1f} ({a['RssFile']:.1f} file) | {b['VmRSS']:.1f} ({b['RssFile']:.1f} file) |")
    lines = [
        "# The agent on emulated arm64",
        "",
        f"Native: {platform.machine()}, Python {sys.version.split()[0]}, this checkout. Emulated: aarch64 Debian "
        "(the host's release, from its mirror) under qemu-user-static through binfmt, Debian's python3, the agent "
        f"installed from the aarch64 wheelhouse (`edge_agent.release`). Model: LogisticRegression pipeline; {n} timed "
        "single-row calls of each after a warm-up, raw onnxruntime and Agent.predict in alternating blocks of 100 "
        "(a change in load falls on both alike), one intra-op thread. 1-minute load average "
        f"{load[0]:.1f} at the start and {load[1]:.1f} at the end, on {os.cpu_count()} cores: above the core count "
        "other work competed with both runs, and the ratios mean little.",
        "",
        "**qemu-user timings are not Raspberry Pi timings.** Each aarch64 instruction is translated to x86 code "
        "on this machine's CPU; the ratio column is emulator overhead on this machine, and it differs by kind of "
        "work (interpreter loops, numpy kernels, onnxruntime's NEON code paths, system calls), so no single factor "
        "turns these into Pi figures. Measure on the device (`bench/agent.py` runs there too). What the emulated run "
        "does establish: the aarch64 wheels import and serve, predictions match the host's, and the memory the "
        "agent maps and allocates on aarch64.",
        "",
        "| step | native | emulated aarch64 | emulated / native |",
        "|---|---|---|---|",
        *rows,
        "",
        "RSS in MiB (of which file-backed), VmRSS of the process after each step. Under emulation the process is "
        "qemu: its RSS includes qemu itself and its translated-code cache, so it is an upper bound of what the "
        "same agent holds on a Pi.",
        "",
        "| step | native MiB | emulated aarch64 MiB |",
        "|---|---|---|",
        *rss,
        "",
    ]
    text = "\n".join(lines)
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "arm64.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
