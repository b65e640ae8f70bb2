"""Small datasets, estimators and helpers shared by the model_tools tests."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from model_tools.bundle import Bundle
from model_tools.session import run_model


def classification_data(n: int = 1000, n_features: int = 8, seed: int = 0, class_sep: float = 1.0):
    from sklearn.datasets import make_classification

    return make_classification(
        n_samples=n,
        n_features=n_features,
        n_informative=min(5, n_features - 1),
        n_redundant=min(2, n_features - 1 - min(5, n_features - 1)),
        class_sep=class_sep,
        random_state=seed,
    )


def regression_data(n: int = 1000, n_features: int = 8, seed: int = 0):
    from sklearn.datasets import make_regression

    return make_regression(n_samples=n, n_features=n_features, noise=5.0, random_state=seed)


def mixed_data(n: int = 800, seed: int = 0):
    """Two numeric columns and one string column (object array), binary target."""
    rng = np.random.default_rng(seed)
    X = np.empty((n, 3), dtype=object)
    X[:, 0] = rng.normal(size=n)
    X[:, 1] = rng.normal(size=n) * 10
    X[:, 2] = rng.choice(["red", "green", "blue", "dark grey"], size=n)
    score = X[:, 0].astype(float) + (X[:, 2] == "red") * 1.5 - (X[:, 2] == "blue")
    y = (score + rng.normal(scale=0.3, size=n) > 0.3).astype(int)
    return X, y


def split(X, y, n_test: int = 200):
    return (X[:-n_test], None if y is None else y[:-n_test]), (
        X[-n_test:],
        None if y is None else y[-n_test:],
    )


def bundle_columns(bundle: Bundle, X) -> list[np.ndarray]:
    """One array per feature, the way a local app would send rows."""
    X = np.asarray(X, dtype=object if np.asarray(X).dtype == object else None)
    return [X[:, i] for i in range(len(bundle.manifest.inputs))]


def bundle_predict(bundle: Bundle, X) -> dict[str, np.ndarray]:
    """Run the bundle's model under onnxruntime, feeding per manifest.onnx_inputs."""
    return run_model(bundle.model_bytes, bundle.feeds(bundle_columns(bundle, X)))


class MajorityClassifier(ClassifierMixin, BaseEstimator):
    """A custom estimator skl2onnx has no converter for."""

    def fit(self, X, y):
        X = np.asarray(X)
        self.n_features_in_ = X.shape[1]
        values, counts = np.unique(y, return_counts=True)
        self.classes_ = values
        self.majority_ = values[np.argmax(counts)]
        return self

    def predict(self, X):
        return np.full(len(X), self.majority_)
