"""kill -9 in every update state: after a restart the agent ends on a valid model.

The agent runs as `python -m edge_agent run`; EDGEFLEET_FAULT="crash_in=<State>" (a testing
hook) makes it SIGKILL itself right after persisting that state.
"""

from __future__ import annotations

from concurrent.futures import Executor, Future

import pytest
import requests

from edge_agent.store import DataDir
from tests.agent_fixtures import (
    AgentProcess,
    bundle_bytes,
    bundle_server_fixture,  # noqa: F401 - fixture
    collector_fixture,  # noqa: F401 - fixture
    install_active,
    make_config,
    publish_desired,
)
from tests.brokers import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.slow]

# crashed state -> (state the restart re-enters, outcome reported for the interrupted attempt)
CRASHES = [
    ("Download", "CheckRollback", "failure"),
    ("Install", "CheckRollback", "failure"),
    ("SelfTest", "CheckRollback", "failure"),
    ("Activate", "CheckRollback", "rolled_back"),
    ("Probation", "CheckRollback", "rolled_back"),
    ("Commit", "Commit", "success"),
]


@pytest.mark.parametrize("state,entry,first_outcome", CRASHES, ids=[c[0] for c in CRASHES])
def test_kill_9_in_state_ends_on_valid_model(state, entry, first_outcome, tmp_path, broker, collector,
                                             bundle_server):
    config = make_config(tmp_path, broker, listen="127.0.0.1:0", update={"probation_s": 0.5})
    port = __import__("tests.brokers", fromlist=["free_port"]).free_port()
    config.http.listen = f"127.0.0.1:{port}"
    config.server.url = bundle_server.base
    install_active(config.path, bundle_bytes("lr", "1.0.0"))
    proc = AgentProcess(config, tmp_path / "agent.toml").start(fault=f"crash_in={state}")
    try:
        publish_desired(broker, "dev-1", bundle_server.desired("dev-1", "b.efb", bundle_bytes("lr", "2.0.0")))
        assert proc.wait_exit(60) == -9  # killed itself in `state`
        proc.start()  # no fault this time
        wait_until(lambda: "success" in collector.outcomes(), 60, message="the update converges after restart")
        restart = [e for e in collector.events("transition") if e.event == "restart"]
        assert [(e.from_state, e.to_state) for e in restart] == [(state, entry)]
        assert collector.outcomes()[0] == first_outcome
        model = wait_until(lambda: _get(port, "/v1/model"), 20, message="agent answers")
        assert model["version"] == "2.0.0"
        r = requests.post(f"http://127.0.0.1:{port}/v1/predict", json={"rows": [[0.1] * 6]}, timeout=5)
        assert r.status_code == 200 and r.json()["version"] == "2.0.0"
    finally:
        proc.stop()


def test_interrupted_update_is_reported_as_retrying_until_its_desired_returns(tmp_path, broker, collector,
                                                                              bundle_server):
    """A power cut mid-update is transient: after the restart the agent serves its old model and
    says it will try again (`update_retry`) until the retained desired reaches it; then it does."""
    config = make_config(tmp_path, broker, listen="127.0.0.1:0", update={"probation_s": 0.5})
    config.server.url = bundle_server.base
    install_active(config.path, bundle_bytes("lr", "1.0.0"))
    proc = AgentProcess(config, tmp_path / "agent.toml").start(fault="crash_in=Activate")
    try:
        publish_desired(broker, "dev-1", bundle_server.desired("dev-1", "b.efb", bundle_bytes("lr", "2.0.0")))
        assert proc.wait_exit(60) == -9
        publish_desired(broker, "dev-1", b"")  # cleared: the restarted agent does not get it at once
        proc.start()

        def waiting():
            r = collector.latest("reported")
            return r is not None and r.update_state == "Idle" and r.update_outcome == "rolled_back" and r

        waiting_report = wait_until(waiting, 60, message=lambda: f"rolled back and idle: {collector.latest('reported')}")
        assert waiting_report.update_retry is True and waiting_report.active_version == "1.0.0"
        assert waiting_report.candidate_version is None

        publish_desired(broker, "dev-1", bundle_server.desired("dev-1", "b.efb", bundle_bytes("lr", "2.0.0")))
        wait_until(lambda: "success" in collector.outcomes(), 60, message="the retry converges")
        done = wait_until(lambda: (r := collector.latest("reported")) and r.update_state == "Idle"
                          and r.update_outcome == "success" and r, 20, message="reported after the retry")
        assert done.update_retry is False and done.active_version == "2.0.0"
    finally:
        proc.stop()


def test_permanent_failure_is_not_reported_as_retrying(tmp_path, broker, collector, bundle_server):
    """A permanent failure (here a download whose sha256 never matches) ends with `update_retry` false."""
    config = make_config(tmp_path, broker, listen="127.0.0.1:0")
    config.server.url = bundle_server.base
    install_active(config.path, bundle_bytes("lr", "1.0.0"))
    proc = AgentProcess(config, tmp_path / "agent.toml").start()
    try:
        desired = bundle_server.desired("dev-1", "b.efb", bundle_bytes("lr", "2.0.0"))
        desired.sha256 = "0" * 64  # what arrives never matches
        publish_desired(broker, "dev-1", desired)
        report = wait_until(lambda: (r := collector.latest("reported")) and r.update_state == "Idle"
                            and r.update_outcome == "failure" and r, 60,
                            message=lambda: f"the update fails: {collector.latest('reported')}")
        assert report.update_retry is False
        assert "sha256" in (report.last_error or "")
    finally:
        proc.stop()


def _get(port: int, path: str):
    try:
        r = requests.get(f"http://127.0.0.1:{port}{path}", timeout=2)
        return r.json() if r.status_code == 200 else None
    except requests.RequestException:
        return None


class ManualExecutor(Executor):
    """Runs the update machine's work only when the test says so (`run_all`)."""

    def __init__(self) -> None:
        self.jobs: list = []

    def submit(self, fn, /, *args, **kwargs) -> Future:
        self.jobs.append(lambda: fn(*args, **kwargs))
        return Future()

    def run_all(self) -> None:
        while self.jobs:
            self.jobs.pop(0)()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.jobs.clear()


class MovingDataDir(DataDir):
    """A data dir whose next `committed()` read first lets the update machine run to its end:
    the machine moves while the agent is in the middle of building its report."""

    def __init__(self, root, executor: ManualExecutor) -> None:
        super().__init__(root)
        self.executor = executor
        self.armed = False

    def committed(self):
        if self.armed:
            self.armed = False
            self.executor.run_all()
        return super().committed()


def test_reported_snapshot_is_consistent_while_the_machine_moves(tmp_path):
    """The flake's interleaving, provoked: after a kill -9 in Activate the agent restarts in
    CheckRollback; while it builds `reported`, the machine runs CheckRollback -> Rollback ->
    Failed -> Cleanup -> Idle. The report must describe one moment: never Idle / rolled_back
    with the interrupted candidate still named."""
    from edge_agent.agent import Agent
    from edge_agent.protocol import DesiredState
    from edge_agent.update.events import State
    from edge_agent.update.machine import UpdateContext

    config = make_config(tmp_path)
    install_active(config.path, bundle_bytes("lr", "1.0.0"))
    desired = DesiredState(model="demo", version="2.0.0", url="http://127.0.0.1:9/b.efb", sha256="ab" * 32, size=10)
    saved = UpdateContext(state=State.ACTIVATE, desired=desired, previous_version="1.0.0", went_live=True)
    (config.path / "update.json").write_bytes(saved.to_json())

    executor = ManualExecutor()
    agent = Agent(config, executor=executor, link_mode="none", faults="")
    agent.data = MovingDataDir(config.path, executor)
    agent.start()
    try:
        assert agent.machine.state is State.CHECK_ROLLBACK and executor.jobs
        for build in (agent.reported, agent.model_info):
            agent.data.armed = True
            report = build()
            if not isinstance(report, dict):
                report = {"update_state": report.update_state, "update_outcome": report.update_outcome,
                          "candidate_version": report.candidate_version, "update_retry": report.update_retry}
            consistent = [
                {"update_state": "CheckRollback", "update_outcome": None, "candidate_version": "2.0.0",
                 "update_retry": False},
                {"update_state": "Idle", "update_outcome": "rolled_back", "candidate_version": None,
                 "update_retry": True},
            ]
            assert {k: report[k] for k in consistent[0]} in consistent, report
        after = agent.reported()
        assert (after.update_state, after.update_outcome, after.candidate_version, after.update_retry) == (
            "Idle", "rolled_back", None, True)
    finally:
        agent.close()
