"""Realized performance: the pure metrics against scikit-learn, and end to end with real agents
over the managed broker (stored confusion counts equal a direct computation; unknown, expired,
duplicate and malformed feedback is counted and visible in the API, never a crash)."""

from __future__ import annotations

import math
import threading
import tomllib

import numpy as np
import pytest

from edge_agent import Agent
from edge_agent.config import config_from_dict
from edge_agent.protocol import Feedback
from edge_agent.validation import RequestError
from fleet_server.alerts import PolicyError
from fleet_server.desired import publish_desired
from fleet_server.devices import provision_device
from fleet_server.performance import (
    FeedbackMismatch,
    FeedbackSums,
    PerformancePolicy,
    baseline,
    bucket_point,
    metrics,
    realized,
)
from fleet_server.registry import desired_state, trust_key, upload_bundle
from tests.agent_fixtures import bundle_bytes, dataset, public_pem
from tests.postgres_fixtures import every_backend  # noqa: F401 - feedback on every backend
from tests.server_fixtures import wait_until

pytest_plugins = ["tests.server_fixtures"]


def _confusion(y_true, y_pred, k):
    cm = [[0] * k for _ in range(k)]
    for t, p in zip(y_true, y_pred, strict=True):
        cm[t][p] += 1
    return cm


def test_classification_metrics_match_sklearn():
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 3, 500)
    y_pred = np.where(rng.random(500) < 0.7, y_true, rng.integers(0, 3, 500))
    # Two blocks that add up to the whole: sums are exact.
    a = FeedbackSums().add_block(Feedback(joined=300, confusion=_confusion(y_true[:300], y_pred[:300], 3)))
    a.add_block(Feedback(joined=200, confusion=_confusion(y_true[300:], y_pred[300:], 3)))
    m = metrics(a, "classification", ["a", "b", "c"])
    assert m["labels"] == 500
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=[0, 1, 2], zero_division=0)
    for i, c in enumerate(m["classes"]):
        assert c["class"] == "abc"[i] and c["support"] == s[i]
        assert (c["precision"], c["recall"], c["f1"]) == pytest.approx((p[i], r[i], f[i]))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))


def test_calibration_and_regression_figures():
    probs = np.array([0.95, 0.85, 0.85, 0.55, 0.15])
    hits = np.array([1, 1, 0, 1, 0])
    bins = np.searchsorted((0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), probs, side="left")
    counts = np.bincount(bins, minlength=10).tolist()
    hit = np.bincount(bins, weights=hits, minlength=10).astype(int).tolist()
    psum = np.bincount(bins, weights=probs, minlength=10).tolist()
    s = FeedbackSums(joined=5, confusion=[[1, 1], [1, 2]], calibration_counts=counts,
                     calibration_hits=hit, calibration_prob_sum=psum)
    cal = metrics(s, "classification", [0, 1])["calibration"]
    assert cal["labels"] == 5
    top = cal["bins"][9]
    assert top["count"] == 1 and top["observed"] == 1.0 and top["confidence"] == pytest.approx(0.95)
    assert cal["ece"] == pytest.approx(sum(abs(psum[i] - hit[i]) for i in range(10)) / 5)

    err = np.array([0.5, -1.0, 2.0])
    r = FeedbackSums(joined=3, abs_error_sum=float(np.abs(err).sum()), sq_error_sum=float((err**2).sum()),
                     error_bins=[0] * 9)
    m = metrics(r, "regression", prediction_edges=[0.0, 10.0])
    assert m["mae"] == pytest.approx(3.5 / 3) and m["rmse"] == pytest.approx(math.sqrt(5.25 / 3))
    assert m["error_bins"]["edges"][0] == pytest.approx(0.1)


def test_baseline_drop_and_policy():
    manifest = {"parity": {"chosen": "float32", "rows": 240, "variants": [
        {"variant": "int8", "metric": "accuracy", "onnx_metric": 0.5},
        {"variant": "float32", "metric": "accuracy", "onnx_metric": 0.9, "rows": 240}]}}
    base = baseline(manifest)
    assert base is not None and (base.metric, base.value, base.rows) == ("accuracy", 0.9, 240)
    sums = FeedbackSums(joined=400, confusion=[[150, 50], [50, 150]])  # 0.75 realized
    assert realized(sums, base) == (0.75, 400)
    point = bucket_point(60.0, sums, base)
    assert point.psi == pytest.approx(0.15) and point.rows == 400
    assert point.noise_psi == pytest.approx(2.576 * math.sqrt(0.9 * 0.1 / 400))
    assert baseline({"parity": {"chosen": "float32", "variants": [{"variant": "float32", "metric": None}]}}) is None
    with pytest.raises(PolicyError, match="alert_drop"):
        PerformancePolicy(warn_drop=0.1, alert_drop=0.05)
    with pytest.raises(PolicyError, match="unknown performance policy key"):
        PerformancePolicy.from_dict({"alert_dorp": 0.1})
    with pytest.raises(FeedbackMismatch):
        FeedbackSums(confusion=[[1, 0], [0, 1]]).add(FeedbackSums(confusion=[[1, 0, 0], [0, 1, 0], [0, 0, 1]]))


@pytest.mark.broker
@pytest.mark.slow
def test_agents_feedback_is_stored_exactly_and_odd_feedback_is_counted(fleet, tmp_path):
    svc = fleet.svc
    trust_key(svc, public_pem("trusted"))
    model = upload_bundle(svc, bundle_bytes("lr"))
    X, y = dataset()
    agents: dict[str, Agent] = {}
    for i in range(2):
        device_id = f"fb-{i}"
        data = tomllib.loads(provision_device(svc, device_id, {"site": "s"}, window_s=0.25).agent_config)
        data["data_dir"] = str(tmp_path / device_id)
        data["feedback"] = {"max_records": 300}  # older predictions are evicted: their truth is late
        agents[device_id] = Agent(config_from_dict(data)).start()
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.05):
            for a in agents.values():
                a.tick()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        for device_id in agents:
            assert publish_desired(svc, device_id, desired_state(svc, model["name"], model["version"]))
        wait_until(lambda: all(a.active_version() == model["version"] for a in agents.values()), 60,
                   interval=0.1, message="agents activated the bundle")
        classes = svc.storage.get_model(model["name"], model["version"])["manifest"]["outputs"]["classes"]
        rng = np.random.default_rng(7)
        expected = np.zeros((len(classes), len(classes)), dtype=int)
        sent = {"late": 0, "unknown": 0, "duplicate": 0, "rejected": 0}
        for agent in agents.values():
            stale = agent.predict(X[:50].tolist()).ids  # evicted by the 300 newer predictions below
            for _ in range(3):
                pick = rng.integers(0, len(X), 100)
                answer = agent.predict(X[pick].tolist())
                truth = y[pick].copy()
                flip = rng.random(100) < 0.3  # some wrong labels, so that the matrix is not diagonal
                truth[flip] = 1 - truth[flip]
                agent.feedback([{"id": i, "label": int(t)} for i, t in zip(answer.ids, truth, strict=True)])
                for t, p in zip(truth, answer.output.labels, strict=True):
                    expected[classes.index(int(t))][classes.index(int(p))] += 1
                agent.feedback([{"id": answer.ids[0], "label": int(truth[0])}])
                sent["duplicate"] += 1
            agent.feedback([{"id": i, "label": 0} for i in stale[:5]])
            sent["late"] += 5
            agent.feedback([{"id": f"nope-{k}", "label": 1} for k in range(4)])
            sent["unknown"] += 4
            with pytest.raises(RequestError):
                agent.feedback([{"id": "x", "label": 1, "colour": "red"}])
            sent["rejected"] += 1
            agent.feedback([{"id": agent.predict(X[:1].tolist()).ids[0], "label": 99}])  # not a class

        path = f"/api/v1/performance/{model['name']}/{model['version']}"

        def stored() -> dict:
            return fleet.api("get", path, "viewer").json()

        wait_until(lambda: stored()["counters"]["unknown_label"] == 2 and stored()["labels"] == expected.sum(),
                   30, interval=0.1, message="every feedback window stored")
        body = stored()
        assert body["confusion"] == expected.tolist()
        assert body["accuracy"] == pytest.approx(np.trace(expected) / expected.sum())
        assert body["counters"] == {"joined": int(expected.sum()), "unknown_label": 2, **sent}
        assert body["baseline"]["metric"] == "accuracy" and body["devices"] == 2
        per_device = fleet.api("get", path + "/groups?by=device", "viewer").json()["groups"]
        assert [g["scope"] for g in per_device] == ["device:fb-0", "device:fb-1"]
        assert sum(g["labels"] for g in per_device) == expected.sum()
        tag = fleet.api("get", path + "/groups?by=tag:site", "viewer").json()["groups"]
        assert tag[0]["scope"] == "tag:site=s" and tag[0]["confusion"] == expected.tolist()
        assert fleet.api("get", path + "/groups?by=colour", "viewer").status_code == 400
        listing = fleet.api("get", "/api/v1/performance", "viewer").json()["versions"]
        assert listing[0]["labels"] == expected.sum() and listing[0]["counters"]["late"] == sent["late"]
        timeline = fleet.api("get", path + "/timeline", "viewer").json()
        assert sum(p["labels"] for p in timeline["points"]) == expected.sum()
        concept = fleet.api("get", path + "/concept-drift", "viewer").json()
        assert concept["points"] and all("diagnosis" in p for p in concept["points"])
        # Feedback that joined nothing never stopped ingest or serving.
        assert all(a.predict(X[:1].tolist()).output.labels for a in agents.values())
        assert fleet.api("get", "/api/v1/performance/demo/9.9.9", "viewer").status_code == 404
    finally:
        stop.set()
        ticker.join(5)
        for a in agents.values():
            a.close()
