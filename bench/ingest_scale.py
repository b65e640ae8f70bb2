"""Ingest across processes (not a test): SQLite with 1 and 2 ingest processes against PostgreSQL with
1, 2 and 4, on the same machine in the same run.

Each configuration gets a fresh copy of one provisioned fleet (the SQLite file copied, the
PostgreSQL database created from a template) and a broker of its own: `edgefleet server run`
(managed Mosquitto, ingest process 1) plus N - 1 `edgefleet server ingest` processes on the same
store, sharing the `$share/ingest` subscription. Publisher processes (bench/ingest.py's generator:
one MQTT connection per device, realistic 30-feature windows, QoS 1) go through a step test of
offered rates back to back; per step: the rate stored while it ran, the publish-to-stored lag
(p50, p99) of the windows sent in it, and CPU per stored window of the server processes, of
PostgreSQL (postmaster, its children and the children it reaped) and of the broker, from
/proc/<pid>/stat. After the run every broker-acknowledged window must be in the database once:
loss = acknowledged - stored, duplicates = stored rows beyond distinct (device, seq), and the
bucket sums and the message accounting must count each window once.

A step is held when its p99 lag is within --max-p99 and the configuration lost and duplicated
nothing; a configuration's rate is its highest held step's stored rate. Prints a markdown table
and writes bench/results/ingest_scale.md.

    .venv/bin/python bench/ingest_scale.py [--rates 1000,2500,4000,5500,7000] [--seconds 5] [--devices 120]
    .venv/bin/python bench/ingest_scale.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from ingest import cpu_s, make_bundle, offer_load  # noqa: E402  (bench/ingest.py: the generator)

from fleet_server.config import load_config  # noqa: E402

RESULTS = ROOT / "bench" / "results"
CLI = [sys.executable, "-c", "from edge_agent.entry import main; main()", "server"]
GOAL_SPEEDUP = 1.5
GOAL_SERVER_US = 100.0

# The first `server ingest` process runs through this wrapper: it records each thread's CPU
# seconds (paho's network thread parses MQTT, the writer decodes, checks and stores), and with
# `--profile` it runs cProfile on the thread CPU clock in every thread, merged into a pstats file.
WRAPPED = """
import cProfile, json, pstats, sys, threading, time
out, pstats_out = sys.argv[1], sys.argv[2]
sys.argv = ["edgefleet"] + sys.argv[3:]
profiles, cpu = [], {}
_run = threading.Thread.run
def run(self):
    p = cProfile.Profile(time.thread_time) if pstats_out else None
    if p:
        profiles.append(p)
        p.enable()
    try:
        _run(self)
    finally:
        if p:
            p.disable()
        cpu[self.name] = time.thread_time()
threading.Thread.run = run
from edge_agent.entry import main
try:
    main()
finally:
    cpu["main"] = time.thread_time()
    with open(out, "w") as f:
        json.dump(cpu, f)
    if profiles:
        stats = pstats.Stats(profiles[0])
        for p in profiles[1:]:
            stats.add(p)
        stats.dump_stats(pstats_out)
"""


# ------------------------------------------------------------------ the fleet and its stores


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path.as_posix().lstrip('/')}"


def provision(data_dir: Path, storage_url: str, devices: int) -> dict[str, str]:
    """A fleet of `devices` devices and one trusted 30-feature model; returns their passwords."""
    from cryptography.hazmat.primitives import serialization

    from fleet_server.devices import provision_device
    from fleet_server.registry import trust_key, upload_bundle
    from fleet_server.service import bootstrap
    from model_tools.signing import generate_keypair

    data_dir.mkdir(parents=True, exist_ok=True)
    svc = bootstrap(load_config(data_dir, storage_url=storage_url))
    try:
        private, public = generate_keypair()
        trust_key(svc, public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        upload_bundle(svc, make_bundle(private))
        return {f"bench-{i:04d}": provision_device(svc, f"bench-{i:04d}").password for i in range(devices)}
    finally:
        svc.storage.close()


class Store:
    """Read-only checks on one configuration's database, whichever backend."""

    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith("sqlite:"):
            self.conn = sqlite3.connect("/" + url.split("sqlite:///", 1)[1], timeout=30)
            self.mark = "?"
        else:
            import psycopg

            self.conn = psycopg.connect(url, autocommit=True)
            self.mark = "%s"

    def rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        return list(self.conn.execute(sql.replace("?", self.mark), params).fetchall())

    def one(self, sql: str, params: tuple = ()) -> float:
        value = self.rows(sql, params)[0][0]
        return 0 if value is None else value

    def close(self) -> None:
        self.conn.close()


# ------------------------------------------------------------------ CPU of process trees


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def postgres_cpu_s(postmaster: int) -> float:
    """CPU seconds of a PostgreSQL cluster: the postmaster, the children it reaped (cutime +
    cstime) and its live children (backends, checkpointer, WAL writer...)."""
    tick = os.sysconf("SC_CLK_TCK")
    own = _stat(postmaster)
    if own is None:
        return float("nan")
    total = sum(int(own[i]) for i in (11, 12, 13, 14))
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None and int(fields[1]) == postmaster:
                total += int(fields[11]) + int(fields[12])
    return total / tick


@dataclass
class CpuSampler:
    """CPU seconds of the server processes, PostgreSQL and the broker, sampled every 0.2 s."""

    server_pids: list[int]
    broker_pid: int
    postmaster: int | None
    samples: list[tuple[float, float, float, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        now = time.time()
        pg = postgres_cpu_s(self.postmaster) if self.postmaster else 0.0
        self.samples.append((now, sum(cpu_s(p) for p in self.server_pids), pg, cpu_s(self.broker_pid)))

    def start(self) -> CpuSampler:
        self.sample()

        def loop() -> None:
            while not self._stop.wait(0.2):
                self.sample()

        threading.Thread(target=loop, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        time.sleep(0.25)
        self.sample()

    def at(self, t: float) -> tuple[float, float, float]:
        """(server, postgres, broker) CPU seconds at time t, linearly interpolated."""
        s = self.samples
        if t <= s[0][0]:
            return s[0][1:]
        for a, b in zip(s, s[1:], strict=False):
            if a[0] <= t <= b[0]:
                f = (t - a[0]) / ((b[0] - a[0]) or 1.0)
                return tuple(x + f * (y - x) for x, y in zip(a[1:], b[1:], strict=True))  # type: ignore[return-value]
        return s[-1][1:]


# ------------------------------------------------------------------ one configuration


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def connected_workers(store: Store) -> int:
    rows = store.rows("SELECT stats FROM ingest_workers")
    return sum(1 for (stats,) in rows if (json.loads(stats) if isinstance(stats, str) else stats).get("connected"))


def run_config(name: str, url: str, data_dir: Path, creds: dict[str, str], procs_n: int, args,
               postmaster: int | None) -> dict:
    """One configuration: start the processes, run the step test, drain, check the database."""
    from tests.brokers import free_port

    broker_port, http_port = free_port(), free_port()
    thread_file = data_dir / "thread-cpu.json"
    log = open(data_dir / "bench-processes.log", "w")  # noqa: SIM115  (closed in finally)
    procs = [subprocess.Popen(CLI + ["run", "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{http_port}",
                                     "--broker-port", str(broker_port), "--storage-url", url],
                              cwd=ROOT, stdout=log, stderr=log)]
    store = Store(url)
    try:
        broker_file = data_dir / "broker" / "mosquitto.pid"
        wait_for(lambda: connected_workers(store) >= 1, 60, f"{name}: the server's ingest")
        for i in range(1, procs_n):
            cli = CLI if i > 1 else [sys.executable, "-c", WRAPPED, str(thread_file), str(args.profile or ""), "server"]
            procs.append(subprocess.Popen(
                cli + ["ingest", "--data-dir", str(data_dir), "--worker-id", f"bench-{i}", "--storage-url", url,
                       "--mqtt-url", f"mqtt://127.0.0.1:{broker_port}"], cwd=ROOT, stdout=log, stderr=log))
        wait_for(lambda: connected_workers(store) >= procs_n, 60, f"{name}: {procs_n} ingest processes")
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{name}: a server process exited ({p.returncode}); see its log")
        sampler = CpuSampler([p.pid for p in procs], int(broker_file.read_text().strip()), postmaster).start()
        schedule = [(rate, args.seconds) for rate in args.rates]
        load = offer_load(broker_port, "default", creds, args.publishers, schedule)
        wait_for(lambda: store.one("SELECT count(*) FROM windows") >= load["acked"], 120, f"{name}: drain")
        drained = time.time()
        sampler.stop()
        pairs = store.rows("SELECT sent_at, stored_at FROM windows")
        stored = len(pairs)
        distinct = store.one("SELECT count(*) FROM (SELECT DISTINCT device, seq FROM windows) AS d")
        bucket_windows = store.one("SELECT sum(windows) FROM buckets")
        accounted = store.one("SELECT sum(received) FROM seq_stats")
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        # A server stopped cleanly stops its broker; one that had to be killed leaves it running.
        with contextlib.suppress(OSError, ValueError):
            pid = int((data_dir / "broker" / "mosquitto.pid").read_text().strip())
            if str(data_dir) in Path(f"/proc/{pid}/cmdline").read_text():  # that broker, not a reused pid
                os.kill(pid, signal.SIGTERM)
        # Stopped processes have flushed their counters: how many windows the wrapped one received.
        workers = {w: (json.loads(st) if isinstance(st, str) else st)
                   for w, st in store.rows("SELECT worker_id, stats FROM ingest_workers")}
        store.close()
        log.close()

    rows = []
    for step in load["steps"]:
        start, end = step["start"], step["end"]
        lags = sorted(b - a for a, b in pairs if start <= a < end)
        stored_in = sum(1 for _, b in pairs if start <= b < end)
        c0, c1 = sampler.at(start), sampler.at(end)
        per = [1e6 * (y - x) / max(stored_in, 1) for x, y in zip(c0, c1, strict=True)]
        rows.append({
            "offered": step["offered"], "achieved": step["achieved"], "sent": len(lags),
            "rate": stored_in / (end - start),
            "p50": lags[len(lags) // 2] if lags else float("nan"),
            "p99": lags[int(0.99 * (len(lags) - 1))] if lags else float("nan"),
            "server_us": per[0], "pg_us": per[1], "broker_us": per[2], "gen_us": step["gen_cpu_us"],
        })
    threads = json.loads(thread_file.read_text()) if thread_file.exists() else {}
    t0 = load["steps"][0]["start"]
    c0, c1 = sampler.at(t0), sampler.at(drained)
    overall = [1e6 * (y - x) / max(stored, 1) for x, y in zip(c0, c1, strict=True)]
    return {
        "name": name, "procs": procs_n, "rows": rows, "acked": load["acked"], "published": load["published"],
        "stored": stored, "loss": load["acked"] - stored, "duplicates": stored - int(distinct),
        "bucket_windows": int(bucket_windows), "accounted": int(accounted),
        "server_us": overall[0], "pg_us": overall[1], "broker_us": overall[2], "threads": threads,
        "wrapped_received": workers.get("bench-1", {}).get("received", 0),
    }


# ------------------------------------------------------------------ report


def f(x: float, digits: int = 0) -> str:
    return "n/a" if x != x else f"{x:,.{digits}f}"


def held(run: dict, max_p99: float) -> dict | None:
    """The highest-rate step with p99 lag within the bound, when nothing was lost or counted twice."""
    clean = (run["loss"] == 0 and run["duplicates"] == 0 and run["bucket_windows"] == run["stored"]
             and run["accounted"] == run["stored"])
    ok = [r for r in run["rows"] if clean and r["p99"] == r["p99"] and r["p99"] <= max_p99]
    return max(ok, key=lambda r: r["rate"]) if ok else None


def held_text(run: dict, max_p99: float) -> str:
    """The held rate; `>=` when even the highest offered step held (the limit lies beyond it)."""
    h = held(run, max_p99)
    if h is None:
        return "no step"
    return (">= " if h is run["rows"][-1] else "") + f(h["rate"])


def everything(run: dict) -> float:
    """CPU µs per window of every process on the path: server, database, broker and generator."""
    published = sum(r["sent"] for r in run["rows"]) or 1
    generator = sum(r["gen_us"] * r["sent"] for r in run["rows"]) / published
    return run["server_us"] + run["pg_us"] + run["broker_us"] + generator


def report(runs: list[dict], args, load_before: tuple[float, float, float], elapsed: float) -> str:
    lines = [
        f"Step test, back to back: offered {', '.join(f(r) for r in args.rates)} windows/s, {f(args.seconds)} s each, "
        f"from {args.publishers} publisher processes over {args.devices} MQTT connections (QoS 1, 30 features x 10 "
        f"bins per window). {os.cpu_count()} CPU cores shared by the generator, Mosquitto, the server processes and "
        f"PostgreSQL (15, fsync off, its own cluster). Load average before the run "
        f"{load_before[0]:.1f} / {load_before[1]:.1f} / {load_before[2]:.1f} (1 / 5 / 15 min), "
        f"{os.getloadavg()[0]:.1f} after; the run took {elapsed:.0f} s.",
        "",
    ]
    if load_before[0] > 0.5:
        lines += [
            f"**Other work was running on this machine during the run** (load average {load_before[0]:.1f} before it "
            f"started, on {os.cpu_count()} cores): the rates and lags are those of the share of the CPU the benchmark "
            "got, lower than on an idle machine; CPU per window (process CPU time) is less affected.",
            "",
        ]
    lines += [
        "| setup | offered/s | achieved/s | stored/s | p50 lag s | p99 lag s | server CPU µs/window "
        "| PostgreSQL CPU µs/window | broker CPU µs/window | generator CPU µs/window |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        for r in run["rows"]:
            lines.append(
                f"| {run['name']} | {f(r['offered'])} | {f(r['achieved'])} | {f(r['rate'])} | {f(r['p50'], 3)} | "
                f"{f(r['p99'], 3)} | {f(r['server_us'])} | {f(r['pg_us'])} | {f(r['broker_us'])} | {f(r['gen_us'])} |"
            )
    lines += [
        "",
        f"Per configuration: the highest stored rate of a step with p99 lag <= {args.max_p99:g} s (\"held\"), and "
        "checks over the whole run: windows acknowledged by the broker, stored, lost, duplicated, counted in the "
        "drift buckets and in the message accounting; CPU per window over the whole run (first publish to drained). "
        "CPU ceiling = cores / CPU per window of all processes on the path (server, database, broker and load "
        "generator): the most this machine could store with every core busy on this pipeline.",
        "",
        "| setup | held windows/s | vs SQLite x1 | acknowledged | stored | lost | duplicates | in buckets "
        "| accounted | server CPU µs/window | PostgreSQL CPU µs/window | server + database µs/window "
        "| all processes µs/window | CPU ceiling windows/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = next((held(r, args.max_p99) for r in runs if r["name"] == "SQLite x1"), None)
    for run in runs:
        h = held(run, args.max_p99)
        ratio = f"{h['rate'] / base['rate']:.2f}x" if h and base else "n/a"
        lines.append(
            f"| {run['name']} | {held_text(run, args.max_p99)} | {ratio} | {run['acked']:,} | {run['stored']:,} | "
            f"{run['loss']} | {run['duplicates']} | {run['bucket_windows']:,} | {run['accounted']:,} | "
            f"{f(run['server_us'])} | {f(run['pg_us'])} | {f(run['server_us'] + run['pg_us'])} | "
            f"{f(everything(run))} | {f(os.cpu_count() * 1e6 / everything(run))} |"
        )
    pg_multi = [(run, held(run, args.max_p99)) for run in runs if run["name"].startswith("PostgreSQL") and run["procs"] >= 2]
    best = max((h["rate"] for _, h in pg_multi if h), default=float("nan"))
    lines += ["", "Goals:", ""]
    if base:
        verdict = "met" if best == best and best >= GOAL_SPEEDUP * base["rate"] else "not met"
        got = f"best {f(best)} windows/s ({best / base['rate']:.2f}x)" if best == best else \
            "no PostgreSQL run with 2+ processes held a step"
        lines.append(f"- PostgreSQL with 2+ processes >= {GOAL_SPEEDUP:g}x SQLite's single-process rate "
                     f"({f(GOAL_SPEEDUP * base['rate'])} windows/s): {got}: **{verdict}**.")
    else:
        lines.append("- PostgreSQL vs SQLite: SQLite x1 held no step, no baseline.")
    pg = [run for run in runs if run["name"].startswith("PostgreSQL")]
    if pg:
        each = ", ".join(f"{run['name']} {f(run['server_us'])}" for run in pg)
        met = all(run["server_us"] <= GOAL_SERVER_US for run in pg)
        lines.append(f"- Server CPU <= {GOAL_SERVER_US:g} µs per window (whole run, all server processes): {each} µs: "
                     f"**{'met' if met else 'not met'}**.")
    lines += ["", "Where one `server ingest` process's CPU goes (the first extra process of each run, CPU seconds "
              "of each thread over its whole life / messages it received):", ""]
    for run in runs:
        threads, n = run["threads"], run["wrapped_received"]
        if not threads or not n:
            continue
        net = sum(v for k, v in threads.items() if k.startswith("paho"))
        writer = threads.get("ingest-writer", 0.0)
        rest = sum(v for k, v in threads.items() if k != "main") - net - writer  # main: start-up imports
        lines.append(f"- {run['name']}: {n:,} messages; MQTT network thread (paho: packet and MQTT 5 property "
                     f"parsing, PUBACKs) {f(1e6 * net / n)} µs/message, writer thread (decode, validate, sum, store) "
                     f"{f(1e6 * writer / n)} µs/message, other threads (database pool) {f(1e6 * rest / n)} µs/message; "
                     f"its threads share one interpreter lock, so one process stores at most about "
                     f"{f(n / ((net + writer + rest) or 1))} windows/s (one core).")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two short steps, SQLite x1 and PostgreSQL x2 only")
    parser.add_argument("--rates", type=lambda v: [float(x) for x in v.split(",")], default=None,
                        help="offered windows/s of each step, all publishers (comma-separated)")
    parser.add_argument("--seconds", type=float, default=None, help="how long each step publishes")
    parser.add_argument("--devices", type=int, default=120, help="devices = MQTT connections")
    parser.add_argument("--publishers", type=int, default=2, help="publisher processes")
    parser.add_argument("--configs", default=None,
                        help="comma-separated subset of sqlite1,sqlite2,pg1,pg2,pg4 (default: all)")
    parser.add_argument("--max-p99", type=float, default=2.0, help="lag bound of a held rate, seconds")
    parser.add_argument("--out", type=Path, default=RESULTS / "ingest_scale.md")
    parser.add_argument("--profile", type=Path, help="cProfile the first `server ingest` process into this file")
    args = parser.parse_args()
    # Provisioning with no broker running: each device's "broker account not created yet" is expected.
    logging.getLogger("fleet_server.broker_accounts").setLevel(logging.ERROR)
    args.rates = args.rates or ([1500.0, 3000.0] if args.quick else [1000.0, 2500.0, 4000.0, 5500.0, 7000.0])
    args.seconds = args.seconds or (4.0 if args.quick else 5.0)
    configs = (args.configs or ("sqlite1,pg2" if args.quick else "sqlite1,sqlite2,pg1,pg2,pg4")).split(",")

    from tests.postgres import PostgresCluster

    load_before = os.getloadavg()
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-"))
    cluster = PostgresCluster().start() if any(c.startswith("pg") for c in configs) else None
    runs = []
    try:
        templates: dict[str, tuple[Path, str, dict[str, str]]] = {}
        if any(c.startswith("sqlite") for c in configs):
            print(f"provisioning {args.devices} devices on SQLite...", file=sys.stderr)
            sq = work / "sqlite-template"
            templates["sqlite"] = (sq, "", provision(sq, sqlite_url(sq / "fleet.db"), args.devices))
        postmaster = None
        if cluster is not None:
            print(f"provisioning {args.devices} devices on PostgreSQL...", file=sys.stderr)
            pg = work / "pg-template"
            url = cluster.create_database("fleet_template")
            templates["pg"] = (pg, url, provision(pg, url, args.devices))
            postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
        for config in configs:
            backend, n = ("sqlite", int(config[6:])) if config.startswith("sqlite") else ("pg", int(config[2:]))
            template, _, creds = templates[backend]
            data_dir = work / config
            shutil.copytree(template, data_dir)
            if backend == "sqlite":
                name, url = f"SQLite x{n}", sqlite_url(data_dir / "fleet.db")
            else:
                name = f"PostgreSQL x{n}"
                cluster.execute(f'CREATE DATABASE "{config}" TEMPLATE "fleet_template"')
                url = cluster.url(config)
            print(f"{name}: {n} ingest process{'es' if n > 1 else ''}...", file=sys.stderr, flush=True)
            run = run_config(name, url, data_dir, creds, n, args, postmaster if backend == "pg" else None)
            runs.append(run)
            print(f"  held {held_text(run, args.max_p99)} windows/s, "
                  f"lost {run['loss']}, duplicates {run['duplicates']}, server {f(run['server_us'])} µs/window, "
                  f"PostgreSQL {f(run['pg_us'])} µs/window", file=sys.stderr, flush=True)
    finally:
        if cluster is not None:
            cluster.destroy()
        shutil.rmtree(work, ignore_errors=True)
    table = report(runs, args, load_before, time.time() - started)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        "# Ingest across processes\n\nGenerated by `bench/ingest_scale.py` (`make bench`). Stored/s = windows "
        "stored while the step ran / its length; lag = stored_at - sent_at of the windows sent in the step; "
        "server CPU = all the `server run` and `server ingest` processes; PostgreSQL CPU = the whole cluster; "
        "per window = CPU time over the step / windows stored in it (process CPU time, robust to other load on "
        "the machine, unlike the rates). SQLite x2 is a second `server ingest` process on the same SQLite file "
        "(supported: the writers take turns on its lock).\n\n" + table + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
