"""IsolationForest through the custom converter: one TreeEnsembleRegressor, sklearn's answers."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.ensemble import IsolationForest
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from model_tools.bundle import read_bundle
from model_tools.convert import op_types
from model_tools.converters.isolation_forest import ALIAS, float32_at_most
from model_tools.pipeline import build_bundle
from model_tools.signing import generate_keypair
from tests.model_fixtures import bundle_predict, classification_data, split

# Decision values are computed in float32 after a float32 sum over the trees; sklearn's are
# float64. Labels may only differ for rows this close to the threshold 0.
DECISION_ATOL = 1e-5


def _blobs(n: int = 1200, n_features: int = 6, seed: int = 1):
    """Gaussian inliers plus 5 % scattered outliers."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, n_features))
    outliers = rng.random(n) < 0.05
    X[outliers] = rng.uniform(-6, 6, size=(outliers.sum(), n_features))
    return X, None


def _classification():
    return classification_data(n=1000, n_features=10)[0], None


def _with_nan():
    X, _ = _blobs(n=1000, n_features=5, seed=2)
    rng = np.random.default_rng(3)
    X[rng.random(X.shape) < 0.03] = np.nan
    return X, None


# case -> (estimator factory, data factory)
CASES = {
    "defaults": (lambda: IsolationForest(n_estimators=50, random_state=0), _blobs),
    "max_features_half": (
        lambda: IsolationForest(n_estimators=50, max_features=0.5, random_state=0),
        _classification,
    ),
    "max_samples_int_contamination": (
        lambda: IsolationForest(
            n_estimators=50, max_samples=128, contamination=0.1, random_state=0
        ),
        _blobs,
    ),
    "bootstrap_subsampled_features": (
        lambda: IsolationForest(
            n_estimators=40,
            max_samples=200,
            max_features=0.5,
            bootstrap=True,
            contamination=0.1,
            random_state=1,
        ),
        _classification,
    ),
    "missing_values": (
        lambda: IsolationForest(n_estimators=40, max_features=0.6, random_state=0),
        _with_nan,
    ),
    "pipeline": (
        lambda: make_pipeline(
            StandardScaler(), IsolationForest(n_estimators=30, contamination=0.05, random_state=0)
        ),
        _classification,
    ),
}


@pytest.fixture(scope="module")
def keys():
    return generate_keypair()


@pytest.mark.parametrize("case", sorted(CASES))
def test_bundle_matches_sklearn(case, keys):
    make_estimator, make_data = CASES[case]
    X, y = make_data()
    (X_train, _), (X_test, _) = split(X, y, n_test=300)
    est = make_estimator().fit(X_train)
    private, public = keys
    result = build_bundle(
        est, X_train, validation=X_test, name=case, version="1.0.0", sign_key=private
    )
    bundle = read_bundle(result.bundle_bytes, [public])
    m = bundle.manifest

    assert m.task == "anomaly"
    assert (m.outputs.label, m.outputs.value) == ("label", "scores")
    assert op_types(bundle.model_bytes).get("TreeEnsembleRegressor") == 1

    got = bundle_predict(bundle, X_test)
    assert got["label"].shape == got["scores"].shape == (len(X_test), 1)
    assert got["label"].dtype == np.int64
    decision = est.decision_function(X_test)
    diff = np.abs(got["scores"].ravel().astype(np.float64) - decision)
    assert diff.max() <= DECISION_ATOL, (case, diff.max())

    mismatched = got["label"].ravel() != est.predict(X_test)
    near_threshold = np.abs(decision) <= DECISION_ATOL
    assert not np.any(mismatched & ~near_threshold), case
    assert mismatched.sum() <= near_threshold.sum() <= 2, (case, near_threshold.sum())

    chosen = next(r for r in result.parity if r.variant == result.chosen)
    assert chosen.passed and chosen.agreement >= 1.0 - near_threshold.mean()


def test_skl2onnx_maps_isolation_forest_to_the_custom_converter():
    from skl2onnx._supported_operators import sklearn_operator_name_map

    from model_tools.converters import register_converters

    register_converters()
    assert sklearn_operator_name_map[IsolationForest] == ALIAS


def test_thresholds_rounded_down_keep_comparisons_exact():
    rng = np.random.default_rng(0)
    thresholds = rng.normal(size=20_000)
    # The float32 neighbours of each threshold are where float32 rounding could flip `<=`.
    t32 = thresholds.astype(np.float32)
    x = np.concatenate([t32, np.nextafter(t32, np.float32(np.inf)),
                        np.nextafter(t32, np.float32(-np.inf))])  # fmt: skip
    t = np.tile(thresholds, 3)
    assert np.array_equal(x.astype(np.float64) <= t, x <= float32_at_most(t))
    # Plain rounding to nearest would send some of these rows down the wrong branch.
    assert np.any((x <= np.tile(t32, 3)) != (x.astype(np.float64) <= t))
