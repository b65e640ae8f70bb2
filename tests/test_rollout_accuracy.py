"""The accuracy gate: a new version that answers with the same prediction distribution, on the
same inputs, but wrongly is paused by realized accuracy from ground-truth feedback (canary against
control), while every other gate passes. Real agents, broker, server and controller; simulated
fleet and clock."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest

from fleet_server import rollouts
from fleet_server.gates import CohortStats, evaluate_gates
from fleet_server.rollout_model import parse_spec
from tests.test_rollout_fleet import drive

pytest_plugins = ["tests.sim_fixtures"]


@cache
def iris_bundle(version: str, cycled: bool) -> bytes:
    """An iris pipeline; `cycled` trains it on labels moved one class on (0->1->2->0): every answer
    is wrong, yet the classes are balanced, so its prediction shares stay those of the right one."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from firmware_sim.datagen import load_dataset
    from model_tools.pipeline import build_bundle
    from tests.sim_fixtures import _signer

    data = load_dataset("iris")
    X, y = data.numeric_matrix(), data.y
    order = np.random.default_rng(0).permutation(len(X))
    X, y = X[order], y[order]
    target = (y + 1) % 3 if cycled else y
    est = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(X[:120], target[:120])
    return build_bundle(est, (X[:120], target[:120]), validation=(X[120:], target[120:]), name="iris",
                        version=version, quantize="float32", sign_key=_signer()[0], seed=0).bundle_bytes


def _stats(labels: int, correct: int, age: float = 0.0, devices: int = 5) -> CohortStats:
    return CohortStats(devices=devices, labels=labels, correct=correct, stage_age_s=age)


def test_accuracy_gate_is_pending_then_skipped_when_labels_are_few():
    spec = parse_spec({"model": "m", "version": "2", "gates": {"accuracy_delta": {"wait_s": 600}}})
    gate = {g.name: g for g in evaluate_gates(spec, "live", _stats(50, 10, age=10), _stats(400, 380))}
    assert gate["accuracy_delta"].status == "pending"
    gate = {g.name: g for g in evaluate_gates(spec, "live", _stats(50, 10, age=601), _stats(400, 380))}
    assert gate["accuracy_delta"].status == "skipped" and "too few labels" in gate["accuracy_delta"].detail
    gate = {g.name: g for g in evaluate_gates(spec, "live", _stats(300, 150, age=10), _stats(400, 380))}
    assert gate["accuracy_delta"].status == "fail" and gate["accuracy_delta"].value == pytest.approx(-0.45)
    gate = {g.name: g for g in evaluate_gates(spec, "live", _stats(300, 282), _stats(400, 380))}
    assert gate["accuracy_delta"].status == "pass"
    gate = {g.name: g for g in evaluate_gates(spec, "shadow", _stats(300, 0), _stats(400, 380))}
    assert gate["accuracy_delta"].status == "skipped"
    # Without labels at all the default (wait_s 0) never holds a stage up.
    default = parse_spec({"model": "m", "version": "2"})
    gate = {g.name: g for g in evaluate_gates(default, "live", _stats(0, 0), _stats(0, 0))}
    assert gate["accuracy_delta"].status == "skipped"


@pytest.mark.broker
@pytest.mark.slow
def test_a_model_wrong_only_on_labelled_rows_is_paused_by_the_accuracy_gate(sim_server):
    from firmware_sim.models import TrainedBundle

    good, bad = iris_bundle("1.0.0", False), iris_bundle("2.0.0", True)
    sim_server.add_model(TrainedBundle(good, "iris", "1.0.0", 0.0, []))
    sim_server.add_model(TrainedBundle(bad, "iris", "2.0.0", 0.0, []))
    scenario = {"dataset": "iris", "rate_per_s": 5.0, "window_s": 30.0, "label_share": 0.5, "label_delay_s": 10}
    fleet = sim_server.fleet(scenario, 20, step_s=5.0)
    fleet.preinstall(good).start(wait_online=60)
    try:
        fleet.advance(30)
        sim_server.settle(fleet, judge=False)
        plan = {"model": "iris", "version": "2.0.0", "target": {"all": True},
                "gates": {"accuracy_delta": {"wait_s": 600}},
                "stages": [{"percent": 50, "min_soak_s": 120}, {"percent": 100, "min_soak_s": 60}]}
        rid = rollouts.create_rollout(sim_server.svc, plan)["id"]
        done = drive(sim_server, fleet, rid, {"completed", "paused"}, 15 * 60)
        assert done["state"] == "paused", done["reason"]
        gates = {g["name"]: g for g in done["gates"]}
        assert gates["accuracy_delta"]["status"] == "fail", gates["accuracy_delta"]
        assert gates["accuracy_delta"]["value"] < -0.5 and gates["accuracy_delta"]["sample"] >= 200
        # Nothing else told the two models apart: same inputs, same prediction shares.
        assert {n for n, g in gates.items() if g["status"] == "fail"} == {"accuracy_delta"}
        assert gates["prediction_js"]["status"] in ("pass", "pending"), gates["prediction_js"]
        assert "accuracy_delta" in done["reason"]
    finally:
        fleet.stop()
