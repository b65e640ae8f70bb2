"""Loading .skops files: scikit-learn's reviewed internal types need no flags, everything else
still does (and the error lists exactly the flags), crafted index arrays are refused; a
reference CSV needs no label column."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import skops.io as sio
from click.testing import CliRunner
from sklearn.ensemble import (
    GradientBoostingClassifier,
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
)
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier

from edge_agent.entry import main
from model_tools.errors import EstimatorLoadError
from model_tools.load import load_estimator
from model_tools.trusted_types import (
    CHECKED_ON,
    TRUSTED_TYPES,
    applies_to,
    check_structures,
    curated_names,
)
from tests.model_fixtures import MajorityClassifier, classification_data, regression_data, split
from tests.test_model_parity import FAMILIES


def _with_nan(X, every=7):
    X = np.array(X, dtype=float)
    X[::every, 1] = np.nan
    return X


# Beyond the parity families: the variants whose internals differ (other solver, other index,
# imputer, boosting classifier), each a model edgefleet converts.
EXTRA = {
    "imputer_pipeline": (
        lambda: make_pipeline(SimpleImputer(strategy="median"), LogisticRegression()),
        lambda: (_with_nan(classification_data(n=500)[0]), classification_data(n=500)[1]),
    ),
    "imputer_forest": (
        lambda: make_pipeline(
            SimpleImputer(), RandomForestClassifier(n_estimators=5, max_depth=4, random_state=0)
        ),
        lambda: (_with_nan(classification_data(n=500)[0]), classification_data(n=500)[1]),
    ),
    "mlp_sgd": (
        lambda: make_pipeline(
            StandardScaler(), MLPClassifier(solver="sgd", max_iter=200, random_state=0)
        ),
        lambda: classification_data(n=500),
    ),
    "kneighbors_ball_tree": (
        lambda: KNeighborsClassifier(algorithm="ball_tree"),
        lambda: classification_data(n=400),
    ),
    "gradient_boosting_classifier": (
        lambda: GradientBoostingClassifier(n_estimators=10, max_depth=2, random_state=0),
        lambda: classification_data(n=500),
    ),
    "hist_gradient_boosting_regressor": (
        lambda: HistGradientBoostingRegressor(max_iter=10, random_state=0),
        lambda: regression_data(n=500),
    ),
}

ALL_FAMILIES = {
    **{name: (make, data) for name, (make, data, _) in FAMILIES.items()},
    **EXTRA,
}


def _write_csv(path, X, y=None, label="label"):
    X = np.asarray(X, dtype=object)
    names = [f"f{i}" for i in range(X.shape[1])]
    lines = [",".join(names + ([label] if y is not None else []))]
    for i, row in enumerate(X):
        cells = ["" if isinstance(v, float) and np.isnan(v) else str(v) for v in row]
        lines.append(",".join(cells + ([str(y[i])] if y is not None else [])))
    path.write_text("\n".join(lines) + "\n")
    return path


def _fit_and_dump(tmp_path, name):
    make, data = ALL_FAMILIES[name]
    X, y = data()
    est = make()
    est.fit(X) if y is None else est.fit(X, y)
    path = tmp_path / f"{name}.skops"
    sio.dump(est, path)
    return est, path, X, y


def _convert(*args):
    return CliRunner().invoke(main, ["model", "convert", *map(str, args)])


@pytest.mark.parametrize("family", sorted(ALL_FAMILIES))
def test_every_supported_family_converts_without_trust_flags(tmp_path, family):
    est, path, X, y = _fit_and_dump(tmp_path, family)
    # What skops alone would refuse, the reviewed list covers: no --trust-type needed.
    untrusted = set(sio.get_untrusted_types(file=path))
    assert untrusted <= curated_names(), untrusted - curated_names()
    sample = _write_csv(tmp_path / "sample.csv", X, y)
    out = tmp_path / "m.efb"
    result = _convert(
        path, "--sample", sample, "--name", family, "--version", "1", "--quantize", "float32",
        "--json", "-o", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] is True and out.is_file()
    loaded = load_estimator(path)
    (_, _), (X_test, _) = split(X, y, n_test=50)
    np.testing.assert_array_equal(loaded.predict(X_test), est.predict(X_test))


def _flags(message: str) -> list[str]:
    return re.findall(r"--trust-type (\S+)", message)


def test_types_outside_the_list_still_need_exactly_the_listed_flags(tmp_path):
    rng = np.random.default_rng(0)
    X = np.column_stack([rng.integers(0, 4, 400), rng.normal(size=400)]).astype(float)
    y = (X[:, 0] == 2) ^ (X[:, 1] > 0)
    # Categorical HistGradientBoosting keeps a functools.partial of check_array: not reviewed.
    est = HistGradientBoostingClassifier(max_iter=5, categorical_features=[0]).fit(X, y)
    path = tmp_path / "categorical.skops"
    sio.dump(est, path)
    expected = sorted(set(sio.get_untrusted_types(file=path)) - curated_names())
    assert expected, "this model must hold a type the list does not cover"
    with pytest.raises(EstimatorLoadError) as err:
        load_estimator(path)
    assert _flags(str(err.value)) == expected
    assert "TreePredictor" not in str(err.value)  # the reviewed part is not asked for
    with pytest.raises(EstimatorLoadError) as err:  # one flag given: only the others are asked for
        load_estimator(path, trusted_types=expected[:1])
    assert _flags(str(err.value)) == expected[1:]
    loaded = load_estimator(path, trusted_types=expected)
    np.testing.assert_array_equal(loaded.predict(X), est.predict(X))

    custom = tmp_path / "custom.skops"
    Xc, yc = classification_data(n=200)
    sio.dump(MajorityClassifier().fit(Xc, yc), custom)
    sample = _write_csv(tmp_path / "sample.csv", Xc, yc)
    args = [custom, "--sample", sample, "--name", "m", "--version", "1", "-o", tmp_path / "m.efb"]
    result = _convert(*args)
    assert result.exit_code != 0
    flags = _flags(result.output)
    assert flags == ["tests.model_fixtures.MajorityClassifier"]
    # With exactly those flags the file loads; conversion then fails for its own reason.
    result = _convert(*args, *[a for f in flags for a in ("--trust-type", f)])
    assert result.exit_code != 0
    assert "not trusted" not in result.output and "skl2onnx" in result.output


def _tree_file(tmp_path, corrupt):
    X, y = classification_data(n=300)
    est = RandomForestClassifier(n_estimators=3, max_depth=4, random_state=0).fit(X, y)
    corrupt(est.estimators_[1].tree_)  # the arrays are views of the tree's own node storage
    path = tmp_path / "forest.skops"
    sio.dump(est, path)
    return path


def _set(array, index, value):
    array[index] = value


@pytest.mark.parametrize(
    "corrupt, problem",
    [
        (lambda t: _set(t.children_left, 0, 10**6), "child indices"),
        (lambda t: _set(t.children_right, 0, 0), "child indices"),  # a cycle back to the root
        (lambda t: _set(t.children_right, 0, -1), "a node with only one child"),
        (lambda t: _set(t.feature, 0, 8), "split features"),  # the model has 8 columns
    ],
    ids=["child out of range", "cycle", "one child", "feature out of range"],
)
def test_crafted_tree_indices_are_refused(tmp_path, corrupt, problem):
    path = _tree_file(tmp_path, corrupt)
    with pytest.raises(EstimatorLoadError, match=f"malformed sklearn.tree._tree.Tree: {problem}"):
        load_estimator(path)
    # An explicit --trust-type does not switch the check off either.
    with pytest.raises(EstimatorLoadError, match="malformed"):
        load_estimator(path, trusted_types=["sklearn.tree._tree.Tree"])


def test_crafted_histogram_trees_and_neighbour_indexes_are_refused(tmp_path):
    X, y = classification_data(n=300)
    hgb = HistGradientBoostingClassifier(max_iter=3, random_state=0).fit(X, y)
    hgb._predictors[1][0].nodes["left"][0] = 10**5
    sio.dump(hgb, tmp_path / "hgb.skops")
    with pytest.raises(EstimatorLoadError, match="malformed .*TreePredictor: child indices"):
        load_estimator(tmp_path / "hgb.skops")

    hgb = HistGradientBoostingClassifier(max_iter=3, random_state=0).fit(X, y)
    internal = np.flatnonzero(hgb._predictors[0][0].nodes["is_leaf"] == 0)[0]
    hgb._predictors[0][0].nodes["feature_idx"][internal] = 50
    sio.dump(hgb, tmp_path / "hgb2.skops")
    with pytest.raises(EstimatorLoadError, match="split features outside the model's 8"):
        load_estimator(tmp_path / "hgb2.skops")

    knn = KNeighborsClassifier().fit(X, y)
    _, idx_array, node_data, _ = knn._tree.get_arrays()
    idx_array[0] = idx_array[1]  # no longer a permutation of the points
    sio.dump(knn, tmp_path / "knn.skops")
    with pytest.raises(EstimatorLoadError, match="malformed .*KDTree: the point order"):
        load_estimator(tmp_path / "knn.skops")

    knn = KNeighborsClassifier().fit(X, y)
    knn._tree.get_arrays()[2]["idx_end"][0] = 10**6
    sio.dump(knn, tmp_path / "knn2.skops")
    with pytest.raises(EstimatorLoadError, match="node point ranges"):
        load_estimator(tmp_path / "knn2.skops")


def test_check_structures_walks_nested_estimators():
    X, y = classification_data(n=300)
    pipe = make_pipeline(
        StandardScaler(), RandomForestClassifier(n_estimators=4, random_state=0)
    ).fit(X, y)
    assert check_structures(pipe) == 4  # one Tree per forest member
    tree = DecisionTreeClassifier(random_state=0).fit(X, y)
    tree.n_features_in_ = 3  # narrower than the splits: predict would read past each row
    with pytest.raises(EstimatorLoadError, match="outside the model's 3 input columns"):
        check_structures(tree)


def test_list_applies_only_to_the_reviewed_scikit_learn_range():
    import sklearn

    names = {t.name for t in TRUSTED_TYPES}
    assert len(names) == len(TRUSTED_TYPES)  # no duplicates
    assert all(t.used_by and t.why for t in TRUSTED_TYPES)
    assert applies_to(sklearn.__version__), "installed scikit-learn is outside the reviewed range"
    assert sklearn.__version__ in CHECKED_ON or applies_to(sklearn.__version__)
    assert curated_names("1.9.1") == names
    assert curated_names("1.5.0") == names
    assert curated_names("1.4.2") == frozenset()
    assert curated_names("1.10.0") == frozenset()
    assert curated_names("2.0.1") == frozenset()


def test_reference_csv_without_the_label_column_is_accepted(tmp_path):
    X, y = classification_data(n=600, n_features=4)
    est = make_pipeline(StandardScaler(), LogisticRegression()).fit(X, y)
    path = tmp_path / "m.skops"
    sio.dump(est, path)
    sample = _write_csv(tmp_path / "sample.csv", X[:400], y[:400], label="truth")
    reference = _write_csv(tmp_path / "reference.csv", X[400:])  # no label column at all
    common = [path, "--name", "m", "--version", "1", "--quantize", "float32",
              "--label-column", "truth", "--json"]  # fmt: skip
    result = _convert(*common, "--sample", sample, "--reference", reference, "-o", tmp_path / "a.efb")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["profile_rows"] == 200 and doc["parity"]["labels"] is True
    # The sample is where labels are read: a sample without the column is still refused.
    result = _convert(*common, "--sample", reference, "-o", tmp_path / "b.efb")
    assert result.exit_code != 0 and "no column 'truth'" in result.output
    # A reference that has the label column keeps it out of the features.
    labelled = _write_csv(tmp_path / "ref2.csv", X[400:], y[400:], label="truth")
    result = _convert(*common, "--sample", sample, "--reference", labelled, "-o", tmp_path / "c.efb")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["profile_rows"] == 200
