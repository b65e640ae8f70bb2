"""Rollout specs, cohorts and gates: pure logic, table-driven."""

from __future__ import annotations

import pytest

from fleet_server.gates import CohortStats, evaluate_gates, verdict
from fleet_server.rollout_model import (
    DEFAULT_STAGES,
    RolloutError,
    RolloutState,
    Target,
    next_state,
    order_devices,
    parse_spec,
    stage_assignment,
)

DEVICES = [f"dev-{i:04d}" for i in range(200)]


def test_defaults_fill_in():
    spec = parse_spec({"model": "m", "version": "2", "target": {"all": True}})
    assert spec.stages == DEFAULT_STAGES
    assert [s.mode for s in spec.stages] == ["shadow", "live", "live", "live", "live"]
    assert spec.on_failure == "pause"
    assert spec.gate("prediction_js")["max"] == 0.10


@pytest.mark.parametrize(
    "request_body, message",
    [
        ({"version": "2"}, "'model' is required"),
        ({"model": "m", "version": "2", "target": {}}, "selects no devices"),
        ({"model": "m", "version": "2", "stages": [{"mode": "live"}]}, "exactly one of percent"),
        ({"model": "m", "version": "2", "stages": [{"percent": 150}]}, "percent must be"),
        ({"model": "m", "version": "2", "stages": [{"count": 1, "mode": "canary"}]}, "mode is"),
        ({"model": "m", "version": "2", "gates": {"nope": {}}}, "unknown gate"),
        ({"model": "m", "version": "2", "on_failure": "explode"}, "on_failure"),
        ({"model": "m", "version": "2", "colour": "red"}, "unknown rollout field"),
    ],
)
def test_bad_specs_are_refused_with_the_reason(request_body, message):
    with pytest.raises(RolloutError, match=message):
        parse_spec(request_body)


def test_cohorts_are_deterministic_and_nested():
    spec = parse_spec({"model": "m", "version": "2", "target": {"all": True}})
    previous: set[str] = set()
    for stage in range(len(spec.stages)):
        modes = stage_assignment(spec, "r1", DEVICES, stage)
        assert set(modes) >= previous
        assert modes == stage_assignment(spec, "r1", list(reversed(DEVICES)), stage)
        previous = set(modes)
    assert len(stage_assignment(spec, "r1", DEVICES, 0)) == 10  # 5 % of 200
    after_live_1 = stage_assignment(spec, "r1", DEVICES, 1)
    assert sorted(after_live_1.values()).count("live") == 2  # 1 % live, the rest of 5 % shadow
    assert len(stage_assignment(spec, "r1", DEVICES, 4)) == 200
    assert order_devices("r1", DEVICES) != order_devices("r2", DEVICES)


def test_target_selectors():
    assert Target(all=True).matches("x", {})
    assert Target(tags={"site": "a"}).matches("x", {"site": "a", "hw": "pi4"})
    assert not Target(tags={"site": "a"}).matches("x", {"site": "b"})
    assert Target(group="canary").matches("x", {"group": "canary"})
    assert Target(devices=("x",)).matches("x", {})
    assert not Target(devices=("x",)).matches("y", {})


@pytest.mark.parametrize(
    "state, action, expected",
    [
        (RolloutState.RUNNING, "pause", RolloutState.PAUSED),
        (RolloutState.PAUSED, "resume", RolloutState.RUNNING),
        (RolloutState.RUNNING, "gate_failed_rollback", RolloutState.ABORTING),
        (RolloutState.PAUSED, "abort", RolloutState.ABORTING),
        (RolloutState.COMPLETED, "abort", RolloutState.ABORTING),
        (RolloutState.ABORTING, "aborted", RolloutState.ABORTED),
    ],
)
def test_rollout_transitions(state, action, expected):
    assert next_state(state, action) == expected


@pytest.mark.parametrize("state, action", [(RolloutState.ABORTED, "resume"),
                                           (RolloutState.COMPLETED, "pause")])
def test_impossible_transitions_say_why(state, action):
    with pytest.raises(RolloutError, match=f"cannot {action}"):
        next_state(state, action)


def _stats(**kw) -> CohortStats:
    s = CohortStats(**{k: v for k, v in kw.items() if k not in ("lat_bin",)})
    if "lat_bin" in kw:
        s.latency[kw["lat_bin"]] = s.predictions
    return s


def test_live_gates_pass_for_a_model_like_the_control():
    spec = parse_spec({"model": "m", "version": "2"})
    canary = _stats(devices=10, updated=10, predictions=1000, errors=5, lat_bin=3,
                    prediction_counts=[600, 400], max_feature_psi=0.02)
    control = _stats(devices=90, predictions=9000, errors=40, lat_bin=3,
                     prediction_counts=[5900, 4100])
    results = evaluate_gates(spec, "live", canary, control)
    assert verdict(results) == "pass", [r for r in results if r.status != "pass"]
    assert all(r.sample >= 0 and r.threshold is not None for r in results)


def test_divergent_predictions_fail_the_js_gate():
    spec = parse_spec({"model": "m", "version": "2"})
    canary = _stats(devices=10, updated=10, predictions=1000, lat_bin=3, prediction_counts=[100, 900])
    control = _stats(devices=90, predictions=9000, lat_bin=3, prediction_counts=[5900, 4100])
    results = {r.name: r for r in evaluate_gates(spec, "live", canary, control)}
    assert results["prediction_js"].status == "fail"
    assert results["prediction_js"].value > 0.1


def test_drifted_canary_inputs_fail_the_input_drift_gate():
    spec = parse_spec({"model": "m", "version": "2"})
    canary = _stats(devices=10, updated=10, predictions=1000, lat_bin=3, prediction_counts=[600, 400],
                    max_feature_psi=0.3)
    control = _stats(devices=90, predictions=9000, lat_bin=3, prediction_counts=[5900, 4100])
    results = {r.name: r for r in evaluate_gates(spec, "live", canary, control)}
    assert results["input_drift_psi"].status == "fail" and results["input_drift_psi"].value == 0.3
    assert results["input_drift_psi"].threshold == 0.25


def test_small_samples_are_pending_not_passed():
    spec = parse_spec({"model": "m", "version": "2"})
    canary = _stats(devices=10, updated=1, predictions=10, lat_bin=3, prediction_counts=[5, 5])
    control = _stats(devices=90, predictions=10, lat_bin=3, prediction_counts=[5, 5])
    assert verdict(evaluate_gates(spec, "live", canary, control)) == "pending"


def test_prediction_js_above_the_bar_waits_while_sampling_noise_explains_it():
    spec = parse_spec({"model": "m", "version": "2", "gates": {"prediction_js": {"min_sample": 200}}})
    control = _stats(devices=90, predictions=3000, lat_bin=3, prediction_counts=[750, 2250])

    def js(counts: list[int]):
        canary = _stats(devices=10, updated=10, predictions=sum(counts), lat_bin=3, prediction_counts=counts)
        return {r.name: r for r in evaluate_gates(spec, "live", canary, control)}["prediction_js"]

    noisy = js([28, 172])  # 0.119 above 0.10, but chi-square p = 4.5e-4
    assert noisy.value > noisy.threshold and noisy.sample >= noisy.min_sample
    assert noisy.status == "pending" and "within sampling noise" in noisy.detail
    assert noisy.waiting() == "gate prediction_js: within sampling noise at 200 predictions, waiting for more"
    small = js([10, 90])
    assert small.status == "pending" and small.waiting() == "gate prediction_js: sample 100 of 200 predictions"
    assert js([25, 175]).status == "fail"  # 0.137, p = 6.5e-5
    assert js([100, 100]).status == "fail"  # 0.221, p = 9e-15
    assert js([190, 10]).status == "fail"
    assert js([40, 160]).status == "pass"


def test_shadow_stage_catches_a_slow_candidate():
    spec = parse_spec({"model": "m", "version": "2"})
    canary = _stats(devices=10, updated=10, predictions=1000, lat_bin=3, prediction_counts=[500, 500],
                    shadow_compared=1000, shadow_agreed=990,
                    shadow_prediction_counts=[505, 495])
    canary.shadow_latency[9] = 1000  # 10-25 ms against 0.1-0.25 ms
    results = {r.name: r for r in evaluate_gates(spec, "shadow", canary, CohortStats())}
    assert results["p95_latency_ratio"].status == "fail"
    assert results["shadow_agreement"].status == "pass"


def test_a_full_stage_skips_control_comparisons():
    spec = parse_spec({"model": "m", "version": "2"})
    canary = _stats(devices=100, updated=100, predictions=5000, lat_bin=3, prediction_counts=[1, 1],
                    max_feature_psi=0.01)
    results = {r.name: r for r in evaluate_gates(spec, "live", canary, CohortStats())}
    assert results["prediction_js"].status == "skipped"
    assert verdict(list(results.values())) == "pass"


# A device's status in a stage, derived from its reported state: (reported, failure event, status).
MEMBER = {"mode": "live", "desired_at": 100.0, "assigned_at": 100.0}
STATUS_CASES = [
    ("committed", {"active_version": "2", "update_state": "Idle", "update_outcome": "success"}, None, "updated"),
    ("installing", {"active_version": "1", "candidate_version": "2", "update_state": "Download"}, None, "pending"),
    ("failed for good", {"active_version": "1", "update_state": "Idle", "update_outcome": "failure",
                         "rollout_id": "r1"}, "verify: sha256", "failed"),
    ("rolled back, will retry when its desired arrives",
     {"active_version": "1", "update_state": "Idle", "update_outcome": "rolled_back", "update_retry": True,
      "rollout_id": "r1"}, "interrupted in Activate", "pending"),
    ("retry for another rollout does not count",
     {"active_version": "1", "update_state": "Idle", "update_outcome": "rolled_back", "update_retry": True,
      "rollout_id": "r0"}, "interrupted in Activate", "failed"),
    ("agent without update_retry: failed as before",
     {"active_version": "1", "update_state": "Idle", "update_outcome": "rolled_back", "rollout_id": "r1"},
     None, "failed"),
]


@pytest.mark.parametrize("reported,failure,expected", [c[1:] for c in STATUS_CASES], ids=[c[0] for c in STATUS_CASES])
def test_device_status_counts_a_device_about_to_retry_as_updating(reported, failure, expected):
    from fleet_server.rollouts.device_status import device_status as _device_status

    device = {"reported": reported, "status": "online"}
    assert _device_status("r1", "2", MEMBER, device, failure, now=110.0, timeout_s=60.0) == expected
    if expected == "pending":  # until the device timeout
        assert _device_status("r1", "2", MEMBER, device, failure, now=200.0, timeout_s=60.0) == "timed_out"
