"""The label-free rollout gate against a covariate shift, end to end with real agents over the
managed broker, driven and read through the REST API.

The candidate (2.0.0) is the same calibrated classifier as the model the fleet runs (1.0.0), so
the candidate itself is never worse: only the canary's inputs move. The canary's devices see an
attenuated signal (every feature pulled towards its reference mean, `GAIN`), which crowds the rows
between the classes where the model is least sure, and the calibrated expected accuracy drops by
far more than the gate allows. No feedback is ever sent: the estimate pauses the canary on its
own. With clean traffic on both cohorts the same gate passes and the rollout completes.
"""

from __future__ import annotations

import contextlib
import threading
from functools import cache
from typing import Any

import numpy as np
import pytest

from fleet_server.registry import trust_key, upload_bundle
from fleet_server.rollout_model import GATE_DEFAULTS
from fleet_server.service import FleetServer
from model_tools.calibration import apply_calibration
from tests.agent_fixtures import bundle_bytes, dataset, estimator, manifest_of, public_pem
from tests.server_fixtures import ServerHandle, make_config, wait_until
from tests.test_rollout_agents import AgentFleet, stage

pytestmark = [pytest.mark.broker, pytest.mark.slow]

DEVICES = 6  # a 34 % canary takes 3 of them, the other 3 are the control
GAIN = 0.3  # the canary's features: reference mean + GAIN x (clean row - reference mean)
ROWS = 10  # rows per request

# Only the estimate judges, at its default threshold and sample: the input-drift gates would catch
# the same shift, and the latency / prediction-mix gates are not what this test is about.
ESTIMATE_ONLY = {name: {"enabled": False} for name in (
    "error_rate_delta", "p95_latency_ratio", "prediction_js", "shadow_agreement", "input_drift_psi",
    "multivariate_drift_psi", "input_error_rate_delta")}
GATE = GATE_DEFAULTS["estimated_accuracy_delta"]


@cache
def _reference_mean() -> np.ndarray:
    return dataset()[0][:800].mean(axis=0)  # the rows the bundles were built on


def _shift(rows: np.ndarray) -> np.ndarray:
    mean = _reference_mean()
    return mean + GAIN * (rows - mean)


@cache
def expected_delta() -> tuple[float, float]:
    """(estimated accuracy on shifted rows minus on clean rows, the standard error of that
    difference at the gate's minimum sample per cohort), computed with numpy and scikit-learn
    from the candidate's own calibration map: the premise of the shifted test."""
    cal = manifest_of(bundle_bytes("lr", "2.0.0")).estimation.calibration
    X = dataset()[0]
    clean = X[np.random.default_rng(7).integers(0, len(X), 20_000)]

    def confidences(rows: np.ndarray) -> np.ndarray:
        raw = estimator("lr").predict_proba(rows)
        return apply_calibration(cal, raw)[np.arange(len(rows)), raw.argmax(axis=1)]

    a, b = confidences(_shift(clean)), confidences(clean)
    n = GATE["min_sample"]
    return float(a.mean() - b.mean()), float(np.hypot(a.std(), b.std()) / np.sqrt(n))


class ShiftFleet(AgentFleet):
    """Uniform reference traffic on every device; the devices in `shifted` get attenuated rows."""

    shifted: frozenset[str] = frozenset()

    def run(self) -> ShiftFleet:
        X = dataset()[0]
        rng = np.random.default_rng(0)

        def loop() -> None:
            while not self.stop.wait(0.03):
                for device_id in list(self.agents):
                    with self.driving:
                        rows = X[rng.integers(0, len(X), ROWS)]
                        if device_id in self.shifted:
                            rows = _shift(rows)
                        with contextlib.suppress(Exception):  # mid-swap: the next call serves
                            self.agents[device_id].predict(rows.tolist())
                        self.agents[device_id].tick()

        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()
        return self


def _start(tmp_path) -> tuple[ShiftFleet, ServerHandle]:
    """A server with its managed broker, 1.0.0 and 2.0.0 uploaded, and DEVICES agents on 1.0.0."""
    server = FleetServer(make_config(tmp_path / "server", rollout_interval_s=0.1)).start()
    fleet = ShiftFleet(server, tmp_path)
    try:
        wait_until(lambda: server.ingest.connected.is_set(), 10, message="ingest connected")
        trust_key(fleet.svc, public_pem("trusted"))
        upload_bundle(fleet.svc, bundle_bytes("lr", "1.0.0"))
        upload_bundle(fleet.svc, bundle_bytes("lr", "2.0.0"))
        for i in range(DEVICES):
            fleet.add(f"dev-{i:02d}")
        api = ServerHandle(server)
        wait_until(lambda: [d["active_version"] for d in _devices(api)] == ["1.0.0"] * DEVICES, 30,
                   message="every device reports 1.0.0")
    except BaseException:
        fleet.close()
        raise
    return fleet.run(), api


def _devices(api: ServerHandle) -> list[dict[str, Any]]:
    r = api.api("GET", "/api/v1/devices")
    r.raise_for_status()
    return r.json()["devices"]


def _create(api: ServerHandle) -> dict[str, Any]:
    plan = {"model": "demo", "version": "2.0.0", "target": {"all": True},
            "stages": [stage(34), stage(100)], "gates": ESTIMATE_ONLY}
    r = api.api("POST", "/api/v1/rollouts", json=plan)
    assert r.status_code == 201, r.text
    return r.json()["rollout"]


def _status(api: ServerHandle, rid: str) -> dict[str, Any]:
    r = api.api("GET", f"/api/v1/rollouts/{rid}")
    r.raise_for_status()
    return r.json()["rollout"]


def _wait(api: ServerHandle, rid: str, states: set[str], timeout: float = 45.0) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def reached() -> bool:
        last.update(_status(api, rid))
        return last["state"] in states

    wait_until(reached, timeout, interval=0.2,
               message=lambda: f"rollout reaches {states}: {last.get('state')} {last.get('waiting_for')} "
                               f"{[(g['name'], g['status'], g['value'], g['sample']) for g in last.get('gates', [])]}")
    return last


def _gate(gates: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return {g["name"]: g for g in gates}[name]


def test_the_premise_the_shift_moves_the_estimate_beyond_the_gate():
    """Checked apart from the fleet: the candidate is calibrated, and at the gate's minimum
    sample the shift's effect is beyond both its threshold and its noise bar, by a wide margin."""
    cal = manifest_of(bundle_bytes("lr", "2.0.0")).estimation.calibration
    assert cal.applied, cal.reason
    delta, se = expected_delta()
    assert delta < 2 * GATE["min"], delta  # measured: -0.14 against min -0.05
    assert delta < -10 * se, (delta, se)  # the gate fails from 3 standard errors


def test_a_shifted_canary_is_paused_by_the_estimate_before_any_feedback(tmp_path):
    fleet, api = _start(tmp_path)
    try:
        created = _create(api)
        rid = created["id"]
        canary = {d["device"] for d in created["devices"] if d["stage"] == 0}
        assert len(canary) == 3, created["devices"]
        # The canary's devices see the shifted signal from the moment they are taken (the candidate
        # reaches them only after a download, install and self-test); the control keeps the clean one.
        fleet.shifted = frozenset(canary)
        paused = _wait(api, rid, {"paused", "completed"})
        assert paused["state"] == "paused" and paused["stage"] == 0, paused["waiting_for"]
        est = _gate(paused["gates"], "estimated_accuracy_delta")
        assert est["status"] == "fail" and est["sample"] >= GATE["min_sample"], est
        assert est["value"] < GATE["min"], est
        # The server's merged estimate is the numpy one over the same kind of rows.
        expected, se = expected_delta()
        assert abs(est["value"] - expected) < 6 * se, (est, expected, se)
        assert _gate(paused["gates"], "accuracy_delta")["status"] == "skipped"  # no labels, not judged
        assert "estimated_accuracy_delta" in paused["reason"], paused["reason"]
        assert [s["state"] for s in paused["stages"]] == ["paused", "pending"]
        # Only the canary took the candidate; nothing was ever labelled.
        versions = {d["id"]: d["active_version"] for d in _devices(api)}
        assert {d for d, v in versions.items() if v == "2.0.0"} <= canary
        assert fleet.svc.storage.feedback_rows("demo") == []
        perf = api.api("GET", "/api/v1/performance", params={"model": "demo"})
        assert perf.status_code == 200 and perf.json()["versions"] == [], perf.text
    finally:
        fleet.close()


def test_clean_traffic_passes_the_estimate_and_completes(tmp_path):
    fleet, api = _start(tmp_path)
    try:
        rid = _create(api)["id"]
        final = _wait(api, rid, {"completed", "paused"})
        assert final["state"] == "completed", (final["reason"], final["stages"][0]["gates"])
        first = _gate(final["stages"][0]["gates"], "estimated_accuracy_delta")
        assert first["status"] == "pass" and first["sample"] >= GATE["min_sample"], first
        assert abs(first["value"]) < -GATE["min"], first
        wait_until(lambda: {d["active_version"] for d in _devices(api)} == {"2.0.0"}, 30,
                   message="every device on 2.0.0")
        assert fleet.svc.storage.feedback_rows("demo") == []
    finally:
        fleet.close()
