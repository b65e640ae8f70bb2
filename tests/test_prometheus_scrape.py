"""A real Prometheus (Debian's package, its own config, data dir and free loopback port) scrapes a
running TLS fleet server and an agent process capped by a memory cgroup: every query of the
Grafana dashboard returns series, the alert rules load and evaluate, and the figures are the
server's and the agent's own (online device, memory cap, certificate expiry, active model)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from cryptography import x509

from fleet_server.desired import publish_desired
from fleet_server.devices import provision_device
from fleet_server.registry import desired_state, trust_key, upload_bundle
from fleet_server.service import FleetServer
from fleet_server.tls import init_tls
from tests.agent_fixtures import bundle_bytes, dataset, public_pem
from tests.arm64_fixtures import MemoryCgroup
from tests.brokers import free_port, wait_until
from tests.server_fixtures import DeviceClient, connected, make_config
from tests.test_prometheus_rules import RULES, dashboard_queries, rule_expressions

pytestmark = [pytest.mark.broker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = "/usr/bin/prometheus"
AGENT_CAP = 512 * 2**20
# Grafana's variables, as the dashboard's "All" and a window of several 1 s scrapes.
SUBSTITUTIONS = {"$__rate_interval": "15s", "$agent": ".+"}


def _prometheus_config(path: Path, server_port: int, ca: Path, agent_port: int) -> Path:
    path.write_text(f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {RULES}
scrape_configs:
  - job_name: edgefleet-server
    scheme: https
    tls_config:
      ca_file: {ca}
    static_configs:
      - targets: ["127.0.0.1:{server_port}"]
  - job_name: edgefleet-agents
    static_configs:
      - targets: ["127.0.0.1:{agent_port}"]
""")
    return path


class Prometheus:
    """`prometheus` on a free loopback port with its own config and TSDB in a temp dir."""

    def __init__(self, config: Path, data_dir: Path) -> None:
        if not Path(PROMETHEUS).is_file():
            pytest.fail("prometheus is missing: install Debian's prometheus package (make system-deps does)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(data_dir.parent / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={data_dir}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}")
        try:
            return requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    def get(self, path: str, **params: str) -> dict:
        r = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        doc = r.json()
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr: str) -> list[dict]:
        return self.get("query", query=expr)["result"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def tls_server(tmp_path):
    data_dir = tmp_path / "server"
    init_tls(data_dir)
    server = connected(FleetServer(make_config(data_dir, tls=True, broker_tls_listen=f"127.0.0.1:{free_port()}")).start())
    yield server
    server.stop()


def _start_agent(svc, device_dir: Path, ca: Path, http_port: int, cgroup: MemoryCgroup) -> subprocess.Popen:
    """`python -m edge_agent run` with the provisioned config, inside the memory cgroup."""
    device_dir.mkdir()
    text = provision_device(svc, "prom-0", data_dir=str(device_dir / "data"), window_s=0.25).agent_config
    assert 'listen = "127.0.0.1:8470"' in text
    (device_dir / "agent.toml").write_text(text.replace('listen = "127.0.0.1:8470"', f'listen = "127.0.0.1:{http_port}"'))
    shutil.copy(ca, device_dir / "edgefleet-ca.pem")
    log = open(device_dir / "agent.log", "wb")  # noqa: SIM115 - the process holds it
    return subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "run", "--config", str(device_dir / "agent.toml")],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=log, stderr=subprocess.STDOUT,
        preexec_fn=cgroup.enter,
    )


def test_prometheus_scrapes_server_and_agent_and_every_dashboard_query_has_series(tls_server, tmp_path):
    svc, config = tls_server.svc, tls_server.config
    ca = config.tls_files[2]
    trust_key(svc, public_pem("trusted"))
    model = upload_bundle(svc, bundle_bytes("lr"))
    agent_port = free_port()
    agent_url = f"http://127.0.0.1:{agent_port}"
    cgroup = MemoryCgroup(AGENT_CAP)
    agent = _start_agent(svc, tmp_path / "device", ca, agent_port, cgroup)
    prometheus = None
    bad_device = None
    try:
        def agent_model() -> str | None:
            assert agent.poll() is None, (tmp_path / "device" / "agent.log").read_text()[-3000:]
            try:
                return requests.get(f"{agent_url}/v1/model", timeout=2).json().get("version")
            except (requests.ConnectionError, ValueError):
                return None

        assert publish_desired(svc, "prom-0", desired_state(svc, model["name"], model["version"]))
        wait_until(lambda: agent_model() == model["version"], 60, interval=0.2,
                   message="agent activated the bundle")

        # A device that sends a broken window: a rejected message, counted by reason.
        password = provision_device(svc, "prom-bad", {}).password
        bad_device = DeviceClient(config, "prom-bad", password).wait_connected()
        bad_device.publish("telemetry", b"{not json")
        wait_until(lambda: svc.storage.reject_counts(), 20, message="reject stored")

        prometheus = Prometheus(
            _prometheus_config(tmp_path / "prometheus.yml", config.listen_host_port[1], ca, agent_port),
            tmp_path / "tsdb",
        )
        wait_until(prometheus.ready, 60, interval=0.2, message="prometheus ready")

        X, _ = dataset()
        rows = X[:5].tolist()
        queries = dashboard_queries()
        for old, new in SUBSTITUTIONS.items():
            queries = [q.replace(old, new) for q in queries]
        assert not [q for q in queries if "$" in q]

        def has_series(query: str) -> bool:
            # Grafana's label_values(metric, label): the label's values on the metric's series.
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            if match:
                return bool(prometheus.get(f"label/{match[2]}/values", **{"match[]": match[1]}))
            return bool(prometheus.query(query))

        def missing() -> list[str]:
            # Traffic while waiting: predictions and one refused request per round.
            requests.post(f"{agent_url}/v1/predict", json={"rows": rows}, timeout=5)
            requests.post(f"{agent_url}/v1/predict", json={"rows": [[1.0]]}, timeout=5)
            return [q for q in queries if not has_series(q)]

        wait_until(lambda: not missing(), 90, interval=0.5,
                   message=lambda: f"dashboard queries without series: {missing()}")

        targets = prometheus.get("targets")["activeTargets"]
        assert {t["labels"]["job"]: t["health"] for t in targets} == {
            "edgefleet-server": "up", "edgefleet-agents": "up"}

        # The figures are the server's and the agent's own.
        online = prometheus.query('edgefleet_devices{status="online"}')
        assert float(online[0]["value"][1]) >= 1
        limit = prometheus.query("edgefleet_agent_memory_limit_bytes")
        assert float(limit[0]["value"][1]) == cgroup.limit_bytes()
        rss = float(prometheus.query("edgefleet_agent_resident_memory_bytes")[0]["value"][1])
        assert 0 < rss < AGENT_CAP
        server_cert = x509.load_pem_x509_certificate(config.tls_files[0].read_bytes())
        expiry = {r["metric"]["certificate"]: float(r["value"][1])
                  for r in prometheus.query("edgefleet_tls_certificate_expiry_timestamp_seconds")}
        assert expiry["server"] == server_cert.not_valid_after_utc.timestamp()
        assert set(expiry) == {"server", "ca"}
        info = prometheus.query("edgefleet_model_info")
        assert info[0]["metric"]["version"] == model["version"] and info[0]["metric"]["device"] == "prom-0"
        rejects = prometheus.query("edgefleet_ingest_rejects_total")
        assert {r["metric"]["reason"] for r in rejects} == {"malformed"}
        assert {r["metric"]["state"] for r in prometheus.query("edgefleet_rollouts")} >= {"running", "paused"}

        # Every alert rule is loaded and evaluates without error; a healthy fleet fires none (the
        # one broken window may make the reject share rule pending: it waits 10 minutes).
        def rules() -> dict[str, dict]:
            groups = prometheus.get("rules")["groups"]
            return {r["name"]: r for g in groups for r in g["rules"] if r["type"] == "alerting"}

        wait_until(lambda: all(r.get("lastEvaluation", "").startswith("2") and r["health"] == "ok"
                               for r in rules().values()) and len(rules()) == len(rule_expressions()),
                   30, interval=0.5, message=lambda: {n: (r["health"], r.get("lastError")) for n, r in rules().items()})
        assert set(rules()) == set(rule_expressions())
        active = {n: r["state"] for n, r in rules().items() if r["state"] != "inactive"}
        assert active in ({}, {"EdgefleetIngestRejects": "pending"}), active
    finally:
        if prometheus is not None:
            prometheus.stop()
        if bad_device is not None:
            bad_device.close()
        agent.terminate()
        try:
            agent.wait(timeout=15)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        cgroup.remove()
