"""Label-free performance sums, reconstruction errors and refused-row counts of telemetry
windows, against an independent numpy/scikit-learn computation over the same rows; the
calibration map's choice; old and new wire formats reading each other."""

from __future__ import annotations

from functools import cache

import msgspec
import numpy as np
import pytest

from edge_agent.protocol import Histogram, RefusedRows, Resources, TelemetryWindow, decode, encode
from edge_agent.runtime import ModelRuntime
from edge_agent.telemetry import Telemetry
from model_tools.bundle import read_bundle
from model_tools.calibration import expected_calibration_error, fit_calibration
from tests.agent_fixtures import bundle_bytes, dataset

TOL = 1e-9


def _window(manifest, rt: ModelRuntime, rows: list[list[float]], batch: int):
    """Serve `rows` through Telemetry the way the agent does, single rows and batches mixed:
    the window, and the labels and probabilities the model gave (float32 outputs move by an ulp
    with the batch size, so the independent computation starts from the same ones)."""
    t = Telemetry("d", clock=lambda: 0.0, sample_rows=0)
    t.set_model(manifest)
    labels, probs = [], []
    i = 0
    while i < len(rows):
        n = 1 if (i // batch) % 2 == 0 else batch
        part = rows[i : i + n]
        out = rt.run(rt.feeds(part))
        t.record(part, out.primary, 1e-5, out.probabilities)
        labels += out.labels
        probs += out.probabilities
        i += n
    return t.flush(1.0, 1, Resources(), 0, manifest.name), labels, np.asarray(probs, dtype=np.float64)


def _independent_estimate(manifest, labels, raw):
    """Expected confusion, squared confidences and score histogram, row by row with np.interp."""
    classes = [str(c) for c in manifest.outputs.classes]
    c = len(classes)
    cal = manifest.estimation.calibration
    conf = np.zeros((c, c))
    predicted = np.zeros(c, dtype=int)
    sq = 0.0
    edges = manifest.estimation.score_edges
    hist_n = np.zeros(len(edges) + 1 if edges is not None else 0, dtype=int)
    hist_p = np.zeros(len(hist_n))
    for label, r in zip(labels, raw, strict=True):
        p = r.copy()
        if cal.applied:
            for col, xs, ys in zip(cal.columns, cal.knots, cal.values, strict=True):
                p[col] = np.interp(r[col], xs, ys)
            if c == 2:
                p[0] = 1.0 - p[1]
            else:
                p = p / p.sum()
        k = classes.index(str(label))
        predicted[k] += 1
        conf[:, k] += p
        sq += p[k] ** 2
        if edges is not None:
            b = int(np.searchsorted(edges, r[1], side="left"))
            hist_n[b] += 1
            hist_p[b] += p[1]
    return predicted, conf, sq, hist_n, hist_p


def _sklearn_errors(manifest, reference: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Reconstruction errors by scikit-learn: median imputer, StandardScaler, PCA(0.65)."""
    from sklearn.decomposition import PCA
    from sklearn.impute import SimpleImputer
    from sklearn.preprocessing import StandardScaler

    mv = manifest.profile.multivariate
    cols = mv.features
    imp = SimpleImputer(strategy="median").fit(reference[:, cols])
    sc = StandardScaler().fit(imp.transform(reference[:, cols]))
    pca = PCA(n_components=mv.variance_target, svd_solver="full").fit(sc.transform(imp.transform(reference[:, cols])))
    z = sc.transform(imp.transform(rows[:, cols]))
    back = pca.inverse_transform(pca.transform(z))
    assert pca.n_components_ == len(mv.components)
    return np.sqrt(((z - back) ** 2).sum(axis=1))


def _check_window(manifest, rt, rows, reference, batch):
    w, labels, raw = _window(manifest, rt, rows, batch)
    predicted, conf, sq, hist_n, hist_p = _independent_estimate(manifest, labels, raw)
    est = w.estimate
    assert est is not None and est.rows == len(rows)
    assert est.predicted == predicted.tolist()
    np.testing.assert_allclose(est.confusion, conf, rtol=TOL, atol=TOL)
    assert est.confidence_sq_sum == pytest.approx(sq, rel=TOL)
    if manifest.estimation.score_edges is not None:
        assert est.score_counts == hist_n.tolist()
        np.testing.assert_allclose(est.score_positive, hist_p, rtol=TOL, atol=TOL)
    err = _sklearn_errors(manifest, reference, np.asarray(rows))
    mv = w.multivariate
    assert mv is not None and mv.rows == len(rows) and mv.filled == 0
    assert mv.sum == pytest.approx(err.sum(), rel=TOL)
    assert mv.sum_sq == pytest.approx((err**2).sum(), rel=TOL)
    edges = manifest.profile.multivariate.edges
    assert mv.bins == np.bincount(np.searchsorted(edges, err, side="left"), minlength=len(edges) + 1).tolist()
    # Every field survives the wire exactly.
    again = decode("telemetry", encode(w))
    assert again.estimate == est and again.multivariate == mv
    return w


def test_binary_sums_equal_an_independent_computation():
    data = bundle_bytes("lr")
    bundle = read_bundle(data, require_signature=False)
    manifest, rt = bundle.manifest, ModelRuntime(bundle)
    X, y = dataset()
    assert manifest.estimation is not None and manifest.estimation.score_edges
    # The shipped table is the isotonic fit of the validation labels, read at its knots.
    from sklearn.isotonic import IsotonicRegression

    cal = manifest.estimation.calibration
    assert cal.source == "validation" and cal.rows == 400 and cal.columns == [1]
    probs = np.asarray(rt.run(rt.feeds(X[800:].tolist())).probabilities)
    if cal.applied:
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(probs[:, 1], y[800:] == 1)
        np.testing.assert_allclose(cal.values[0], np.maximum.accumulate(iso.predict(cal.knots[0])), atol=TOL)
    # Reference edges are the deciles of scikit-learn's errors on the reference (the sample).
    ref = X[:800]
    np.testing.assert_allclose(
        manifest.profile.multivariate.edges,
        np.unique(np.quantile(_sklearn_errors(manifest, ref, ref), np.linspace(0, 1, 11)[1:-1])),
        rtol=TOL,
    )
    rows = X[800:].tolist()
    _check_window(manifest, rt, rows, ref, batch=7)


@cache
def _multiclass_bundle() -> bytes:
    from sklearn.datasets import make_classification
    from sklearn.naive_bayes import GaussianNB

    from model_tools.pipeline import build_bundle

    X, y = make_classification(n_samples=2400, n_features=8, n_informative=5, n_redundant=2, n_classes=3,
                               random_state=3)
    est = GaussianNB().fit(X[:1600], y[:1600])
    return build_bundle(est, (X[:1600], y[:1600]), validation=(X[1600:2000], y[1600:2000]),
                        training=(X[:1600], y[:1600]), name="nb3", version="1", quantize="float32").bundle_bytes


def test_multiclass_sums_with_a_cross_validated_calibration_map():
    from sklearn.datasets import make_classification

    bundle = read_bundle(_multiclass_bundle(), require_signature=False)
    manifest, rt = bundle.manifest, ModelRuntime(bundle)
    cal = manifest.estimation.calibration
    # Naive Bayes on redundant features is overconfident: calibrating must help, and does.
    assert cal.source == "cross_validation" and cal.rows == 1600 and cal.columns == [0, 1, 2]
    assert cal.applied and cal.ece_calibrated < cal.ece_raw
    assert manifest.estimation.score_edges is None
    X, _ = make_classification(n_samples=2400, n_features=8, n_informative=5, n_redundant=2, n_classes=3,
                               random_state=3)
    w = _check_window(manifest, rt, X[2000:].tolist(), X[:1600], batch=5)
    assert sum(w.estimate.predicted) == 400
    np.testing.assert_allclose(np.sum(w.estimate.confusion), 400, rtol=TOL)


def test_calibration_is_chosen_only_where_it_lowers_held_out_ece():
    rng = np.random.default_rng(1)
    n = 3000
    p = rng.uniform(0.02, 0.98, n)
    y = (rng.uniform(size=n) < p).astype(int)
    # Calibrated scores: a map fitted on four folds does worse on the fifth than no map.
    honest = fit_calibration(np.column_stack([1 - p, p]), y, "validation")
    assert not honest.applied and honest.knots == [] and honest.ece_calibrated >= honest.ece_raw
    assert "does not lower" in honest.reason
    # Overconfident scores (logit x 3): the map helps by a wide margin, and is kept.
    q = 1 / (1 + np.exp(-3 * np.log(p / (1 - p))))
    over = fit_calibration(np.column_stack([1 - q, q]), y, "validation")
    assert over.applied and over.ece_calibrated < over.ece_raw / 2
    # Scores that are already exactly right cannot get better.
    exact = fit_calibration(np.column_stack([1 - y, y]).astype(float), y, "validation")
    assert not exact.applied and exact.ece_raw == 0.0
    # The ECE it reports is the class-wise, ten-bin one.
    assert expected_calibration_error(np.column_stack([1 - p, p]), y, [1]) == pytest.approx(
        sum(abs(p[b].sum() - y[b].sum()) for b in
            [np.clip(np.ceil(p * 10) - 1, 0, 9) == i for i in range(10)]) / n
    )
    # Too few labels: no map, and the manifest says why.
    few = fit_calibration(np.column_stack([1 - q, q])[:50], y[:50], "validation")
    assert not few.applied and "50 labelled rows" in few.reason


def test_a_model_without_labels_ships_raw_probabilities_and_says_so():
    from sklearn.linear_model import LogisticRegression

    from model_tools.pipeline import build_bundle

    X, y = dataset()
    est = LogisticRegression().fit(X[:800], y[:800])
    m = build_bundle(est, X[:800], validation=X[800:], name="u", version="1", quantize="float32").manifest
    assert m.estimation is not None and not m.estimation.calibration.applied
    assert m.estimation.calibration.source == "none" and "no labelled data" in m.estimation.calibration.reason


def test_refused_rows_count_into_per_feature_quality():
    bundle = read_bundle(bundle_bytes("lr"), require_signature=False)
    manifest = bundle.manifest
    names = manifest.feature_names
    t = Telemetry("d", clock=lambda: 0.0, sample_rows=0)
    t.set_model(manifest)
    lo, hi = manifest.inputs[2].min, manifest.inputs[2].max
    rows = [
        [float("nan"), 0.0, lo - 1.0, 0.0, 0.0, 0.0],
        [None, "warm", hi + 1.0, 0.0, 0.0, 0.0],
        {names[0]: 1.0, names[2]: 0.0},  # four features missing
        [1.0, 2.0],  # malformed
        "not a row",  # malformed
    ]
    t.record_error("nan_not_allowed", names[0], rows)
    t.record_error("runtime_error", None, [[0.0] * 6])  # a model failure says nothing about the data
    t.record_error("no_model")
    w = t.flush(1.0, 1, Resources(), 0, "demo")
    assert w.errors == {"nan_not_allowed": 1, "runtime_error": 1, "no_model": 1}
    r = w.refused
    assert r is not None and r.rows == 5 and r.malformed == 2
    got = [(f.nan, f.below_min, f.above_max, f.wrong_type, f.unseen) for f in r.features]
    assert got == [(2, 0, 0, 0, 0), (1, 0, 0, 1, 0), (0, 1, 1, 0, 0)] + [(1, 0, 0, 0, 0)] * 3
    # Refused rows are never binned.
    assert all(sum(f.bins) == 0 and f.nan == 0 for f in w.features)
    assert w.estimate is None and w.multivariate is None
    # A window without refusals carries none.
    assert t.flush(2.0, 2, Resources(), 0, "demo").refused is None


def test_old_and_new_telemetry_read_each_other():
    class OldWindow(msgspec.Struct, kw_only=True):  # the window as servers before these fields read it
        v: int
        device: str
        seq: int
        predictions: int = 0

    new = TelemetryWindow(
        device="d", seq=3, model="m", model_version="1", window_start=0.0, window_end=1.0,
        latency=Histogram(counts=[0] * 15),
        predictions=4, refused=RefusedRows(rows=1, features=[]),
    )
    payload = encode(new)
    old = msgspec.json.decode(payload, type=OldWindow)
    assert (old.seq, old.predictions) == (3, 4)
    # An old agent's window (none of the new fields) decodes with them absent.
    legacy = msgspec.json.encode({k: v for k, v in msgspec.to_builtins(new).items()
                                  if k not in ("estimate", "multivariate", "refused")})
    back = decode("telemetry", legacy)
    assert back.estimate is None and back.multivariate is None and back.refused is None


def test_a_manifest_whose_monitoring_numbers_do_not_fit_turns_those_parts_off():
    from edge_agent.monitoring import Monitor

    manifest = read_bundle(bundle_bytes("lr"), require_signature=False).manifest
    mv = manifest.profile.multivariate
    bad_mv = msgspec.structs.replace(mv, components=[row[:-1] for row in mv.components])
    est = manifest.estimation
    bad_cal = msgspec.structs.replace(est.calibration, applied=True, columns=[1], knots=[[0.0, 1.0]], values=[[0.0]])
    broken = msgspec.structs.replace(
        manifest,
        profile=msgspec.structs.replace(manifest.profile, multivariate=bad_mv),
        estimation=msgspec.structs.replace(est, calibration=bad_cal),
    )
    monitor = Monitor(broken)
    assert monitor.reconstruction is None and not monitor.estimating
    assert len(monitor.problems) == 2
    t = Telemetry("d", clock=lambda: 0.0, sample_rows=0)
    t.set_model(broken)
    t.record([[0.0] * 6], [1], 1e-5, [[0.4, 0.6]])
    w = t.flush(1.0, 1, Resources(), 0, "demo")
    assert w.predictions == 1 and w.estimate is None and w.multivariate is None
    assert Monitor(manifest).problems == []


def test_the_agent_sends_estimate_multivariate_and_refused_rows(tmp_path):
    from edge_agent import Agent, RequestError
    from tests.agent_fixtures import install_active, make_config, outbox_windows

    data = bundle_bytes("lr")
    bundle = read_bundle(data, require_signature=False)
    config = make_config(tmp_path, telemetry={"window_s": 3600})
    install_active(config.path, data)
    agent = Agent(config, link_mode="none").start()
    try:
        X, _ = dataset()
        served = []
        for i in range(40):
            out = agent.predict([X[i].tolist()]).output
            served.append((out.labels[0], out.probabilities[0]))
        batch = agent.predict(X[40:72].tolist()).output
        served += list(zip(batch.labels, batch.probabilities, strict=True))
        bad = X[72].tolist()
        bad[2] = float("nan")
        with pytest.raises(RequestError):
            agent.predict([X[73].tolist(), bad])
        agent._flush_window(agent.clock())
        windows = [w for w in outbox_windows(agent) if w.predictions or w.refused]
        assert len(windows) == 1
        w = windows[0]
        labels = [label for label, _ in served]
        raw = np.asarray([p for _, p in served])
        predicted, conf, sq, hist_n, hist_p = _independent_estimate(bundle.manifest, labels, raw)
        assert w.estimate.rows == 72 and w.estimate.predicted == predicted.tolist()
        np.testing.assert_allclose(w.estimate.confusion, conf, rtol=TOL, atol=TOL)
        assert w.estimate.score_counts == hist_n.tolist()
        assert w.multivariate.rows == 72
        assert w.refused.rows == 2 and [f.nan for f in w.refused.features] == [0, 0, 1, 0, 0, 0]
    finally:
        agent.close()
