"""kill -9 of the server mid-stage: after a restart the rollout continues in the same stage with
the same cohorts, completes, and no device was ever sent another version."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from fleet_server import rollouts
from fleet_server.config import load_config
from fleet_server.registry import trust_key, upload_bundle
from fleet_server.service import bootstrap
from tests.agent_fixtures import bundle_bytes, public_pem
from tests.brokers import free_port, wait_until
from tests.postgres_fixtures import every_backend, server_storage_url  # noqa: F401 - every backend
from tests.test_rollout_agents import AgentFleet, plan, stage

pytestmark = [pytest.mark.broker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


def start_server(data_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", "from edge_agent.entry import main; main()", "server", "run", "--data-dir",
         str(data_dir)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def up(proc: subprocess.Popen, port: int) -> bool:
    if proc.poll() is not None:
        pytest.fail(f"server exited: {proc.stderr.read().decode()[-2000:]}")
    try:
        return requests.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=1).ok
    except requests.ConnectionError:
        return False


def test_kill_9_mid_stage_then_restart_continues_with_the_same_cohorts(request, tmp_path, backend):
    data_dir = tmp_path / "server"
    data_dir.mkdir()
    http_port, broker_port = free_port(), free_port()
    (data_dir / "server.toml").write_text(
        f'listen = "127.0.0.1:{http_port}"\nbroker_port = {broker_port}\nbucket_s = 1.0\n'
        "rollout_interval_s = 0.1\nbroker_sync_interval_s = 0.2\n"
        + (f'storage_url = "{url}"\n' if (url := server_storage_url(request, backend)) else "")
    )
    svc = bootstrap(load_config(data_dir))
    trust_key(svc, public_pem("trusted"))
    upload_bundle(svc, bundle_bytes("lr", "1.0.0"))
    upload_bundle(svc, bundle_bytes("lr", "2.0.0"))
    fleet = AgentFleet(None, tmp_path, services=svc)
    proc = start_server(data_dir)
    broker_pid = None
    try:
        wait_until(lambda: up(proc, http_port), 20, interval=0.1, message="server up")
        for i in range(5):
            fleet.add(f"dev-{i:02d}")
        fleet.run()
        rid = rollouts.create_rollout(svc, plan("2.0.0", [stage(40, soak=4.0), stage(100)]), "alice")["id"]

        def first_stage_updated() -> bool:
            members = svc.storage.rollout_devices(rid)
            return len(members) == 2 and all(m["status"] == "updated" for m in members)

        wait_until(first_stage_updated, 30, interval=0.1, message="stage 1 devices updated")
        before = {m["device"]: (m["stage"], m["previous_version"]) for m in svc.storage.rollout_devices(rid)}
        assert svc.storage.get_rollout(rid)["stage"] == 0
        broker_pid = int((data_dir / "broker" / "mosquitto.pid").read_text())
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc = start_server(data_dir)
        wait_until(lambda: up(proc, http_port), 20, interval=0.1, message="restarted server up")
        wait_until(lambda: svc.storage.get_rollout(rid)["state"] in ("completed", "paused"), 60, interval=0.1,
                   message="rollout completes after the restart")
        status = rollouts.rollout_status(svc, rid)
        assert status["state"] == "completed", status["reason"]
        after = {m["device"]: (m["stage"], m["previous_version"]) for m in status["devices"]}
        assert {d: v for d, v in after.items() if v[0] == 0} == before  # same first cohort
        assert [a["action"] for a in status["audit"]] == ["create", "stage_passed", "complete"]
        wait_until(lambda: set(fleet.versions().values()) == {"2.0.0"}, 30, message="every device on 2.0.0")
        sent = svc.storage.device_desired()
        assert {(r["version"], r["rollout_id"]) for r in sent.values()} == {("2.0.0", rid)}
        events = [e for d in fleet.agents for e in svc.storage.events(d, 1000)]
        assert {e["version"] for e in events if e["version"]} == {"2.0.0"}
    finally:
        fleet.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        finally:
            if proc.poll() is None:
                proc.kill()
            if broker_pid is not None:
                wait_until(lambda: not Path(f"/proc/{broker_pid}").exists(), 10, message="broker stopped")
            svc.close()
