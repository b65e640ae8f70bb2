"""Updates through the protocol: retained desired + a bundle server, table-driven after Mender.

Each case publishes a desired state and checks the chain of states reported on `events`,
the outcome, and the model the agent serves afterwards.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import pytest

from edge_agent.service import AgentService
from model_tools.bundle import golden_from_bytes, golden_to_bytes, read_bundle, write_bundle
from tests.agent_fixtures import (
    bundle_bytes,
    bundle_server_fixture,  # noqa: F401 - fixture
    collector_fixture,  # noqa: F401 - fixture
    dataset,
    install_active,
    keypair,
    make_config,
    onnx_predict,
    publish_desired,
)
from tests.brokers import wait_until

pytestmark = pytest.mark.broker

HAPPY = ["Idle", "Download", "Verify", "Install", "SelfTest", "Shadow", "Activate", "Probation", "Commit",
         "Cleanup", "Idle"]
VERIFY_FAILS = ["Idle", "Download", "Verify", "CheckRollback", "Failed", "Cleanup", "Idle"]
SELFTEST_FAILS = ["Idle", "Download", "Verify", "Install", "SelfTest", "CheckRollback", "Failed", "Cleanup", "Idle"]
PROBATION_FAILS = ["Idle", "Download", "Verify", "Install", "SelfTest", "Shadow", "Activate", "Probation",
                   "CheckRollback", "Rollback", "Failed", "Cleanup", "Idle"]


def bad_golden_bundle() -> bytes:
    """Correctly signed, but its golden outputs do not match the model."""
    good = read_bundle(bundle_bytes("lr", "2.0.0"), [keypair()[1]])
    golden = golden_from_bytes(golden_to_bytes(good.golden))
    for key in golden:
        if key.startswith("output:") and golden[key].dtype.kind == "f":
            golden[key] = golden[key] + 0.5
    return write_bundle(None, good.manifest, good.model_bytes, golden, keypair()[0])


def corrupt(data: bytes) -> bytes:
    b = bytearray(data)
    b[len(b) // 2] ^= 0xFF
    return bytes(b)


def incompatible_bundle() -> bytes:
    from sklearn.linear_model import LogisticRegression

    from model_tools.pipeline import build_bundle

    X, y = dataset()
    est = LogisticRegression().fit(X[:, :5], y)
    return build_bundle(est, (X[:800, :5], y[:800]), name="demo", version="2.0.0", quantize="float32",
                        sign_key=keypair()[0]).bundle_bytes


# (id, bundle maker, desired overrides, agent faults, expected chain, outcome, version served after)
CASES = [
    ("happy path", lambda: bundle_bytes("lr", "2.0.0"), {}, None, HAPPY, "success", "2.0.0"),
    ("corrupt download", lambda: bundle_bytes("lr", "2.0.0"), {"corrupt": True}, None, VERIFY_FAILS, "failure", "1.0.0"),
    ("bad signature", lambda: bundle_bytes("lr", "2.0.0", signer="untrusted"), {}, None, VERIFY_FAILS, "failure", "1.0.0"),
    ("unsigned", lambda: bundle_bytes("lr", "2.0.0", signer=None), {}, None, VERIFY_FAILS, "failure", "1.0.0"),
    ("incompatible schema", incompatible_bundle, {}, None, VERIFY_FAILS, "failure", "1.0.0"),
    ("golden-set failure", bad_golden_bundle, {}, None, SELFTEST_FAILS, "failure", "1.0.0"),
    ("probation failure rolls back", lambda: bundle_bytes("lr", "2.0.0"), {}, "predict_errors=2.0.0",
     PROBATION_FAILS, "rolled_back", "1.0.0"),
    ("resumed download", lambda: bundle_bytes("rf", "2.0.0"), {"truncate": True}, None, HAPPY, "success", "2.0.0"),
]


@pytest.fixture
def start_agent(tmp_path, broker, bundle_server):
    services = []

    def start(active: str | None = "1.0.0", faults: str | None = None, **kw):
        from edge_agent.agent import Agent

        config = make_config(tmp_path, broker, **kw)
        config.server.url = bundle_server.base  # the device's credentials go to this origin only
        if active:
            install_active(config.path, bundle_bytes("lr", active))
        service = AgentService(config, agent_factory=lambda c: Agent(c, faults=faults or "")).start()
        services.append(service)
        wait_until(lambda: service.agent.link.connected, 10, message="agent connected")
        return service

    yield start
    for s in services:
        s.stop()


def keep_predicting(agent, stop: threading.Event, rows: int = 1) -> threading.Thread:
    """Predict `rows` rows a call every 5 ms until `stop` (refusals, e.g. with no model, ignored)."""
    X, _ = dataset()

    def run():
        i = 0
        while not stop.is_set():
            with contextlib.suppress(Exception):  # refusals during rollback are fine here
                agent.predict(X[np.arange(i, i + rows) % len(X)].tolist())
            i += rows
            stop.wait(0.005)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_update_table(case, start_agent, broker, collector, bundle_server):
    _, make, overrides, faults, chain, outcome, served_after = case
    service = start_agent(faults=faults)
    data = make()
    overrides = dict(overrides)
    if overrides.pop("corrupt", False):
        desired = bundle_server.desired("dev-1", "b.efb", corrupt(data), sha_of=data)
    else:
        if overrides.pop("truncate", False):
            bundle_server.truncate_once.add("dev-1/b.efb")
        desired = bundle_server.desired("dev-1", "b.efb", data)
    stop = threading.Event()
    keep_predicting(service.agent, stop)
    try:
        publish_desired(broker, "dev-1", desired)
        wait_until(lambda: collector.outcomes(), 30, message="an update outcome")
    finally:
        stop.set()
    assert collector.chain() == chain
    assert collector.outcomes() == [outcome]
    assert service.agent.active_version() == served_after
    wait_until(lambda: (r := collector.latest("reported")) and r.update_state == "Idle"
               and r.update_outcome == outcome and r.active_version == served_after, 10,
               message="reported reflects the outcome")
    if outcome != "success":
        failures = [e for e in collector.events("transition") if e.event == "failure"]
        assert failures and failures[0].reason
    if case[0] == "resumed download":
        assert any(rng for name, rng in bundle_server.requests if name == "dev-1/b.efb")
    # the device keeps serving whatever happened
    assert service.agent.predict([[0.1] * 6]).version == served_after


def test_refused_desired_keeps_serving(start_agent, broker, collector, bundle_server):
    service = start_agent()
    publish_desired(broker, "dev-1", b'{"v": 1, "model": "demo"')
    wait_until(lambda: collector.events("refused"), 10, message="malformed desired refused")
    assert "malformed desired" in collector.events("refused")[0].reason
    older = bundle_server.desired("dev-1", "old.efb", bundle_bytes("lr", "0.9.0"))
    publish_desired(broker, "dev-1", older)
    wait_until(lambda: len(collector.events("refused")) == 2, 10, message="downgrade refused")
    assert "downgrade" in collector.events("refused")[1].reason
    assert service.agent.active_version() == "1.0.0"
    assert collector.chain() == []
    # the same downgrade, explicitly allowed by the rollout, goes through
    publish_desired(broker, "dev-1", bundle_server.desired("dev-1", "old.efb", allow_downgrade=True))
    wait_until(lambda: collector.outcomes() == ["success"], 30, message="allowed downgrade")
    assert service.agent.active_version() == "0.9.0"


def test_first_model(start_agent, broker, collector, bundle_server):
    service = start_agent(active=None)
    assert service.agent.health()["status"] == "no_model"
    publish_desired(broker, "dev-1", bundle_server.desired("dev-1", "first.efb", bundle_bytes("rf", "1.0.0")))
    wait_until(lambda: collector.outcomes(), 30, message="first model installed")
    assert collector.outcomes() == ["success"] and collector.chain() == HAPPY
    assert service.agent.health()["status"] == "ok"
    assert service.agent.predict([[0.0] * 6]).version == "1.0.0"


def test_probation_judges_batches_per_row(start_agent, broker, collector, bundle_server):
    """A first model served in batches of 200 rows: probation compares each call's latency per row
    with the self-test's single-row median (no floor here), so the batch size alone never fails the
    update, which for a first model would leave the device with none."""
    service = start_agent(active=None, update={"probation_latency_floor_ms": 0.0, "probation_predictions": 1000,
                                               "probation_s": 60.0})
    stop = threading.Event()
    keep_predicting(service.agent, stop, rows=200)
    try:
        publish_desired(broker, "dev-1", bundle_server.desired("dev-1", "first.efb", bundle_bytes("lr", "1.0.0")))
        wait_until(lambda: collector.outcomes(), 30, message="the first model's update ends")
    finally:
        stop.set()
    failures = [e.reason for e in collector.events("transition") if e.event == "failure"]
    assert collector.outcomes() == ["success"], failures
    assert service.agent.active_version() == "1.0.0"


def test_shadow_agreement_then_live(start_agent, broker, collector, bundle_server):
    service = start_agent()
    agent = service.agent
    stump = bundle_bytes("stump", "2.0.0")
    desired = bundle_server.desired("dev-1", "stump.efb", stump, mode="shadow")
    publish_desired(broker, "dev-1", desired)
    wait_until(lambda: agent.machine.state.value == "Shadow" and agent._shadow is not None, 30,
               message="candidate in shadow")
    X, _ = dataset()
    rows = X[:300]
    served = [agent.predict([r.tolist()]).output.labels[0] for r in rows]
    assert served == onnx_predict(bundle_bytes("lr", "1.0.0"), rows)  # answers come from the active model
    expected_agree = int(np.sum(np.array(served) == np.array(onnx_predict(stump, rows))))
    assert 0 < expected_agree < len(rows)  # the stump disagrees on a known share

    def shadow_totals():
        windows = [w for w in collector.get("telemetry") if w.shadow and w.shadow.version == "2.0.0"]
        return sum(w.shadow.compared for w in windows), sum(w.shadow.agreed for w in windows)

    wait_until(lambda: shadow_totals()[0] == len(rows), 10, message="shadow counts reported")
    assert shadow_totals() == (len(rows), expected_agree)
    downloads = len(bundle_server.requests)
    publish_desired(broker, "dev-1", bundle_server.desired("dev-1", "stump.efb", mode="live"))
    wait_until(lambda: collector.outcomes(), 30, message="shadow switched to live")
    assert collector.outcomes() == ["success"]
    assert agent.active_version() == "2.0.0"
    assert len(bundle_server.requests) == downloads  # the installed candidate was reused
    assert collector.chain() == HAPPY


