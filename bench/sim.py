"""Simulated fleet at scale: N real agents with real MQTT connections against a fleet server
subprocess (with its managed Mosquitto), one telemetry window per simulated minute each, for ten
simulated minutes. Reports CPU, RSS and messages (sent vs stored, loss) to bench/results/sim.md.

    python bench/sim.py            # 1,000 devices, 10 simulated minutes at 6x
    python bench/sim.py --quick    # 200 devices, 3 simulated minutes
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from firmware_sim.clock import SimClock  # noqa: E402
from firmware_sim.fleet import SimFleet  # noqa: E402
from firmware_sim.provision import DataDirProvisioner  # noqa: E402
from firmware_sim.scenario import parse_scenario  # noqa: E402
from tests.brokers import free_port, wait_for_port  # noqa: E402

RESULT = ROOT / "bench" / "results" / "sim.md"


class Sampler:
    """Peak RSS and CPU of a few processes, sampled every half second."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peak = dict.fromkeys(pids, 0)
        self.cpu0 = {name: self._cpu(p) for name, p in self.procs.items()}
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @staticmethod
    def _cpu(p: psutil.Process) -> float:
        t = p.cpu_times()
        return t.user + t.system

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            for name, p in self.procs.items():
                with contextlib.suppress(psutil.Error):
                    self.peak[name] = max(self.peak[name], p.memory_info().rss)

    def stop(self) -> dict[str, tuple[float, int]]:
        self._stop.set()
        self.thread.join()
        return {name: (self._cpu(p) - self.cpu0[name], self.peak[name]) for name, p in self.procs.items()}


def session_cost(bundle: bytes, n: int = 100) -> tuple[float, float]:
    """RSS and load time per separately loaded onnxruntime session (what sharing saves)."""
    from edge_agent.runtime import ModelRuntime
    from model_tools.bundle import read_bundle

    b = read_bundle(bundle, require_signature=False)
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    t0 = time.perf_counter()
    keep = [ModelRuntime(b) for _ in range(n)]
    dt = (time.perf_counter() - t0) / n
    per = (proc.memory_info().rss - rss0) / n
    del keep
    return per, dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--devices", type=int)
    ap.add_argument("--minutes", type=float)
    ap.add_argument("--speed", type=float, default=6.0)
    args = ap.parse_args()
    n = args.devices or (200 if args.quick else 1000)
    minutes = args.minutes or (3.0 if args.quick else 10.0)
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    root = Path(tempfile.mkdtemp(prefix="ef-bench-sim-", dir=shm))
    server_dir = Path(tempfile.mkdtemp(prefix="ef-bench-sim-server-"))
    api, mqtt = free_port(), free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", "from edge_agent.entry import main; main()", "server", "run",
         "--data-dir", str(server_dir), "--listen", f"127.0.0.1:{api}", "--broker-port", str(mqtt)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    fleet = None
    try:
        wait_for_port("127.0.0.1", api, 60)
        from cryptography.hazmat.primitives import serialization

        from firmware_sim.models import build_model
        from fleet_server.registry import trust_key, upload_bundle
        from model_tools.signing import generate_keypair

        prov = DataDirProvisioner(server_dir)
        private, public = generate_keypair()
        trust_key(prov.svc, public.public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo))
        model = build_model(private)
        upload_bundle(prov.svc, model.bundle_bytes)
        per_session_rss, per_session_s = session_cost(model.bundle_bytes)

        scenario = parse_scenario({"rate_per_s": 1.0, "window_s": 60, "duration_min": minutes,
                                   "speed": args.speed}, "bench")
        clock = SimClock(args.speed)
        fleet = SimFleet(scenario, devices=n, provisioner=prov, workdir=root, clock=clock,
                         mqtt_url=f"mqtt://127.0.0.1:{mqtt}", step_s=10.0)
        t0 = time.monotonic()
        fleet.provision().preinstall(model.bundle_bytes)
        setup_s = time.monotonic() - t0
        broker_pid = int((server_dir / "broker" / "mosquitto.pid").read_text().strip())
        sampler = Sampler({"simulator": os.getpid(), "fleet server": server.pid, "mosquitto": broker_pid})
        t0 = time.monotonic()
        fleet.start(wait_online=300)
        connect_s = time.monotonic() - t0
        real0, sim0 = time.monotonic(), clock()
        fleet.wait(lambda: clock() - sim0 >= minutes * 60, minutes * 60 / args.speed * 3 + 120, "the run")
        run_real = time.monotonic() - real0
        stats = fleet.stats()
        fleet.stop()  # flushes every device's last window and publishes offline
        sent = sum(d.windows for d in fleet.devices.values())
        db = sqlite3.connect(f"file:{server_dir / 'fleet.db'}?mode=ro", uri=True)
        deadline = time.monotonic() + 120
        stored = 0
        while time.monotonic() < deadline:
            stored = db.execute("SELECT COUNT(*) FROM windows").fetchone()[0]
            if stored >= sent:
                break
            time.sleep(0.5)
        rows = db.execute("SELECT first_seq, max_seq, received, dropped_total FROM seq_stats").fetchall()
        lost = sum(max(0, (mx - first + 1 - rec) - dropped) for first, mx, rec, dropped in rows)
        usage = sampler.stop()
        sim_cpu_total = resource.getrusage(resource.RUSAGE_SELF)
        load = os.getloadavg()[0]
        prov.close()
    finally:
        if fleet is not None and fleet._thread is not None and fleet._thread.is_alive():
            fleet.stop()
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()

    mb = 1024 * 1024
    lines = [
        "# Simulated fleet benchmark",
        "",
        f"Generated by `bench/sim.py{' --quick' if args.quick else ''}` (`make bench`). {n} simulated devices "
        f"(real `edge_agent` cores, one MQTT 5 connection and account each, QoS 1) in one simulator "
        f"process driven by one selector thread, against `edgefleet server run` (subprocess) and its "
        f"managed Mosquitto, on one 2-core machine shared by all three; load average {load:.1f} at the end. "
        f"Each device serves 1 prediction per simulated second (single-row requests) and sends one "
        f"telemetry window (30 features) per simulated minute, for {minutes:g} simulated minutes at "
        f"{args.speed:g}x (real {run_real:.0f} s, achieved {(stats.elapsed_s) / max(run_real, 1e-9):.1f}x). "
        f"Device data dirs on {'tmpfs' if shm else 'disk'}.",
        "",
        "| | value |",
        "|---|---|",
        f"| devices online at the end | {stats.online} / {n} |",
        f"| predictions served | {stats.predictions:,} |",
        f"| telemetry windows sent | {sent:,} |",
        f"| windows stored by the server | {stored:,} |",
        f"| lost (seq gaps not explained by device drops) | {lost} |",
        f"| provisioning + factory image (not measured below) | {setup_s:.0f} s |",
        f"| boot and connect all devices | {connect_s:.1f} s |",
    ]
    for name, (cpu, peak) in usage.items():
        lines.append(f"| {name}: CPU during connect + run | {cpu:.0f} s ({cpu / (connect_s + run_real) * 100:.0f} % of one core) |")
        lines.append(f"| {name}: peak RSS | {peak / mb:.0f} MB |")
    lines += [
        f"| simulator: peak RSS per device | {usage['simulator'][1] / n / 1024:.0f} KiB |",
        f"| onnxruntime sessions loaded (shared per model version) | {fleet.runtimes.loads} for {n} devices |",
        f"| one unshared session would cost | {per_session_rss / 1024:.0f} KiB RSS and {per_session_s * 1000:.1f} ms to load |",
        f"| simulator process CPU in total (incl. setup) | {sim_cpu_total.ru_utime + sim_cpu_total.ru_stime:.0f} s |",
        "",
    ]
    text = "\n".join(lines)
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(text)
    print(text)
    return 0 if lost == 0 and stored >= sent else 1


if __name__ == "__main__":
    sys.exit(main())
