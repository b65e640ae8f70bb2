"""Ingest benchmark (not a test): telemetry windows/s stored, publish-to-stored lag, loss, server RSS.

Runs, on this machine and in one go:
1. baseline: the managed Mosquitto alone, the same messages to a paho subscriber that does nothing;
2. the fleet server (`edgefleet server run`, managed broker) with one ingest process;
3. the same with a second `edgefleet server ingest` process sharing the subscription.

Several publisher processes hold many MQTT connections (one per device) and publish realistic
windows (30 features, QoS 1) at an offered rate. Prints a markdown table and writes
bench/results/ingest.md.

    .venv/bin/python bench/ingest.py [--rate 4000] [--seconds 15] [--devices 200] [--procs 4]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_agent.protocol import (  # noqa: E402
    LATENCY_EDGES_MS,
    FeatureCounts,
    Histogram,
    TelemetryWindow,
    encode,
    topic,
)
from fleet_server.config import load_config  # noqa: E402

FEATURES = 30
BINS = 10


# ------------------------------------------------------------------ setup


def make_bundle(private_key) -> bytes:
    """A signed 30-feature bundle whose profile the windows are counted against."""
    from model_tools.binning import count_numeric, quantile_edges
    from model_tools.bundle import write_bundle
    from model_tools.manifest import (
        BinnedDistribution,
        FeatureProfile,
        FeatureSpec,
        Manifest,
        OnnxInput,
        OutputSpec,
        ReferenceProfile,
        RuntimeBudget,
    )

    ref = np.random.default_rng(0).normal(size=(5000, FEATURES))
    features, inputs = [], []
    for i in range(FEATURES):
        col = ref[:, i]
        features.append(
            FeatureProfile(name=f"sensor {i}", kind="numeric", distribution=count_numeric(col, quantile_edges(col, BINS)),
                           min=float(col.min()), max=float(col.max()), mean=0.0, std=1.0)
        )
        inputs.append(FeatureSpec(name=f"sensor {i}", kind="numeric", dtype="float32"))
    manifest = Manifest(
        name="bench", version="1", created_at="2026-01-01T00:00:00Z", task="classification", inputs=inputs,
        onnx_inputs=[OnnxInput(name="X", dtype="float32", columns=list(range(FEATURES)))],
        outputs=OutputSpec(label="label", classes=["0", "1"]), files={},
        profile=ReferenceProfile(rows=5000, features=features,
                                 prediction=BinnedDistribution(categories=["0", "1"], counts=[2500, 2500, 0])),
        budget=RuntimeBudget(model_bytes=1, latency_ms_p50=0.1, latency_ms_p99=0.2, peak_memory_bytes=1),
    )
    return write_bundle(None, manifest, b"bench", {"input:X": ref[:2].astype(np.float32)}, private_key)


def prepare(data_dir: Path, devices: int, broker_port: int) -> dict[str, str]:
    from cryptography.hazmat.primitives import serialization

    from fleet_server.devices import provision_device
    from fleet_server.registry import trust_key, upload_bundle
    from fleet_server.service import bootstrap
    from model_tools.signing import generate_keypair

    data_dir.mkdir(parents=True, exist_ok=True)
    svc = bootstrap(load_config(data_dir, broker_port=broker_port))
    private, public = generate_keypair()
    trust_key(svc, public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    upload_bundle(svc, make_bundle(private))
    creds = {f"bench-{i:04d}": provision_device(svc, f"bench-{i:04d}").password for i in range(devices)}
    svc.storage.close()
    return creds


# ------------------------------------------------------------------ load generator


def window(device: str, seq: int, rng: np.random.Generator) -> TelemetryWindow:
    counts = rng.multinomial(60, [1 / (BINS)] * BINS, size=FEATURES)
    now = time.time()
    latency = [0] * (len(LATENCY_EDGES_MS) + 1)
    latency[5] = 60
    return TelemetryWindow(
        device=device, seq=seq, model="bench", model_version="1", window_start=now - 60, window_end=now,
        sent_at=now, predictions=60, requests=60, errors={}, latency=Histogram(counts=latency, sum_ms=30.0),
        features=[FeatureCounts(bins=[int(c) for c in row]) for row in counts],
        prediction=FeatureCounts(bins=[30, 30, 0]),
    )


def publisher(port: int, fleet: str, creds: list[tuple[str, str]], rate: float, seconds: float,
              username: str | None, result: mp.Queue, start_at: float) -> None:
    """One process: one connection per device, publishing round-robin at `rate` windows/s."""
    clients = []
    for device, password in creds:
        c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"b-{device}",
                        protocol=mqtt.MQTTv5)
        c.username_pw_set(username or device, password)
        c.max_inflight_messages_set(100)
        c.connect("127.0.0.1", port)
        c.loop_start()
        clients.append((device, c))
    rng = np.random.default_rng(os.getpid())
    # A pool of pre-drawn count matrices keeps the generator's CPU off the server's back.
    pool = [window("x", 0, rng) for _ in range(64)]
    seqs = {device: 0 for device, _ in clients}
    infos = []
    n = int(rate * seconds)
    while time.time() < start_at:
        time.sleep(0.01)
    t0 = time.time()
    for k in range(n):
        target = t0 + k / rate
        delay = target - time.time()
        if delay > 0:
            time.sleep(delay)
        device, c = clients[k % len(clients)]
        seqs[device] += 1
        w = pool[k % len(pool)]
        w.device, w.seq, w.sent_at = device, seqs[device], time.time()
        infos.append(c.publish(topic(fleet, device, "telemetry"), encode(w), qos=1))
    sent_s = time.time() - t0
    deadline = time.time() + 60
    for info in infos:
        with contextlib.suppress(RuntimeError, ValueError):
            info.wait_for_publish(max(0.1, deadline - time.time()))
    acked = sum(1 for i in infos if i.is_published())
    for _, c in clients:
        c.disconnect()
        c.loop_stop()
    result.put({"published": n, "acked": acked, "sent_s": sent_s})


def offer_load(port: int, fleet: str, creds: dict[str, str], procs: int, rate: float, seconds: float,
               username: str | None = None, password: str | None = None) -> dict[str, float]:
    items = sorted(creds.items())
    if username:
        items = [(d, password or "") for d, _ in items]
    result: mp.Queue = mp.Queue()
    start_at = time.time() + 2.0 + len(items) * 0.004
    ps = [
        mp.Process(target=publisher, args=(port, fleet, items[i::procs], rate / procs, seconds, username, result, start_at))
        for i in range(procs)
    ]
    for p in ps:
        p.start()
    outs = [result.get(timeout=seconds + 120) for _ in ps]
    for p in ps:
        p.join(10)
    return {
        "published": sum(o["published"] for o in outs),
        "acked": sum(o["acked"] for o in outs),
        "sent_s": max(o["sent_s"] for o in outs),
        "start": start_at,
    }


# ------------------------------------------------------------------ scenarios


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def baseline(data_dir: Path, creds: dict[str, str], args) -> dict[str, float]:
    """Mosquitto alone: the same load to a subscriber that only counts."""
    from fleet_server.broker import ManagedBroker
    from fleet_server.mqtt_link import make_client
    from fleet_server.sqlite_storage import SqliteStorage

    config = load_config(data_dir, broker_port=args.broker_port)
    storage = SqliteStorage(config.db_path)
    broker = ManagedBroker(config, storage)
    broker.start()
    received: list[float] = []
    sub, kwargs = make_client(config, "bench-baseline")
    sub.on_message = lambda c, u, m: received.append(time.time())
    sub.on_connect = lambda c, u, f, rc, p: c.subscribe(f"ef/{config.fleet}/d/+/telemetry", qos=1)
    sub.connect(**kwargs)
    sub.loop_start()
    time.sleep(0.5)
    try:
        load = offer_load(args.broker_port, config.fleet, creds, args.procs, args.rate, args.seconds)
        deadline = time.time() + 30
        while len(received) < load["acked"] and time.time() < deadline:
            time.sleep(0.05)
        span = (received[-1] - load["start"]) if received else float("nan")
        return {**load, "stored": len(received), "rate": len(received) / span, "p99": float("nan"),
                "rss": float("nan")}
    finally:
        sub.loop_stop()
        sub.disconnect()
        broker.stop()
        storage.close()


def server_run(data_dir: Path, creds: dict[str, str], args, ingest_procs: int) -> dict[str, float]:
    from fleet_server.sqlite_storage import SqliteStorage

    config = load_config(data_dir, broker_port=args.broker_port)
    storage = SqliteStorage(config.db_path)
    storage.db.execute("DELETE FROM windows")
    storage.db.execute("DELETE FROM seqs")
    storage.db.execute("DELETE FROM seq_stats")
    storage.db.execute("DELETE FROM buckets")
    storage.db.execute("DELETE FROM ingest_workers")
    cli = [sys.executable, "-c", "from edge_agent.entry import main; main()", "server"]
    procs = [subprocess.Popen(cli + ["run", "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{args.http_port}",
                                     "--broker-port", str(args.broker_port)], stderr=subprocess.DEVNULL)]
    try:
        deadline = time.time() + 20
        while len(storage.worker_stats()) < 1 and time.time() < deadline:
            time.sleep(0.1)
        for i in range(1, ingest_procs):
            procs.append(subprocess.Popen(cli + ["ingest", "--data-dir", str(data_dir), "--worker-id", str(i)],
                                          stderr=subprocess.DEVNULL))
        while len(storage.worker_stats()) < ingest_procs and time.time() < deadline:
            time.sleep(0.1)
        peak = [0.0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.2):
                peak[0] = max(peak[0], rss_mb([p.pid for p in procs]))

        threading.Thread(target=sample, daemon=True).start()
        load = offer_load(args.broker_port, config.fleet, creds, args.procs, args.rate, args.seconds)

        def count() -> int:
            return storage.db.execute("SELECT count(*) FROM windows").fetchone()[0]

        deadline = time.time() + 120
        while count() < load["acked"] and time.time() < deadline:
            time.sleep(0.1)
        stop.set()
        stored = count()
        last = storage.db.execute("SELECT max(stored_at) FROM windows").fetchone()[0]
        lags = sorted(storage.window_lags(0.0))
        return {
            **load,
            "stored": stored,
            "rate": stored / (last - load["start"]),
            "p99": lags[int(0.99 * (len(lags) - 1))] if lags else float("nan"),
            "p50": statistics.median(lags) if lags else float("nan"),
            "rss": peak[0],
        }
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        storage.close()


def main() -> None:
    from tests.brokers import free_port

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=4000.0, help="offered windows/s, all publishers")
    parser.add_argument("--seconds", type=float, default=15.0, help="how long to publish")
    parser.add_argument("--devices", type=int, default=200, help="devices = MQTT connections")
    parser.add_argument("--procs", type=int, default=4, help="publisher processes")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ingest.md")
    args = parser.parse_args()
    args.broker_port, args.http_port = free_port(), free_port()
    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-"))
    try:
        print(f"provisioning {args.devices} devices...", file=sys.stderr)
        creds = prepare(work / "server", args.devices, args.broker_port)
        rows = []
        print("baseline: Mosquitto alone...", file=sys.stderr)
        rows.append(("Mosquitto alone (paho subscriber that does nothing)", baseline(work / "server", creds, args)))
        for n in (1, 2):
            print(f"fleet server, {n} ingest process(es)...", file=sys.stderr)
            rows.append((f"fleet server, {n} ingest process{'es' if n > 1 else ''}",
                         server_run(work / "server", creds, args, n)))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def f(x: float, digits: int = 0) -> str:
        return "n/a" if x != x else f"{x:,.{digits}f}"

    lines = [
        f"Offered load: {f(args.rate)} windows/s for {f(args.seconds)} s from {args.procs} processes over "
        f"{args.devices} MQTT connections; {FEATURES} features x {BINS} bins per window, QoS 1; "
        f"{os.cpu_count()} CPU cores shared by load generator, broker and server.",
        "",
        "| setup | published | acked | stored | stored windows/s | p50 lag s | p99 lag s | loss | server RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['published']:,} | {r['acked']:,} | {r['stored']:,} | {f(r['rate'])} | "
            f"{f(r.get('p50', float('nan')), 3)} | {f(r['p99'], 3)} | {r['acked'] - r['stored']} | {f(r['rss'])} |"
        )
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        "# Ingest benchmark\n\nGenerated by `bench/ingest.py` (`make bench`). Loss = acknowledged by the broker "
        "but not stored (must be 0). Stored windows/s = stored / (last store time - first publish).\n\n"
        + table + "\n"
    )


if __name__ == "__main__":
    main()
