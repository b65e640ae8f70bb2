"""Models for simulations and the demo: train on a bundled dataset, build a signed bundle.

The pipeline imputes missing values, so the bundle accepts NaN on every feature (a few NaNs are
put into the training sample for that) and a broken sensor shows up in the NaN bin of the
drift report instead of as refused requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware_sim.datagen import Dataset, load_dataset

# Hyper-parameters per model version: the demo's second version is a genuinely different model.
VARIANTS = {"logreg": {"C": 1.0}, "logreg-strong": {"C": 0.05}}


@dataclass
class TrainedBundle:
    """A signed bundle ready for the registry, with the numbers worth printing."""

    bundle_bytes: bytes
    name: str
    version: str
    accuracy: float
    features: list[str]


def train_estimator(dataset: Dataset, variant: str = "logreg", seed: int = 0):
    """Fit impute -> scale -> logistic regression (or ridge for regression) on 80 % of the data."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = dataset.numeric_matrix(), dataset.y
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(X))
    train = order[: int(0.8 * len(X))]
    final = (
        Ridge(alpha=1.0 / VARIANTS[variant]["C"])
        if dataset.task == "regression"
        else LogisticRegression(C=VARIANTS[variant]["C"], max_iter=2000)
    )
    est = make_pipeline(SimpleImputer(strategy="median"), StandardScaler(), final)
    est.fit(X[train], y[train])
    return est, order


def build_model(
    sign_key: Ed25519PrivateKey,
    *,
    dataset: str = "breast_cancer",
    name: str = "tumour",
    version: str = "1.0.0",
    variant: str = "logreg",
    seed: int = 0,
) -> TrainedBundle:
    """Train, convert, check parity, profile, sign: a bundle like a data scientist would ship."""
    from model_tools.pipeline import build_bundle
    from model_tools.schema import inspect_estimator, table_from_arrays

    data = load_dataset(dataset)
    est, order = train_estimator(data, variant, seed)
    X, y = data.numeric_matrix(), data.y
    train, valid = order[: int(0.8 * len(X))], order[int(0.8 * len(X)) :]
    sample = X[train].copy()
    # One NaN per feature in the sample declares that missing values are accepted.
    for j in range(sample.shape[1]):
        sample[j % len(sample), j] = np.nan
    schema = inspect_estimator(est)
    names = list(data.feature_names)
    result = build_bundle(
        est,
        table_from_arrays(sample, y[train], schema, names=names),
        validation=table_from_arrays(X[valid], y[valid], schema, names=names),
        name=name,
        version=version,
        quantize="float32",
        sign_key=sign_key,
        seed=seed,
    )
    accuracy = float((est.predict(X[valid]) == y[valid]).mean()) if data.task == "classification" else float("nan")
    return TrainedBundle(result.bundle_bytes, name, version, accuracy, names)
