"""Ingest benchmark (not a test): telemetry windows/s stored, publish-to-stored lag, loss, server RSS.

Runs, on this machine and in one go:
1. baseline: the managed Mosquitto alone, the same messages to a paho subscriber that does nothing;
2. the fleet server (`edgefleet server run`, managed broker) with one ingest process;
3. the same with a second `edgefleet server ingest` process sharing the subscription.

Publisher processes hold many MQTT connections (one per device) and publish realistic windows
(30 features, QoS 1) through a step test of offered rates. Reported per step: the rate really
achieved by the generator, windows stored per second, publish-to-stored lag (p50, p99), loss,
and CPU time per window of server, broker and generator. Prints a markdown table and writes
bench/results/ingest.md.

    .venv/bin/python bench/ingest.py [--rates 3000,4000,5000,6000] [--seconds 15] [--devices 200] [--procs 2]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import signal
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


SEQ_MARK, SENT_MARK = -7_777_777, -8_888_888.5


def templates(device: str, rng: np.random.Generator, n: int) -> list[bytes]:
    """Encoded windows of one device with `%d` for seq and `%.6f` for sent_at: one `%` per publish."""
    out = []
    for _ in range(n):
        w = window(device, SEQ_MARK, rng)
        w.sent_at = SENT_MARK
        raw = encode(w).replace(b"%", b"%%")
        out.append(raw.replace(str(SENT_MARK).encode(), b"%.6f").replace(str(SEQ_MARK).encode(), b"%d"))
    return out


def publisher(port: int, fleet: str, creds: list[tuple[str, str]], schedule: list[tuple[float, float]],
              username: str | None, result: mp.Queue, start_at: float, seq_base: int) -> None:
    """One process: one connection per device, publishing round-robin through `schedule` [(rate, seconds)].

    The load must not eat the CPU the server is measured on: payloads are encoded beforehand, and
    no client has a network thread of its own. `publish` writes to the socket directly, and one
    reader thread handles every connection's PUBACKs.
    """
    clients = []
    for device, password in creds:
        c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=device if username is None else f"b-{device}",
                        protocol=mqtt.MQTTv5)
        c.username_pw_set(username or device, password)
        c.max_inflight_messages_set(0)  # unlimited: the broker paces nothing, the generator does
        c.connect("127.0.0.1", port, keepalive=600)
        clients.append((device, c))
    by_sock = {c.socket(): c for _, c in clients}
    stop = threading.Event()

    def read_acks() -> None:
        import select

        while not stop.is_set():
            socks = [s for s in by_sock if s.fileno() >= 0]
            # A publish made while this thread was in a callback stays queued: write it here.
            pending = [s for s in socks if by_sock[s].want_write()]
            readable, writable, _ = select.select(socks, pending, [], 0.05)
            for s in readable:
                by_sock[s].loop_read()
            for s in writable:
                by_sock[s].loop_write()

    reader = threading.Thread(target=read_acks, daemon=True)
    reader.start()
    deadline = time.time() + 30
    while not all(c.is_connected() for _, c in clients) and time.time() < deadline:
        time.sleep(0.01)
    rng = np.random.default_rng(os.getpid())
    pool = {device: templates(device, rng, 4) for device, _ in clients}
    jobs = [(c, topic(fleet, device, "telemetry"), pool[device]) for device, c in clients]
    seqs = [seq_base] * len(jobs)
    infos = []
    steps = []
    while time.time() < start_at:
        time.sleep(0.01)
    k = 0
    for rate, seconds in schedule:
        n = int(rate * seconds)
        t0 = time.time()
        c0 = time.process_time()
        for i in range(n):
            delay = t0 + i / rate - time.time()
            if delay > 0:
                time.sleep(delay)
            j = k % len(jobs)
            c, name, tmpls = jobs[j]
            seqs[j] += 1
            infos.append(c.publish(name, tmpls[k & 3] % (seqs[j], time.time()), qos=1))
            k += 1
        steps.append({"published": n, "t0": t0, "sent_s": time.time() - t0, "cpu_s": time.process_time() - c0})
    deadline = time.time() + 60
    while not all(i.is_published() for i in infos) and time.time() < deadline:
        time.sleep(0.05)
    acked = sum(1 for i in infos if i.is_published())
    stop.set()
    reader.join(1)
    for _, c in clients:
        c.disconnect()
    result.put({"steps": steps, "acked": acked})


def offer_load(port: int, fleet: str, creds: dict[str, str], procs: int, schedule: list[tuple[float, float]],
               username: str | None = None, password: str | None = None, seq_base: int = 0) -> dict:
    """Run the publishers through `schedule`; per step: published, achieved rate, generator CPU."""
    items = sorted(creds.items())
    if username:
        items = [(d, password or "") for d, _ in items]
    result: mp.Queue = mp.Queue()
    start_at = time.time() + 3.0 + len(items) * 0.01
    per_proc = [(rate / procs, seconds) for rate, seconds in schedule]
    ps = [
        mp.Process(target=publisher, args=(port, fleet, items[i::procs], per_proc, username, result, start_at, seq_base))
        for i in range(procs)
    ]
    for p in ps:
        p.start()
    outs = [result.get(timeout=sum(s for _, s in schedule) + 180) for _ in ps]
    for p in ps:
        p.join(10)
    steps = []
    for i, (rate, _) in enumerate(schedule):
        mine = [o["steps"][i] for o in outs]
        published = sum(m["published"] for m in mine)
        start = min(m["t0"] for m in mine)
        end = max(m["t0"] + m["sent_s"] for m in mine)
        steps.append({"offered": rate, "published": published, "start": start, "end": end,
                      "achieved": published / (end - start), "gen_cpu_us": 1e6 * sum(m["cpu_s"] for m in mine) / published})
    return {"steps": steps, "published": sum(s["published"] for s in steps), "acked": sum(o["acked"] for o in outs)}


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


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (robust to other load on the machine)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def broker_pid(data_dir: Path) -> int:
    return int((data_dir / "broker" / "mosquitto.pid").read_text().strip())


def step_rows(load: dict, stored_per_step: list[list[tuple[float, float]]]) -> list[dict]:
    """Per step: stored count, stored rate and lag percentiles from (sent_at, stored_at) pairs."""
    rows = []
    for step, pairs in zip(load["steps"], stored_per_step, strict=True):
        lags = sorted(b - a for a, b in pairs)
        last = max((b for _, b in pairs), default=float("nan"))
        rows.append({
            **step,
            "stored": len(pairs),
            "rate": len(pairs) / (last - step["start"]) if pairs else float("nan"),
            "p50": lags[len(lags) // 2] if lags else float("nan"),
            "p99": lags[int(0.99 * (len(lags) - 1))] if lags else float("nan"),
        })
    return rows


def baseline(data_dir: Path, creds: dict[str, str], args) -> dict:
    """Mosquitto alone: the same load to a subscriber that only counts."""
    from fleet_server.broker import ManagedBroker
    from fleet_server.mqtt_link import make_client
    from fleet_server.storage.sqlite import SqliteStorage

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
        bpid = broker_pid(data_dir)
        before = (time.process_time(), cpu_s(bpid))
        load = offer_load(args.broker_port, config.fleet, creds, args.procs, [(max(args.rates), args.seconds)])
        deadline = time.time() + 30
        while len(received) < load["acked"] and time.time() < deadline:
            time.sleep(0.05)
        n = len(received)
        step = load["steps"][0]
        return {
            **load, "stored": n, "setup": "Mosquitto alone (paho subscriber that does nothing)",
            "rows": [{**step, "stored": n, "rate": n / (received[-1] - step["start"]) if received else float("nan"),
                      "p50": float("nan"), "p99": float("nan"),
                      "server_cpu_us": 1e6 * (time.process_time() - before[0]) / max(n, 1),
                      "broker_cpu_us": 1e6 * (cpu_s(bpid) - before[1]) / max(n, 1)}],
            "rss": float("nan"),
        }
    finally:
        sub.loop_stop()
        sub.disconnect()
        broker.stop()
        storage.close()


def server_run(data_dir: Path, creds: dict[str, str], args, ingest_procs: int) -> dict:
    """The fleet server under a step test: each offered rate in turn, drained before the next."""
    from fleet_server.storage.sqlite import SqliteStorage

    config = load_config(data_dir, broker_port=args.broker_port)
    storage = SqliteStorage(config.db_path)
    for table in ("windows", "seqs", "seq_stats", "buckets", "ingest_workers"):
        storage.db.execute(f"DELETE FROM {table}")
    cli = [sys.executable, "-c", "from edge_agent.entry import main; main()", "server"]
    procs = [subprocess.Popen(cli + ["run", "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{args.http_port}",
                                     "--broker-port", str(args.broker_port)], stderr=subprocess.DEVNULL)]
    try:
        deadline = time.time() + 30
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
        rows = []
        published = acked = 0
        bpid = broker_pid(data_dir)
        for i, rate in enumerate(args.rates):
            # One step at a time, so CPU per window is this step's alone and each starts drained;
            # seqs continue across steps (a restarted seq would be dropped as a duplicate).
            before = (sum(cpu_s(p.pid) for p in procs), cpu_s(bpid))
            load = offer_load(args.broker_port, config.fleet, creds, args.procs, [(rate, args.seconds)],
                              seq_base=i * 10_000_000)
            step = load["steps"][0]
            deadline = time.time() + 120
            while time.time() < deadline and storage.db.execute(
                "SELECT count(*) FROM windows WHERE sent_at >= ?", (step["start"] - 1,)
            ).fetchone()[0] < load["acked"]:
                time.sleep(0.1)
            pairs = storage.db.execute(
                "SELECT sent_at, stored_at FROM windows WHERE sent_at >= ?", (step["start"] - 1,)
            ).fetchall()
            row = step_rows(load, [pairs])[0]
            row["server_cpu_us"] = 1e6 * (sum(cpu_s(p.pid) for p in procs) - before[0]) / max(len(pairs), 1)
            row["broker_cpu_us"] = 1e6 * (cpu_s(bpid) - before[1]) / max(len(pairs), 1)
            row["loss"] = load["acked"] - len(pairs)
            rows.append(row)
            published += load["published"]
            acked += load["acked"]
            time.sleep(1.0)
        stop.set()
        stored = storage.db.execute("SELECT count(*) FROM windows").fetchone()[0]
        return {"published": published, "acked": acked, "stored": stored, "rows": rows, "rss": peak[0],
                "setup": f"fleet server, {ingest_procs} ingest process{'es' if ingest_procs > 1 else ''}"}
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
    parser.add_argument("--rates", type=lambda v: [float(x) for x in v.split(",")], default=[3000.0, 4000.0, 5000.0, 6000.0],
                        help="offered windows/s of each step, all publishers (comma-separated)")
    parser.add_argument("--seconds", type=float, default=15.0, help="how long each step publishes")
    parser.add_argument("--devices", type=int, default=200, help="devices = MQTT connections")
    parser.add_argument("--procs", type=int, default=2, help="publisher processes")
    parser.add_argument("--max-p99", type=float, default=2.0, help="lag bound of a sustained rate, seconds")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ingest.md")
    args = parser.parse_args()
    args.broker_port, args.http_port = free_port(), free_port()
    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-"))
    runs = []
    try:
        print(f"provisioning {args.devices} devices...", file=sys.stderr)
        creds = prepare(work / "server", args.devices, args.broker_port)
        print("baseline: Mosquitto alone...", file=sys.stderr)
        runs.append(baseline(work / "server", creds, args))
        for n in (1, 2):
            print(f"fleet server, {n} ingest process(es)...", file=sys.stderr)
            runs.append(server_run(work / "server", creds, args, n))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def f(x: float, digits: int = 0) -> str:
        return "n/a" if x != x else f"{x:,.{digits}f}"

    lines = [
        f"Step test: each offered rate for {f(args.seconds)} s from {args.procs} publisher processes over "
        f"{args.devices} MQTT connections; {FEATURES} features x {BINS} bins per window, QoS 1; "
        f"{os.cpu_count()} CPU cores shared by load generator, broker and server; "
        f"load average {os.getloadavg()[0]:.1f} at the end.",
        "",
        "| setup | offered/s | achieved/s | stored | stored/s | p50 lag s | p99 lag s | loss | server CPU µs/window "
        "| broker CPU µs/window | generator CPU µs/window |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    sustained = []
    for run in runs:
        best = None
        for r in run["rows"]:
            lines.append(
                f"| {run['setup']} | {f(r['offered'])} | {f(r['achieved'])} | {r['stored']:,} | {f(r['rate'])} | "
                f"{f(r['p50'], 3)} | {f(r['p99'], 3)} | {r.get('loss', 0)} | {f(r['server_cpu_us'])} | "
                f"{f(r['broker_cpu_us'])} | {f(r['gen_cpu_us'])} |"
            )
            if r["p99"] == r["p99"] and r["p99"] <= args.max_p99 and r.get("loss", 0) == 0:
                best = max(best or 0.0, r["rate"])
        if run["setup"].startswith("fleet"):
            held = f"{f(best)} windows/s" if best else "no step"
            sustained.append(f"- {run['setup']}: {held} with p99 lag <= {args.max_p99:g} s; "
                             f"peak RSS {f(run['rss'])} MB; loss {run['acked'] - run['stored']}.")
    table = "\n".join(lines + ["", "Highest stored rate of a step with p99 lag within the bound and no loss:", ""]
                      + sustained)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        "# Ingest benchmark\n\nGenerated by `bench/ingest.py` (`make bench`). Achieved = the rate the generator "
        "really published (it shares the CPU); stored/s = windows stored / (last store time - first publish) "
        "of the step; lag = stored_at - sent_at per window; loss = acknowledged by the broker but not stored "
        "(must be 0). CPU per window is process CPU time / windows of the step, robust to other load on the "
        "machine; the server's includes both ingest processes in the two-process rows.\n\n"
        + table + "\n"
    )


if __name__ == "__main__":
    main()
