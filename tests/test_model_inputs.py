"""Bad input gets a clear error: data that does not fit, unfitted or unsupported models, unsafe files."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import skops.io as sio
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from model_tools.errors import ConversionError, EstimatorLoadError, InputDataError
from model_tools.load import load_estimator
from model_tools.pipeline import build_bundle
from model_tools.schema import inspect_estimator, read_table
from tests.model_fixtures import MajorityClassifier, classification_data, mixed_data


@pytest.fixture(scope="module")
def fitted():
    X, y = classification_data(n=400, n_features=4)
    return make_pipeline(StandardScaler(), LogisticRegression()).fit(X, y), X, y


def write_csv(path, header, rows):
    path.write_text(
        "\n".join([",".join(header)] + [",".join(str(v) for v in r) for r in rows]) + "\n"
    )
    return path


def test_csv_with_label_column_is_read(tmp_path, fitted):
    est, X, y = fitted
    path = write_csv(
        tmp_path / "s.csv",
        ["a", "b", "c", "d", "label"],
        [[*x, t] for x, t in zip(X, y, strict=True)],
    )
    table = read_table(path, inspect_estimator(est))
    assert table.names == ["a", "b", "c", "d"] and table.n_rows == 400
    assert np.array_equal(table.labels, y) and table.sha256


def test_wrong_column_count(tmp_path, fitted):
    est, X, _ = fitted
    path = write_csv(tmp_path / "s.csv", ["a", "b", "c"], X[:, :3].tolist())
    with pytest.raises(InputDataError, match="3 feature columns but the model expects 4"):
        build_bundle(est, path, name="m", version="1")


def test_wrong_column_count_in_array(fitted):
    est, X, y = fitted
    with pytest.raises(InputDataError, match="5 feature columns but the model expects 4"):
        build_bundle(est, (np.hstack([X, X[:, :1]]), y), name="m", version="1")


def test_ragged_csv_row(tmp_path, fitted):
    est, X, _ = fitted
    path = tmp_path / "s.csv"
    path.write_text("a,b,c,d\n1,2,3,4\n1,2,3\n")
    with pytest.raises(InputDataError, match="line 3: 3 values but the header has 4"):
        read_table(path, inspect_estimator(est))


def test_non_numeric_value_in_numeric_column(tmp_path, fitted):
    est, X, _ = fitted
    rows = X[:50].tolist()
    rows[7][2] = "warm"
    path = write_csv(tmp_path / "s.csv", ["a", "b", "c", "d"], rows)
    with pytest.raises(InputDataError, match=r"column 'c', row 9: 'warm' is not a number"):
        build_bundle(est, path, name="m", version="1")


def test_empty_sample(tmp_path, fitted):
    est, _, _ = fitted
    path = write_csv(tmp_path / "s.csv", ["a", "b", "c", "d"], [])
    with pytest.raises(InputDataError, match="has no rows"):
        build_bundle(est, path, name="m", version="1")
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(InputDataError, match="is empty"):
        build_bundle(est, tmp_path / "e.csv", name="m", version="1")


def test_npz_pairs_and_npy(tmp_path, fitted):
    est, X, y = fitted
    np.savez(tmp_path / "d.npz", X=X, y=y)
    np.save(tmp_path / "d.npy", X)
    schema = inspect_estimator(est)
    assert read_table(tmp_path / "d.npz", schema).labels is not None
    assert read_table(tmp_path / "d.npy", schema).labels is None
    np.save(tmp_path / "o.npy", X.astype(object))
    with pytest.raises(InputDataError, match="pickle runs code"):
        read_table(tmp_path / "o.npy", schema)


def test_mixed_csv_keeps_strings(tmp_path):
    from sklearn.compose import ColumnTransformer
    from sklearn.preprocessing import OneHotEncoder

    X, y = mixed_data(n=300)
    ct = ColumnTransformer([("n", StandardScaler(), [0, 1]), ("c", OneHotEncoder(), [2])])
    est = make_pipeline(ct, LogisticRegression()).fit(X, y)
    path = write_csv(
        tmp_path / "m.csv",
        ["x", "y", "colour", "target"],
        [[*r, t] for r, t in zip(X, y, strict=True)],
    )
    result = build_bundle(est, path, name="m", version="1")
    specs = {f.name: f for f in result.manifest.inputs}
    assert specs["colour"].kind == "categorical" and "dark grey" in specs["colour"].categories
    assert specs["x"].kind == "numeric" and specs["x"].min < specs["x"].max
    assert [i.dtype for i in result.manifest.onnx_inputs] == ["float32", "float32", "string"]
    assert result.manifest.parity["labels"] is True


def test_unfitted_estimator(fitted):
    _, X, y = fitted
    with pytest.raises(ConversionError, match="not fitted: call fit"):
        build_bundle(
            make_pipeline(StandardScaler(), LogisticRegression()), (X, y), name="m", version="1"
        )


def test_unsupported_estimator(fitted):
    _, X, y = fitted
    est = MajorityClassifier().fit(X, y)
    with pytest.raises(
        ConversionError,
        match="cannot convert MajorityClassifier.*supported.html.*update_registered_converter",
    ):
        build_bundle(est, (X, y), name="m", version="1")


def test_not_an_estimator(fitted):
    _, X, y = fitted
    with pytest.raises(ConversionError, match="not a scikit-learn estimator"):
        build_bundle(object(), (X, y), name="m", version="1")


def test_pickle_needs_explicit_trust(tmp_path, fitted):
    est, _, _ = fitted
    path = tmp_path / "m.pkl"
    path.write_bytes(pickle.dumps(est))
    with pytest.raises(EstimatorLoadError, match="runs arbitrary code.*--trust-pickle"):
        load_estimator(path)
    assert type(load_estimator(path, trust_pickle=True)).__name__ == "Pipeline"


def test_skops_with_untrusted_types(tmp_path, fitted):
    _, X, y = fitted
    est = make_pipeline(FunctionTransformer(np.log1p), MajorityClassifier()).fit(np.abs(X), y)
    path = tmp_path / "m.skops"
    sio.dump(est, path)
    with pytest.raises(
        EstimatorLoadError, match=r"not trusted by default: .*MajorityClassifier"
    ) as info:
        load_estimator(path)
    assert "--trust-type" in str(info.value)
    untrusted = sio.get_untrusted_types(file=path)
    assert type(load_estimator(path, trusted_types=untrusted)).__name__ == "Pipeline"


def test_skops_default_types_load(tmp_path, fitted):
    est, _, _ = fitted
    sio.dump(est, tmp_path / "ok.skops")
    assert type(load_estimator(tmp_path / "ok.skops")).__name__ == "Pipeline"


def test_unknown_model_format(tmp_path):
    (tmp_path / "m.bin").write_bytes(b"x")
    with pytest.raises(EstimatorLoadError, match="unknown model format"):
        load_estimator(tmp_path / "m.bin")
