"""Reference profile, golden set and runtime budget are present and plausible."""

from __future__ import annotations

import numpy as np
from sklearn.ensemble import GradientBoostingRegressor
from sklearn.linear_model import LogisticRegression

from model_tools.bundle import read_bundle
from model_tools.manifest import FeatureSpec
from model_tools.pipeline import build_bundle
from model_tools.profile import build_profile
from tests.model_fixtures import classification_data, mixed_data, regression_data


def total(dist) -> int:
    return sum(dist.counts) + dist.nan


def test_profile_counts_add_up_for_classification():
    X, y = classification_data(n=1500)
    est = LogisticRegression().fit(X, y)
    result = build_bundle(est, (X, y), name="c", version="1", reference=(X[:1200], y[:1200]))
    profile = result.manifest.profile
    assert profile.rows == 1200
    for feature in profile.features:
        assert total(feature.distribution) == 1200
        assert len(feature.distribution.counts) == len(feature.distribution.edges) + 1
    assert profile.prediction.categories == ["0", "1"] and total(profile.prediction) == 1200
    assert profile.warnings == [] or all("per bin" not in w for w in profile.warnings)


def test_profile_regression_bins_and_small_reference_warning():
    X, y = regression_data(n=400)
    est = GradientBoostingRegressor(n_estimators=10).fit(X, y)
    result = build_bundle(est, (X, y), name="r", version="1")
    profile = result.manifest.profile
    assert profile.rows == 400 and total(profile.prediction) == 400
    assert len(profile.prediction.edges) == 9
    assert any("< 1000" in w for w in profile.warnings)
    assert any("rows per bin" in w for w in profile.warnings)
    assert any("< 1000" in w for w in result.warnings)


def test_profile_categorical_and_nan_and_out_of_range():
    specs = [
        FeatureSpec(name="t", kind="numeric", dtype="float64", min=0.0, max=10.0, allow_nan=True),
        FeatureSpec(name="c", kind="categorical", dtype="string", categories=["a", "b"]),
    ]
    rows = np.array(
        [[1.0, "a"], [np.nan, "b"], [20.0, "zzz"], [-1.0, "a"], [5.0, "a"]], dtype=object
    )
    profile = build_profile(specs, rows, np.array([0.1, 0.2, 0.3, 0.4, 0.5]), "regression")
    num, cat = profile.features
    assert num.distribution.nan == 1 and total(num.distribution) == 5
    assert num.distribution.below_min == 1 and num.distribution.above_max == 1
    assert cat.distribution.categories == ["a", "b", "zzz"] and cat.distribution.counts == [
        3,
        1,
        1,
        0,
    ]


def test_mixed_profile_top_categories():
    X, y = mixed_data(n=500)
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    ct = ColumnTransformer([("n", StandardScaler(), [0, 1]), ("c", OneHotEncoder(), [2])])
    est = make_pipeline(ct, LogisticRegression()).fit(X, y)
    profile = build_bundle(est, (X, y), name="m", version="1").manifest.profile
    colour = profile.features[2]
    assert colour.kind == "categorical" and set(colour.distribution.categories) == {
        "red",
        "green",
        "blue",
        "dark grey",
    }
    assert total(colour.distribution) == 500


def test_golden_and_budget_plausible():
    X, y = classification_data(n=600)
    est = LogisticRegression().fit(X, y)
    result = build_bundle(est, (X, y), name="g", version="1", quantize="float32")
    bundle = read_bundle(result.bundle_bytes, require_signature=False)
    assert bundle.golden["input:X"].shape == (32, 8)
    assert bundle.golden["output:probabilities"].shape == (32, 2)
    np.testing.assert_allclose(bundle.golden["output:probabilities"].sum(axis=1), 1.0, atol=1e-5)
    b = bundle.manifest.budget
    assert b.model_bytes == len(bundle.model_bytes)
    assert 0 < b.latency_ms_p50 <= b.latency_ms_p99 < 1000
    assert b.peak_memory_bytes >= b.model_bytes
    lineage = bundle.manifest.lineage
    assert lineage["final_estimator"] == "LogisticRegression" and lineage["versions"]["skl2onnx"]
    assert len(lineage["sample_sha256"]) == 64
