"""Server side of monitoring: merged estimate sums give the expected accuracy, precision, recall,
F1 and ROC AUC of an independent scikit-learn computation; the interval covers the realized
accuracy as often as it says; data quality sees a feature going NaN in refused rows."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.protocol import (
    Histogram,
    PerformanceEstimate,
    QualityCounts,
    RefusedRows,
    TelemetryWindow,
)
from fleet_server.data_quality import QualityPolicy, feature_quality
from fleet_server.estimation import estimated_auc, estimated_metrics, estimated_vs_realized
from fleet_server.monitoring_sums import MonitoringMismatch, MonitoringSums, sum_monitoring_rows
from model_tools.manifest import BinnedDistribution, FeatureProfile, ReferenceProfile

EDGES = np.linspace(0.05, 0.95, 19)  # 20 score bins


def _estimate(p1: np.ndarray, raw: np.ndarray) -> PerformanceEstimate:
    """What an agent sends for binary rows: calibrated positive p1, raw positive score `raw`."""
    k = (raw > 0.5).astype(int)
    p = np.column_stack([1 - p1, p1])
    conf = np.zeros((2, 2))
    for c in (0, 1):
        conf[:, c] = p[k == c].sum(axis=0)
    q = p[np.arange(len(k)), k]
    b = np.searchsorted(EDGES, raw, side="left")
    return PerformanceEstimate(
        rows=len(k), predicted=np.bincount(k, minlength=2).tolist(), confusion=conf.tolist(),
        confidence_sq_sum=float(q @ q), score_counts=np.bincount(b, minlength=20).tolist(),
        score_positive=np.bincount(b, weights=p1, minlength=20).tolist(),
    )


def _window(est=None, refused=None, device="d1") -> TelemetryWindow:
    return TelemetryWindow(device=device, seq=1, model="m", model_version="1", window_start=0.0, window_end=60.0,
                           latency=Histogram(counts=[0] * 15), estimate=est, refused=refused)


def test_estimated_metrics_equal_sklearn_on_expected_labels():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    n = 5000
    # Scores at bin midpoints, so the histogram loses nothing and ties are exactly the bins.
    mids = np.r_[0.025, (EDGES[:-1] + EDGES[1:]) / 2, 0.975]
    raw = mids[rng.integers(0, 20, n)]
    p1 = np.clip(raw + rng.normal(0, 0.05, n), 0, 1)
    halves = [_estimate(p1[:2000], raw[:2000]), _estimate(p1[2000:], raw[2000:])]
    sums = sum_monitoring_rows(MonitoringSums.of_window(_window(e)) for e in halves)
    m = estimated_metrics(sums, [0, 1])
    k = (raw > 0.5).astype(int)
    q = np.where(k == 1, p1, 1 - p1)
    assert m["rows"] == n and m["accuracy"] == pytest.approx(q.mean(), rel=1e-12)
    tp, fp = p1[k == 1].sum(), (1 - p1[k == 1]).sum()
    fn = p1[k == 0].sum()
    assert m["precision"] == pytest.approx(tp / (tp + fp), rel=1e-12)
    assert m["recall"] == pytest.approx(tp / (tp + fn), rel=1e-12)
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), rel=1e-12)
    # Each row is a positive with weight p1 and a negative with weight 1 - p1.
    auc = roc_auc_score(np.r_[np.ones(n), np.zeros(n)], np.r_[raw, raw], sample_weight=np.r_[p1, 1 - p1])
    assert m["roc_auc"] == pytest.approx(auc, rel=1e-12)
    assert m["noise"] == pytest.approx(1.96 * np.sqrt((q * (1 - q)).sum()) / n, rel=1e-9)


def test_the_interval_covers_the_realized_accuracy_as_often_as_it_says():
    rng = np.random.default_rng(1)
    covered = 0
    trials = 400
    for _ in range(trials):
        raw = rng.uniform(0, 1, 300)
        y = rng.uniform(size=300) < raw  # calibrated: P(y = 1) = raw
        m = estimated_metrics(MonitoringSums.of_window(_window(_estimate(raw, raw))), [0, 1])
        realized = ((raw > 0.5) == y).mean()
        lo, hi = m["interval"]
        covered += lo <= realized <= hi
    assert 0.92 <= covered / trials <= 0.98
    side = estimated_vs_realized(m, realized, 300)
    assert side["error"] == pytest.approx(m["accuracy"] - realized)


def test_auc_edge_cases_and_mismatched_blocks():
    assert estimated_auc([10, 0], [0.0, 0.0]) is None  # no expected positives
    assert estimated_auc([5, 5], [0.0, 5.0]) == 1.0
    assert estimated_auc([5, 5], [5.0, 0.0]) == 0.0
    a = MonitoringSums.of_window(_window(_estimate(np.array([0.2, 0.9]), np.array([0.2, 0.9]))))
    three = PerformanceEstimate(rows=1, predicted=[1, 0, 0], confusion=[[1.0, 0, 0], [0, 0, 0], [0, 0, 0]])
    with pytest.raises(MonitoringMismatch):
        a.add(MonitoringSums.of_window(_window(three)))
    assert a.est_rows == 2  # unchanged


def _profile(n_features: int, nan: int = 0) -> ReferenceProfile:
    dist = BinnedDistribution(edges=[0.0], counts=[500 - nan // 2, 500 - nan + nan // 2], nan=nan)
    return ReferenceProfile(
        rows=1000, prediction=BinnedDistribution(categories=["0", "1"], counts=[500, 500]),
        features=[FeatureProfile(name=f"p{j}", kind="numeric", distribution=dist) for j in range(n_features)],
    )


def test_a_feature_going_nan_in_refused_rows_raises_its_level_alone():
    names = ["p41", "p42", "p43"]
    # 700 accepted rows without NaN; 300 refused rows, NaN in p43.
    packed = [[350, 350, 0, 0, 0, 0] for _ in names]
    refused = RefusedRows(rows=300, features=[QualityCounts(), QualityCounts(), QualityCounts(nan=300)])
    sums = MonitoringSums.of_window(_window(refused=refused))
    q = feature_quality(_profile(3), names, 700, packed, sums)
    assert [f["level"] for f in q] == ["ok", "ok", "alert"]
    assert q[2]["nan_share"] == pytest.approx(0.3) and q[2]["nan_refused"] == 300 and q[2]["reason"] == "nan"
    # The same NaN share among accepted rows (a model that takes NaN) reads the same.
    packed_nan = [[350, 350, 0, 0, 0, 0], [350, 350, 0, 0, 0, 0], [350, 350, 300, 0, 0, 0]]
    q2 = feature_quality(_profile(3), names, 1000, packed_nan, None)
    assert [f["level"] for f in q2] == ["ok", "ok", "alert"] and q2[2]["nan_share"] == pytest.approx(0.3)
    # A reference that already had 30 % NaN: nothing new.
    q3 = feature_quality(_profile(3, nan=300), names, 1000, packed_nan, None)
    assert q3[2]["level"] == "ok"
    # Too few rows say nothing.
    assert feature_quality(_profile(3), names, 50, packed_nan, None, QualityPolicy(min_rows=100))[2]["level"] is None
