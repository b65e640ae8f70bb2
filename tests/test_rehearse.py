"""Rehearsal predicts what the real runs do: the plans of tests/test_rollout_agents.py, rehearsed on
150 simulated devices, end where the real runs end (completed, paused at the first live stage by
prediction_js, caught in shadow by p95_latency_ratio)."""

from __future__ import annotations

import numpy as np
import pytest

from firmware_sim.datagen import Dataset
from firmware_sim.rehearse import DeviceShape, FleetShape, RehearsalReport, rehearse
from firmware_sim.scenario import parse_scenario
from tests.agent_fixtures import bundle_bytes, dataset, public_pem
from tests.test_rollout_agents import FAST_GATES, custom_bundle, plan, stage

pytestmark = [pytest.mark.broker, pytest.mark.slow]

DEVICES = 150
SCENARIO = parse_scenario({"rate_per_s": 2.0, "window_s": 30.0}, "rehearsal-test")


def skewed_dataset() -> Dataset:
    """The real runs' traffic: the test data set with three in four rows from class 1."""
    X, y = dataset()
    rows = np.concatenate([np.repeat(np.flatnonzero(y == 1), 3), np.flatnonzero(y == 0)])
    names = [f"x{i}" for i in range(X.shape[1])]
    return Dataset("skewed", names, ["numeric"] * len(names), X[rows], y[rows], "classification")


def run(candidate: bytes, stages: list[dict], **extra) -> RehearsalReport:
    report = rehearse(plan("2.0.0", stages, **extra), devices=DEVICES, scenario=SCENARIO,
                      current_bundle=bundle_bytes("lr", "1.0.0"), candidate_bundle=candidate,
                      trusted_keys=[public_pem("trusted")], dataset=skewed_dataset(), max_sim_s=3 * 3600)
    print(report.table())
    return report


def gates(report: RehearsalReport, index: int) -> dict:
    return {g.name: g for g in report.stage(index).gates}


def test_good_model_completes_every_stage():
    report = run(bundle_bytes("lr", "2.0.0"), [stage(34, "shadow"), stage(17), stage(50), stage(100)])
    assert report.outcome == "completed", report.table()
    assert [s.verdict for s in report.stages] == ["pass"] * 4
    assert [s.devices for s in report.stages] == [51, 26, 75, 150]
    assert all(s.duration_s is not None and s.duration_s >= s.min_soak_s for s in report.stages)
    assert gates(report, 0)["shadow_agreement"].value == pytest.approx(1.0)
    assert report.versions == {"2.0.0": DEVICES}
    assert [a.split()[-1] for a in report.audit] == ["create", "stage_passed", "stage_passed", "stage_passed",
                                                      "complete"]
    assert report.desired_bytes > 0 and report.download_bytes >= DEVICES * len(bundle_bytes("lr", "2.0.0"))
    d = report.to_dict()
    assert d["stages"][0]["gates"][0]["name"] and d["outcome"] == "completed"


def test_wrong_model_is_paused_at_the_first_live_stage_by_prediction_js():
    report = run(custom_bundle("shuffled", "2.0.0"), [stage(34), stage(100)])
    assert report.outcome == "paused" and len([s for s in report.stages if s.started_at is not None]) == 1
    js = gates(report, 0)["prediction_js"]
    assert js.status == "fail" and js.value > js.threshold, report.table()
    assert "prediction_js" in (report.reason or "")
    assert report.stage(1).started_at is None


def test_slow_model_is_caught_in_shadow_by_p95_latency_ratio():
    report = run(custom_bundle("slow", "2.0.0"), [stage(50, "shadow"), stage(100)], gates={
        **FAST_GATES, "p95_latency_ratio": {"max": 2.0, "min_sample": 100, "floor_ms": 0.1}})
    assert report.outcome == "paused" and report.stage(0).mode == "shadow"
    ratio = gates(report, 0)["p95_latency_ratio"]
    assert ratio.status == "fail" and ratio.value > 2.0, report.table()
    assert gates(report, 0)["shadow_agreement"].value == pytest.approx(1.0)  # only slower
    assert report.versions == {"1.0.0": DEVICES}  # nobody served it live


def test_fleet_shape_sets_hardware_tags_and_offline_devices():
    shape = FleetShape((DeviceShape("pi3b", {"site": "berlin"}), DeviceShape("n100-gw", {"site": "berlin"}),
                        DeviceShape("n100-gw", {"site": "paris"}, online=False)), "three devices")
    report = rehearse(plan("2.0.0", [stage(100)], device_timeout_s=120.0, gates={
        **FAST_GATES, "timeout_share": {"max": 0.5}}), devices=30, scenario=SCENARIO,
        current_bundle=bundle_bytes("lr", "1.0.0"), candidate_bundle=bundle_bytes("lr", "2.0.0"),
        trusted_keys=[public_pem("trusted")], dataset=skewed_dataset(), fleet_shape=shape, max_sim_s=3600)
    assert report.shape == {"pi3b": 10, "n100-gw": 20} and report.offline == 10
    assert report.outcome == "completed", report.table()
    assert report.stage(0).timed_out == 10
    assert report.versions == {"2.0.0": 20, "1.0.0": 10}
