"""Data streams for simulated devices: rows drawn from a base dataset, changed by drift scenarios.

Each device gets its own deterministic random stream (seeded from the scenario seed and the
device id) so that a run, and any single device in it, can be replayed exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from firmware_sim.scenario import Drift

# A categorical column derived from the data, so that category drift can be simulated on
# datasets that only have numeric features.
SITE_FEATURE = "site"
SITES = ("north", "south", "east", "west")


@dataclass
class Dataset:
    """A base table: feature names and kinds, values (object array when mixed), true labels."""

    name: str
    feature_names: list[str]
    kinds: list[str]  # "numeric" | "categorical"
    X: np.ndarray
    y: np.ndarray
    task: str  # "classification" | "regression"

    def numeric_matrix(self) -> np.ndarray:
        cols = [i for i, k in enumerate(self.kinds) if k == "numeric"]
        return self.X[:, cols].astype(np.float64)


def load_dataset(name: str, with_site: bool = False) -> Dataset:
    """One of scikit-learn's bundled datasets (no download), optionally with a `site` column."""
    from sklearn import datasets  # the simulator has the tools extra; devices never load this

    loader = {
        "breast_cancer": datasets.load_breast_cancer,
        "wine": datasets.load_wine,
        "iris": datasets.load_iris,
        "digits": datasets.load_digits,
        "diabetes": datasets.load_diabetes,
    }[name]
    bunch = loader()
    names = [str(n) for n in getattr(bunch, "feature_names", range(bunch.data.shape[1]))]
    task = "regression" if name == "diabetes" else "classification"
    X = bunch.data.astype(np.float64)
    kinds = ["numeric"] * len(names)
    if with_site:
        # Sites follow the first feature's quartiles: a real, learnable relationship.
        quartile = np.searchsorted(np.quantile(X[:, 0], [0.25, 0.5, 0.75]), X[:, 0])
        site = np.array([SITES[q] for q in quartile], dtype=object)
        X = np.concatenate([X.astype(object), site[:, None]], axis=1)
        names.append(SITE_FEATURE)
        kinds.append("categorical")
    return Dataset(name, names, kinds, X, np.asarray(bunch.target), task)


def device_seed(seed: int, device_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{device_id}".encode()).digest()[:8], "big")


class DeviceStream:
    """The rows one simulated device sees over simulated time."""

    def __init__(self, dataset: Dataset, seed: int, device_id: str, drifts: list[Drift]) -> None:
        self.dataset = dataset
        self.rng = np.random.default_rng(device_seed(seed, device_id))
        self.drifts = list(drifts)
        numeric = [i for i, k in enumerate(dataset.kinds) if k == "numeric"]
        values = dataset.X[:, numeric].astype(np.float64)
        self._std = {i: float(values[:, j].std()) or 1.0 for j, i in enumerate(numeric)}
        self._median = {i: float(np.median(values[:, j])) for j, i in enumerate(numeric)}
        self._index = {name: i for i, name in enumerate(dataset.feature_names)}

    @property
    def drifted(self) -> bool:
        return any(d.kind != "concept" for d in self.drifts)

    def feature_indexes(self, drift: Drift) -> list[int]:
        names = drift.features or (self.dataset.feature_names[0],)
        return [self._index[n] for n in names]

    def rows(self, n: int, t_min: float) -> tuple[np.ndarray, np.ndarray]:
        """`n` rows as the device sees them at simulated minute `t_min`, with their true labels."""
        pick = self.rng.integers(0, len(self.dataset.X), size=n)
        X = self.dataset.X[pick].copy()
        y = self.dataset.y[pick].copy()
        # Jitter so that no two rows are identical, small against each feature's spread.
        for i, std in self._std.items():
            X[:, i] = X[:, i].astype(np.float64) + self.rng.normal(0.0, 0.02 * std, size=n)
        for drift in self.drifts:
            if t_min < drift.start_min:
                continue
            for i in self.feature_indexes(drift) if drift.kind != "concept" else []:
                self._apply(drift, X, i, t_min)
            if drift.kind == "concept":
                y = self._concept(y)
        return X, y

    def _apply(self, drift: Drift, X: np.ndarray, i: int, t_min: float) -> None:
        n = len(X)
        if drift.kind == "shift":
            X[:, i] = X[:, i].astype(np.float64) + drift.magnitude * self._std[i]
        elif drift.kind == "gradual":
            progress = min(1.0, (t_min - drift.start_min) / max(drift.ramp_min, 1e-9))
            X[:, i] = X[:, i].astype(np.float64) + progress * drift.magnitude * self._std[i]
        elif drift.kind == "broken_sensor":
            if drift.mode == "nan_burst":
                mask = self.rng.random(n) < drift.nan_share
                X[mask, i] = np.nan
            else:
                X[:, i] = self._median[i] + 3.0 * self._std[i]
        elif drift.kind == "new_category":
            mask = self.rng.random(n) < 0.5
            X[mask, i] = drift.category

    def _concept(self, y: np.ndarray) -> np.ndarray:
        if self.dataset.task == "regression":
            return -y  # the same inputs now mean the opposite
        classes = np.unique(self.dataset.y)
        return classes[(np.searchsorted(classes, y) + 1) % len(classes)]
