"""Concept drift against covariate shift, with real agents, broker and server on simulated time:
devices get their true labels back (`label_share`, `label_delay_s`), and the server tells "the
inputs are the same but the model is wrong" (a performance alert, no drift alert) from "the inputs
moved but the model holds" (a drift alert, no performance alert)."""

from __future__ import annotations

import numpy as np
import pytest

from firmware_sim.datagen import load_dataset
from firmware_sim.models import train_estimator
from firmware_sim.scenario import ScenarioError, parse_scenario

pytest_plugins = ["tests.sim_fixtures"]

CONCEPT = ["sim-0001", "sim-0002", "sim-0003"]
SHIFTED = ["sim-0004", "sim-0005", "sim-0006"]


def least_important_feature() -> str:
    """The feature the simulator's model weighs least (standardised logistic coefficients)."""
    data = load_dataset("breast_cancer")
    est, _ = train_estimator(data)
    return data.feature_names[int(np.argmin(np.abs(est[-1].coef_[0])))]


def test_label_keys_are_checked():
    assert parse_scenario({"label_share": 0.5, "label_delay_s": 30}).label_share == 0.5
    with pytest.raises(ScenarioError, match="label_share"):
        parse_scenario({"label_share": 1.5})
    with pytest.raises(ScenarioError, match="label_delay_s"):
        parse_scenario({"label_delay_s": -1})


@pytest.mark.broker
@pytest.mark.slow
def test_concept_drift_alerts_on_performance_and_covariate_shift_on_drift(sim_server):
    from tests.sim_fixtures import trained

    feature = least_important_feature()
    scenario = parse_scenario(
        {
            "rate_per_s": 10.0,
            "window_s": 60,
            "label_share": 0.5,
            "label_delay_s": 30,
            "drift": [
                {"kind": "concept", "devices": CONCEPT, "start_min": 2},
                {"kind": "shift", "devices": SHIFTED, "features": [feature], "start_min": 2, "magnitude": 2.0},
            ],
        },
        "concept-vs-covariate",
    )
    bundle = trained()
    model = sim_server.add_model(bundle)
    fleet = sim_server.fleet(scenario, 6, step_s=10.0).start(wait_online=30)
    try:
        sim_server.assign(fleet, model)
        fleet.wait(lambda: all(s.active_version == "1.0.0" for s in fleet.states().values()), 60,
                   "every device running 1.0.0")
        sim_server.run(fleet, 9 * 60, judge_every=3)
        alerts = sim_server.svc.storage.list_alerts()
        by_kind: dict[str, dict[str, set[str]]] = {"drift": {}, "performance": {}}
        for a in alerts:
            # (other kinds may join, e.g. multivariate: a shifted feature moves the joint distribution too)
            by_kind.setdefault(a["kind"], {}).setdefault(a["scope"], set()).add(a["severity"])
        perf, drift = by_kind["performance"], by_kind["drift"]
        for d in CONCEPT:
            assert "alert" in perf.get(f"device:{d}", set()), (d, perf)
            assert f"device:{d}" not in drift, (d, drift[f"device:{d}"])
        for d in SHIFTED:
            assert "alert" in drift.get(f"device:{d}", set()), (d, drift)
            assert f"device:{d}" not in perf, (d, perf[f"device:{d}"])
        shifted_targets = {a["target"] for a in alerts if a["kind"] == "drift" and a["scope"].startswith("device:")}
        assert shifted_targets == {feature}
        opened = next(a for a in alerts if a["kind"] == "performance" and a["scope"] == f"device:{CONCEPT[0]}"
                      and a["severity"] == "alert")
        assert opened["target"] == "accuracy" and opened["details"]["labels"] >= 200
        assert opened["details"]["baseline"] == pytest.approx(bundle.accuracy, abs=0.02)

        # The concept-drift view tells the two apart per device, on one time axis.
        from fleet_server.performance_service import concept_drift

        late = [p for p in concept_drift(sim_server.svc, "tumour", "1.0.0", f"device:{CONCEPT[0]}")["points"]
                if p["bucket_start"] >= fleet.started_at + 4 * 60]
        assert late and {p["diagnosis"] for p in late[:-1]} == {"concept_drift"}, [p["diagnosis"] for p in late]
        late = [p for p in concept_drift(sim_server.svc, "tumour", "1.0.0", f"device:{SHIFTED[0]}")["points"]
                if p["bucket_start"] >= fleet.started_at + 4 * 60]
        assert {p["diagnosis"] for p in late[:-1]} == {"inputs_moved_model_holds"}, [p["diagnosis"] for p in late]
        # The simulator's own count of right answers agrees that accuracy held on the shifted devices.
        states = fleet.states()
        assert all(states[d].accuracy > 0.95 for d in SHIFTED)
        assert all(fleet.devices[d].counters.labels_sent > 1000 for d in fleet.ids)
    finally:
        fleet.stop()
