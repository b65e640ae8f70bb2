"""Several nodes: leader takeover after kill -9, and the rollout controller's pass at fleet scale
on SQLite and PostgreSQL. Prints a markdown table and writes bench/results/cluster.md.

Takeover: two processes compete for leadership (`AdvisoryLockLeadership`, checked every 0.25 s,
what a node with rollout_interval_s = 0.5 uses) on a PostgreSQL cluster of the benchmark's own;
the leader is killed with SIGKILL and the time until the other one leads is measured, 5 times.

Rollout pass: N devices registered straight through the storage interface, one model, a running
rollout over all of them (stages 10 %, 50 %, 100 %); the controller's first pass (it assigns the
first cohort and publishes its desired states to a recording publisher: no broker) and its
steady-state passes (nothing to publish) in CPU ms of the server process and wall ms; then the
rollout is advanced to its last stage (every device assigned) and measured again. On PostgreSQL
the database server's CPU during the steady passes is given beside (SQLite runs in the process,
so its share is in the process's CPU). Goal: a steady pass at 10,000 devices in <= 50 ms CPU.

    .venv/bin/python bench/cluster.py            # 1,000 and 10,000 devices
    .venv/bin/python bench/cluster.py --quick    # 1,000 devices, 3 takeovers
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
CHECK_S = 0.25

COMPETITOR = """
import sys, time
from fleet_server.leadership import AdvisoryLockLeadership
lead = AdvisoryLockLeadership(sys.argv[1], check_s=float(sys.argv[2]), name=sys.argv[3])
lead.start()
was = None
while True:
    now = lead.is_leader()
    if now != was:
        print(("LEADS" if now else "FOLLOWS"), repr(time.time()), flush=True)
        was = now
    time.sleep(0.005)
"""


def takeover_times(url: str, runs: int) -> list[float]:
    """Seconds from SIGKILL of the leader to the other process leading, `runs` times."""
    out = []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def spawn(name: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", COMPETITOR, url, str(CHECK_S), name], stdout=subprocess.PIPE,
                                text=True, env=env)

    def first_line(proc: subprocess.Popen, word: str) -> float:
        while True:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError("a competitor exited")
            if line.startswith(word):
                return float(line.split()[1])

    leader = spawn("a")
    first_line(leader, "LEADS")
    for _ in range(runs):
        follower = spawn("b")
        first_line(follower, "FOLLOWS")
        killed = time.time()
        leader.kill()
        leader.wait()
        out.append(first_line(follower, "LEADS") - killed)
        leader = follower
    leader.kill()
    leader.wait()
    return out


class RecordingPublisher:
    """Stands in for the MQTT publisher: the controller's CPU, not the broker's, is measured."""

    def __init__(self) -> None:
        self.sent = 0

    def publish_desired(self, device_id, desired) -> bool:
        self.sent += 1
        return True

    def clear_desired(self, device_id) -> bool:
        return True

    def publish_alert(self, payload) -> bool:
        return True


GOAL_MS = 50.0  # CPU per steady controller pass at 10,000 devices


def server_cpu_s(cluster) -> float:
    """CPU seconds of the PostgreSQL server so far: the postmaster and its children (the backends)."""
    if cluster is None:
        return 0.0
    postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" ", 1)
        except OSError:
            continue
        fields = rest.rsplit(")", 1)[1].split()
        if int(pid) == postmaster or int(fields[1]) == postmaster:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _steady(svc, rollouts, cluster, passes: int = 5, before=None) -> dict[str, float]:
    """Median CPU and wall ms of `passes` reconcile passes with nothing to change (and the
    database server's CPU ms per pass); `before()` runs before each pass, outside the count."""
    cpus, walls, dbs = [], [], []
    rollouts.reconcile(svc)  # the pass after one that told devices looks at those once more
    for _ in range(passes):
        if before is not None:
            before()
        db = server_cpu_s(cluster)
        cpu, wall = time.process_time(), time.perf_counter()
        rollouts.reconcile(svc)
        cpus.append((time.process_time() - cpu) * 1000)
        walls.append((time.perf_counter() - wall) * 1000)
        dbs.append((server_cpu_s(cluster) - db) * 1000)
    return {"cpu": statistics.median(cpus), "wall": statistics.median(walls), "db": statistics.median(dbs)}


def rollout_pass(storage_url: str, devices: int, work: Path, cluster=None) -> dict[str, float]:
    from fleet_server import rollouts
    from fleet_server.config import ServerConfig
    from fleet_server.registry import trust_key, upload_bundle
    from fleet_server.service import bootstrap
    from model_tools.signing import generate_keypair, save_public_key
    from tests.server_fixtures import make_bundle

    svc = bootstrap(ServerConfig(data_dir=work, storage_url=storage_url))
    try:
        private, public = generate_keypair()
        trust_key(svc, save_public_key(public, work / "signer.pub").read_text())
        upload_bundle(svc, make_bundle(private, "pump", "1.0.0"))
        upload_bundle(svc, make_bundle(private, "pump", "2.0.0"))
        now = time.time()
        from edge_agent.protocol import ReportedState
        from fleet_server.storage import IngestBatch

        for i in range(devices):
            svc.storage.insert_device(f"dev-{i:05d}", "default", {"site": f"s{i % 7}"}, "x", "x", now)
        # Every device has reported that it runs 1.0.0 (the controller tells only devices it knows).
        for start in range(0, devices, 2000):
            batch = IngestBatch(reported=[(ReportedState(device=f"dev-{i:05d}", ts=now, model="pump",
                                                         active_version="1.0.0"), now)
                                          for i in range(start, min(devices, start + 2000))])
            svc.storage.store_batch(batch, 60.0, now)
        svc.publisher = RecordingPublisher()  # type: ignore[assignment]
        rollouts.create_rollout(svc, {"model": "pump", "version": "2.0.0", "target": {"all": True}, "stages": [
            {"percent": 10, "min_soak_s": 3600}, {"percent": 50, "min_soak_s": 3600},
            {"percent": 100, "min_soak_s": 3600}]}, actor="bench")
        rid = rollouts.list_rollouts(svc)[0]["id"]
        cpu, wall = time.process_time(), time.perf_counter()
        rollouts.reconcile(svc)
        first = ((time.process_time() - cpu) * 1000, (time.perf_counter() - wall) * 1000)
        published = svc.publisher.sent  # type: ignore[union-attr]
        steady = _steady(svc, rollouts, cluster)
        rollouts.advance(svc, rid, actor="bench")
        rollouts.advance(svc, rid, actor="bench")  # the last stage: every device
        rollouts.reconcile(svc)  # takes and tells the other 90 %
        last = _steady(svc, rollouts, cluster)
        # 1 % of the fleet reports between two passes (an agent refreshes `reported` every 10
        # minutes: 10,000 devices send about 35 reports between two passes 2 s apart).
        clock = [time.time()]

        def reports() -> None:
            clock[0] += 1.0
            batch = IngestBatch(reported=[(ReportedState(device=f"dev-{i:05d}", ts=clock[0], model="pump",
                                                         active_version="1.0.0"), clock[0])
                                          for i in range(0, devices, 100)])
            svc.storage.store_batch(batch, 60.0, clock[0])

        churn = _steady(svc, rollouts, cluster, before=reports)
        # A pass that looks at every device: a new leader's first, and one a minute.
        def full_pass_due() -> None:
            svc.rollout_memory.full_at -= 60.0  # as a minute after the previous full pass

        full = _steady(svc, rollouts, cluster, before=full_pass_due)
        assert svc.storage.get_rollout(rid)["stage"] == 2
        assert len(svc.storage.rollout_assignments(rid)) == devices
        return {"first_cpu": first[0], "first_wall": first[1], "published": published, "cpu": steady["cpu"],
                "wall": steady["wall"], "db": steady["db"], "last_cpu": last["cpu"], "last_wall": last["wall"],
                "last_db": last["db"], "churn_cpu": churn["cpu"], "churn_db": churn["db"],
                "full_cpu": full["cpu"], "full_wall": full["wall"], "full_db": full["db"]}
    finally:
        svc.storage.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 devices and 3 takeovers")
    parser.add_argument("--out", type=Path, default=RESULTS / "cluster.md")
    args = parser.parse_args()
    from tests.postgres import PostgresCluster

    sizes = [1000] if args.quick else [1000, 10_000]
    runs = 3 if args.quick else 5
    cluster = PostgresCluster().start()
    lines = []
    try:
        times = takeover_times(cluster.create_database("takeover"), runs)
        lines += [
            f"Machine: {os.cpu_count()} cores, Python {platform.python_version()}; PostgreSQL 15 of the benchmark's "
            "own (initdb, fsync off).", "",
            f"### Leader takeover after kill -9 (leadership checked every {CHECK_S} s)", "",
            "| runs | median s | min s | max s |", "|---|---|---|---|",
            f"| {len(times)} | {statistics.median(times):.3f} | {min(times):.3f} | {max(times):.3f} |", "",
            "### Rollout controller pass (all devices in one rollout, 3 stages)", "",
            "Steady pass: nothing to change. CPU ms of the server process (median of 5 passes); on "
            "PostgreSQL the database server's CPU ms per pass in brackets. Last stage: every device "
            "assigned; with 1 % reporting: 1 % of the devices sent a report since the previous pass; full "
            "pass: one that looks at every device (a new leader's first, then one a minute). Goal: steady "
            f"pass at 10,000 devices <= {GOAL_MS:.0f} ms CPU.", "",
            "| backend | devices | first pass CPU ms (wall ms, desired published) | steady, stage 1 (10 %): "
            "CPU ms [db] | wall ms | steady, last stage: CPU ms [db] | wall ms | last stage, 1 % reporting: "
            "CPU ms [db] | full pass, last stage: CPU ms [db] | wall ms | goal |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for devices in sizes:
            for name in ("sqlite", "postgresql"):
                with tempfile.TemporaryDirectory(prefix="ef-bench-") as tmp:
                    work = Path(tmp)
                    url = f"sqlite:///{(work / 'fleet.db').as_posix().lstrip('/')}" if name == "sqlite" else \
                        cluster.create_database(f"rollout_{devices}")
                    r = rollout_pass(url, devices, work / "data", cluster if name == "postgresql" else None)
                db = (lambda v: f" [{v:.1f}]") if name == "postgresql" else (lambda v: "")
                worst = max(r["cpu"], r["last_cpu"], r["churn_cpu"])
                goal = ("met" if worst <= GOAL_MS else "not met") if devices >= 10_000 else "-"
                lines.append(f"| {name} | {devices:,} | {r['first_cpu']:.0f} ({r['first_wall']:.0f}, "
                             f"{r['published']:.0f}) | {r['cpu']:.1f}{db(r['db'])} | {r['wall']:.1f} | "
                             f"{r['last_cpu']:.1f}{db(r['last_db'])} | {r['last_wall']:.1f} | "
                             f"{r['churn_cpu']:.1f}{db(r['churn_db'])} | "
                             f"{r['full_cpu']:.1f}{db(r['full_db'])} | {r['full_wall']:.1f} | {goal} |")
                print(lines[-1], flush=True)
    finally:
        cluster.destroy()
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
