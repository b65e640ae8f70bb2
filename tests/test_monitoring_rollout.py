"""The label-free rollout gate end to end with real agents: a candidate that predicts nonsense is
paused by `estimated_accuracy_delta` before any ground truth is sent, and a sound one passes."""

from __future__ import annotations

import pytest

from fleet_server import rollouts
from fleet_server.registry import upload_bundle
from tests.agent_fixtures import bundle_bytes
from tests.test_rollout_agents import _brief, custom_bundle, plan, stage, start_fleet, wait_state

pytestmark = [pytest.mark.broker, pytest.mark.slow]

# Only the estimate judges: every gate that could also catch the shuffled model is off.
ONLY_ESTIMATE = {
    **{name: {"enabled": False} for name in (
        "error_rate_delta", "p95_latency_ratio", "prediction_js", "shadow_agreement", "input_drift_psi",
        "multivariate_drift_psi", "input_error_rate_delta")},
    "estimated_accuracy_delta": {"min_sample": 100},
}


def test_a_wrong_candidate_is_paused_by_the_estimate_before_any_label(tmp_path):
    fleet = start_fleet(tmp_path, 6)
    try:
        upload_bundle(fleet.svc, custom_bundle("shuffled", "2.0.0"))
        rid = rollouts.create_rollout(fleet.svc, plan("2.0.0", [stage(34), stage(100)], gates=ONLY_ESTIMATE))["id"]
        paused = wait_state(fleet, rid, {"paused", "completed"}, 90)
        assert paused["state"] == "paused" and paused["stage"] == 0, _brief(fleet, rid)
        gates = {g["name"]: g for g in paused["gates"]}
        est = gates["estimated_accuracy_delta"]
        assert est["status"] == "fail" and est["value"] < -0.2, est
        assert gates["accuracy_delta"]["status"] == "skipped"  # no labels were ever sent
        assert "estimated_accuracy_delta" in paused["reason"]
        assert fleet.svc.storage.feedback_rows("demo") == []
    finally:
        fleet.close()


def test_a_sound_candidate_passes_the_estimate(tmp_path):
    fleet = start_fleet(tmp_path, 6)
    try:
        upload_bundle(fleet.svc, bundle_bytes("lr", "2.0.0"))
        rid = rollouts.create_rollout(fleet.svc, plan("2.0.0", [stage(34), stage(100)], gates=ONLY_ESTIMATE))["id"]
        final = wait_state(fleet, rid, {"completed", "paused"}, 90)
        assert final["state"] == "completed", _brief(fleet, rid)
        first = {g["name"]: g for g in final["stages"][0]["gates"]}["estimated_accuracy_delta"]
        assert first["status"] == "pass" and first["sample"] >= 100 and abs(first["value"]) < 0.05, first
    finally:
        fleet.close()
