"""Monitoring end to end with real agents over the managed broker: the stored estimate sums equal
a direct computation over the rows the agents served, the multivariate row counts every row,
and a sensor going NaN in 30 % of rows raises a data-quality alert on its feature whether the
model refuses NaN or accepts it. On both storage backends."""

from __future__ import annotations

import contextlib
import threading
import tomllib
from functools import cache

import numpy as np
import pytest

from edge_agent import Agent
from edge_agent.config import config_from_dict
from edge_agent.validation import RequestError
from fleet_server.desired import publish_desired
from fleet_server.devices import provision_device
from fleet_server.registry import desired_state, trust_key, upload_bundle
from tests.agent_fixtures import bundle_bytes, dataset, keypair, public_pem
from tests.postgres_fixtures import every_backend  # noqa: F401 - SQLite and PostgreSQL
from tests.server_fixtures import wait_until

pytest_plugins = ["tests.server_fixtures"]
pytestmark = [pytest.mark.broker, pytest.mark.slow]

SENSOR = 3  # the feature whose sensor fails


@cache
def nan_tolerant_bundle() -> bytes:
    """The same data through an imputing pipeline, with NaN in its sample: it accepts NaN."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from model_tools.pipeline import build_bundle

    X, y = dataset()
    est = make_pipeline(SimpleImputer(strategy="median"), LogisticRegression()).fit(X[:800], y[:800])
    sample = X[:800].copy()
    sample[::97, :] = np.nan  # NaN in every column declares that the model takes it
    return build_bundle(est, (sample, y[:800]), validation=(X[800:], y[800:]), name="demo", version="1.0.0",
                        quantize="float32", sign_key=keypair()[0]).bundle_bytes


def _expected(manifest: dict, served: list[tuple[int, list[float]]]) -> tuple[float, list[list[float]]]:
    """Σ calibrated probability of the predicted class, and the expected confusion, by np.interp."""
    classes = manifest["outputs"]["classes"]
    cal = manifest["estimation"]["calibration"]
    hits = 0.0
    conf = np.zeros((2, 2))
    for label, probs in served:
        p1 = np.interp(probs[1], cal["knots"][0], cal["values"][0]) if cal["applied"] else probs[1]
        p = np.array([1 - p1, p1])
        k = classes.index(label)
        hits += p[k]
        conf[:, k] += p
    return hits, conf.tolist()


@pytest.mark.parametrize("refuses_nan", [True, False], ids=["refuses-nan", "accepts-nan"])
def test_estimate_sums_and_a_failing_sensor_end_to_end(fleet, tmp_path, refuses_nan):
    svc = fleet.svc
    trust_key(svc, public_pem("trusted"))
    model = upload_bundle(svc, bundle_bytes("lr") if refuses_nan else nan_tolerant_bundle())
    manifest = svc.storage.get_model(model["name"], model["version"])["manifest"]
    assert manifest["inputs"][SENSOR]["allow_nan"] is not refuses_nan
    agents: dict[str, Agent] = {}
    for device_id, site in (("mon-ok", "a"), ("mon-nan", "b")):
        data = tomllib.loads(provision_device(svc, device_id, {"site": site}, window_s=0.25).agent_config)
        data["data_dir"] = str(tmp_path / device_id)
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
        X, _ = dataset()
        rng = np.random.default_rng(3)
        served: dict[str, list[tuple[int, list[float]]]] = {d: [] for d in agents}
        nan_rows = refused = 0
        # Four one-second buckets of single-row requests; the failing sensor sends NaN in 30 %.
        deadline = svc.clock() + 4.5
        while svc.clock() < deadline:
            for device_id, agent in agents.items():
                for _ in range(40):
                    row = X[rng.integers(0, len(X))].tolist()
                    if device_id == "mon-nan" and rng.random() < 0.3:
                        row[SENSOR] = float("nan")
                        nan_rows += 1
                    try:
                        out = agent.predict([row]).output
                    except RequestError as exc:
                        assert exc.kind == "nan_not_allowed"
                        refused += 1
                        continue
                    served[device_id].append((out.labels[0], out.probabilities[0]))
        assert (refused == nan_rows) is refuses_nan and nan_rows > 0
        total = sum(len(v) for v in served.values())
        base = f"/api/v1/performance/{model['name']}/{model['version']}/estimated"

        def estimate(scope: str = "fleet") -> dict:
            return fleet.api("get", f"{base}?scope={scope}", "viewer").json()

        wait_until(lambda: estimate()["rows"] == total, 30, interval=0.1, message="every window stored")
        body = estimate()
        hits, conf = _expected(manifest, served["mon-ok"] + served["mon-nan"])
        assert body["accuracy"] == pytest.approx(hits / total, rel=1e-9)
        assert np.allclose(body["per_class"][1]["support"], conf[1][0] + conf[1][1], rtol=1e-9)
        assert body["realized"]["labels"] == 0 and body["interval"][0] < body["accuracy"] < body["interval"][1]
        assert body["roc_auc"] is not None and "concept shift" in body["assumption"]
        one = estimate("device:mon-ok")
        assert one["rows"] == len(served["mon-ok"])
        assert one["accuracy"] == pytest.approx(_expected(manifest, served["mon-ok"])[0] / len(served["mon-ok"]),
                                                rel=1e-9)
        groups = fleet.api("get", f"{base}/groups?by=tag:site", "viewer").json()["groups"]
        assert [g["rows"] for g in groups] == [len(served["mon-ok"]), len(served["mon-nan"])]
        timeline = fleet.api("get", f"{base}/timeline", "viewer").json()["points"]
        assert sum(p["rows"] for p in timeline) == total

        drift_path = f"/api/v1/models/{model['name']}/{model['version']}/drift"
        drift = fleet.api("get", f"{drift_path}?scope=device:mon-nan", "viewer").json()
        assert drift["multivariate"]["rows"] == len(served["mon-nan"])
        quality = drift["quality"]
        sensor = quality[SENSOR]
        assert sensor["nan"] == nan_rows and sensor["nan_refused"] == (nan_rows if refuses_nan else 0)
        assert sensor["nan_share"] == pytest.approx(nan_rows / (len(served["mon-nan"]) + refused))
        assert sensor["level"] == "alert" and sensor["reason"] == "nan"
        assert all(q["level"] == "ok" for q in quality if q["index"] != SENSOR)
        clean = fleet.api("get", f"{drift_path}?scope=device:mon-ok", "viewer").json()["quality"]
        assert all(q["level"] == "ok" for q in clean)

        def quality_alerts() -> list[dict]:
            return fleet.api("get", "/api/v1/alerts?kind=quality&state=open", "viewer").json()["alerts"]

        wait_until(lambda: any(a["scope"] == "device:mon-nan" for a in quality_alerts()), 30, interval=0.2,
                   message="a data-quality alert on the failing sensor")
        mine = [a for a in quality_alerts() if a["scope"] == "device:mon-nan"]
        assert {a["target"] for a in mine} == {manifest["inputs"][SENSOR]["name"]}
        assert not [a for a in quality_alerts() if a["scope"] == "device:mon-ok"]
    finally:
        stop.set()
        ticker.join(5)
        for a in agents.values():
            a.close()


def test_a_covariate_shift_that_leaves_the_model_unsure_raises_an_estimated_alert(fleet, tmp_path):
    """Rows pulled towards the decision boundary: no label is sent, yet the estimate drops below the
    validation accuracy and an `estimated` alert opens for that device only."""
    svc = fleet.svc
    trust_key(svc, public_pem("trusted"))
    model = upload_bundle(svc, bundle_bytes("lr"))
    baseline = svc.storage.get_model(model["name"], model["version"])["manifest"]["estimation"]
    agents: dict[str, Agent] = {}
    for device_id in ("est-ok", "est-shifted"):
        data = tomllib.loads(provision_device(svc, device_id, {}, window_s=0.25).agent_config)
        data["data_dir"] = str(tmp_path / device_id)
        agents[device_id] = Agent(config_from_dict(data)).start()
    stop = threading.Event()
    X, _ = dataset()
    # Standardised inputs shrunk towards the training mean: the same features, an unsure model.
    mean, std = X[:800].mean(axis=0), X[:800].std(axis=0)
    shifted = mean + (X - mean) * 0.15 + np.random.default_rng(5).normal(0, 0.05, X.shape) * std

    def traffic() -> None:
        rng = np.random.default_rng(4)
        while not stop.wait(0.02):
            for device_id, agent in agents.items():
                rows = (shifted if device_id == "est-shifted" else X)[rng.integers(0, len(X), 40)]
                with contextlib.suppress(Exception):  # no model yet
                    agent.predict(rows.tolist())
                agent.tick()

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        for device_id in agents:
            assert publish_desired(svc, device_id, desired_state(svc, model["name"], model["version"]))

        def estimated_alerts() -> list[dict]:
            return fleet.api("get", "/api/v1/alerts?kind=estimated&state=open", "viewer").json()["alerts"]

        wait_until(lambda: any(a["scope"] == "device:est-shifted" for a in estimated_alerts()), 60, interval=0.2,
                   message="an estimated-performance alert for the shifted device")
        alert = next(a for a in estimated_alerts() if a["scope"] == "device:est-shifted")
        assert alert["target"] == "estimated_accuracy" and alert["details"]["drop"] > 0.05
        assert alert["details"]["estimated"] < baseline["reference_accuracy"]
        assert not [a for a in estimated_alerts() if a["scope"] == "device:est-ok"]
        assert fleet.api("get", "/api/v1/alerts?kind=performance", "viewer").json()["alerts"] == []
    finally:
        stop.set()
        thread.join(5)
        for a in agents.values():
            a.close()
