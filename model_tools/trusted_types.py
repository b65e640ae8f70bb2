"""The reviewed allow-list of scikit-learn's own internal types that `.skops` files may contain.

skops refuses every type it does not trust by default, which includes the internals of common
estimators (a forest's `Tree`, an MLP's optimizer, a k-NN index). Each type here was reviewed
for what loading it can do. Some hold raw node indices that scikit-learn's compiled code follows
without bounds checks (skops stopped trusting `Tree` for that reason: a crafted file could crash
`predict` or read memory outside the arrays), so `check_structures` proves their indices are in
range before anything runs on the estimator. Types outside the list still need `--trust-type`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from model_tools.errors import EstimatorLoadError

# Reviewed against these scikit-learn releases (with skops 0.10.0 and 0.16.0 respectively);
# outside [SKLEARN_MIN, SKLEARN_BELOW) the list is not applied, since private types may change.
CHECKED_ON = ("1.5.2", "1.9.1")
SKLEARN_MIN = (1, 5)
SKLEARN_BELOW = (1, 10)


@dataclass(frozen=True)
class TrustedType:
    """One allow-listed type: what needs it, and why loading it is safe."""

    name: str
    used_by: str
    why: str


_LOSS_WHY = "a loss or link object: a few float parameters, used for training, not by predict"
_LOSS_USERS = "GradientBoosting*, HistGradientBoosting* (the fitted loss)"

TRUSTED_TYPES: tuple[TrustedType, ...] = (
    TrustedType(
        "sklearn.tree._tree.Tree",
        "DecisionTree*, RandomForest*, ExtraTrees*, GradientBoosting*, IsolationForest",
        "node arrays: children and feature indices are checked to be in range and acyclic",
    ),
    TrustedType(
        "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
        "HistGradientBoosting*",
        "node records: children, feature and bitset indices are checked to be in range",
    ),
    TrustedType(
        "sklearn.ensemble._hist_gradient_boosting.binning._BinMapper",
        "HistGradientBoosting*",
        "bin thresholds (arrays); categorical ones are checked to fit a 256-bit bitset",
    ),
    TrustedType(
        "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
        "MLPClassifier, MLPRegressor (solver='adam', the default)",
        "plain Python state of the optimizer, used only by partial_fit",
    ),
    TrustedType(
        "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
        "MLPClassifier, MLPRegressor (solver='sgd')",
        "plain Python state of the optimizer, used only by partial_fit",
    ),
    TrustedType(
        "sklearn.neighbors._kd_tree.KDTree",
        "KNeighbors* (algorithm 'auto' or 'kd_tree')",
        "index arrays: the point permutation and node ranges are checked to be in range",
    ),
    TrustedType(
        "sklearn.neighbors._ball_tree.BallTree",
        "KNeighbors* (algorithm 'ball_tree')",
        "index arrays: the point permutation and node ranges are checked to be in range",
    ),
    TrustedType(
        "sklearn.metrics._dist_metrics.EuclideanDistance64",
        "KNeighbors* (metric 'minkowski' with p=2, the default, or 'euclidean')",
        "no state beyond its parameters; the caller passes the vector length",
    ),
    TrustedType(
        "numpy.dtype",
        "SimpleImputer (its fitted dtype)",
        "skops rebuilds it from an empty array read with allow_pickle=False",
    ),
    *(
        TrustedType(name, _LOSS_USERS, _LOSS_WHY)
        for name in (
            "sklearn._loss.loss.HalfSquaredError",
            "sklearn._loss.loss.AbsoluteError",
            "sklearn._loss.loss.HuberLoss",
            "sklearn._loss.loss.PinballLoss",
            "sklearn._loss.loss.HalfPoissonLoss",
            "sklearn._loss.loss.HalfGammaLoss",
            "sklearn._loss.loss.HalfBinomialLoss",
            "sklearn._loss.loss.HalfMultinomialLoss",
            "sklearn._loss.loss.ExponentialLoss",
            "sklearn._loss.link.Interval",
            "sklearn._loss.link.IdentityLink",
            "sklearn._loss.link.LogLink",
            "sklearn._loss.link.LogitLink",
            "sklearn._loss.link.HalfLogitLink",
            "sklearn._loss.link.MultinomialLogit",
            # The compiled halves of the losses; older skops names them by their bare module.
            "_loss.CyHalfSquaredError",
            "_loss.CyAbsoluteError",
            "_loss.CyHuberLoss",
            "_loss.CyPinballLoss",
            "_loss.CyHalfPoissonLoss",
            "_loss.CyHalfGammaLoss",
            "_loss.CyHalfBinomialLoss",
            "_loss.CyHalfMultinomialLoss",
            "_loss.CyExponentialLoss",
        )
    ),
)


def _version_tuple(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def installed_sklearn_version() -> str:
    import sklearn

    return sklearn.__version__


def applies_to(sklearn_version: str) -> bool:
    """Whether the list was reviewed for this scikit-learn release line."""
    return SKLEARN_MIN <= _version_tuple(sklearn_version) < SKLEARN_BELOW


def curated_names(sklearn_version: str | None = None) -> frozenset[str]:
    """The allow-listed type names for this scikit-learn version (none outside the range)."""
    version = installed_sklearn_version() if sklearn_version is None else sklearn_version
    return frozenset(t.name for t in TRUSTED_TYPES) if applies_to(version) else frozenset()


def range_text() -> str:
    return (
        f"scikit-learn {SKLEARN_MIN[0]}.{SKLEARN_MIN[1]} to below "
        f"{SKLEARN_BELOW[0]}.{SKLEARN_BELOW[1]} (checked on {', '.join(CHECKED_ON)})"
    )


# ---- structural checks ---------------------------------------------------------------------


def _type_name(obj: Any) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def _walk(root: Any) -> Iterator[tuple[Any, Any]]:
    """Every object reachable from the estimator, with the nearest enclosing one that knows its
    input width (`n_features_in_`): the width the compiled code will index with."""
    seen: set[int] = set()
    stack: list[tuple[Any, Any]] = [(root, None)]
    while stack:
        obj, owner = stack.pop()
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, complex, type(None))):
            continue
        seen.add(id(obj))
        yield obj, owner
        if isinstance(obj, dict):
            stack.extend((v, owner) for v in obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend((v, owner) for v in obj)
        elif isinstance(obj, np.ndarray):
            if obj.dtype == object:
                stack.extend((v, owner) for v in obj.ravel())
        else:
            attrs = getattr(obj, "__dict__", None)
            if isinstance(attrs, dict):
                inner = obj if hasattr(obj, "n_features_in_") else owner
                stack.extend((v, inner) for v in attrs.values())


def _children_ok(left: np.ndarray, right: np.ndarray, internal: np.ndarray) -> bool:
    """Children of internal nodes come after their parent and inside the array: in range and no
    cycle (scikit-learn's builders always append a node's children after the node)."""
    n = len(left)
    idx = np.arange(n)
    return bool(
        np.all(left[internal] > idx[internal])
        and np.all(right[internal] > idx[internal])
        and np.all(left[internal] < n)
        and np.all(right[internal] < n)
    )


def _width(owner: Any) -> int | None:
    n = getattr(owner, "n_features_in_", None)
    return int(n) if isinstance(n, (int, np.integer)) else None


def _check_tree(tree: Any, owner: Any) -> str | None:
    n = int(tree.node_count)
    left = np.asarray(tree.children_left, dtype=np.int64)
    right = np.asarray(tree.children_right, dtype=np.int64)
    feature = np.asarray(tree.feature, dtype=np.int64)
    if n < 1 or not len(left) == len(right) == len(feature) == n:
        return "node arrays of the wrong length"
    leaf = left == -1
    if np.any((right == -1) != leaf):
        return "a node with only one child"
    internal = ~leaf
    if not _children_ok(left, right, internal):
        return "child indices out of range or pointing backwards"
    bound = min(x for x in (int(tree.n_features), _width(owner)) if x is not None)
    if np.any(feature[internal] < 0) or np.any(feature[internal] >= bound):
        return f"split features outside the model's {bound} input columns"
    return None


def _check_tree_predictor(predictor: Any, owner: Any) -> str | None:
    from sklearn.ensemble._hist_gradient_boosting.common import PREDICTOR_RECORD_DTYPE

    nodes = getattr(predictor, "nodes", None)
    if not isinstance(nodes, np.ndarray) or nodes.dtype != PREDICTOR_RECORD_DTYPE:
        return "node records of the wrong type"
    if nodes.ndim != 1 or len(nodes) < 1:
        return "no node records"
    internal = nodes["is_leaf"] == 0
    left = nodes["left"].astype(np.int64)
    right = nodes["right"].astype(np.int64)
    if not _children_ok(left, right, internal):
        return "child indices out of range or pointing backwards"
    width = _width(owner)
    feature = nodes["feature_idx"].astype(np.int64)
    if width is None:
        return "no input width to check split features against"
    if np.any(feature[internal] < 0) or np.any(feature[internal] >= width):
        return f"split features outside the model's {width} input columns"
    categorical = internal & (nodes["is_categorical"] != 0)
    if np.any(categorical):
        bitsets = np.asarray(getattr(predictor, "raw_left_cat_bitsets", np.empty((0, 8))))
        if bitsets.ndim != 2 or bitsets.shape[1] != 8:
            return "category bitsets of the wrong shape"
        if np.any(nodes["bitset_idx"][categorical].astype(np.int64) >= len(bitsets)):
            return "category bitset indices out of range"
        mapper_categorical = getattr(getattr(owner, "_bin_mapper", None), "is_categorical_", None)
        if mapper_categorical is None or not np.all(
            np.asarray(mapper_categorical, dtype=bool)[feature[categorical]]
        ):
            return "categorical splits on features the model does not treat as categorical"
    return None


def _check_bin_mapper(mapper: Any, owner: Any) -> str | None:
    categorical = getattr(mapper, "is_categorical_", None)
    if categorical is None:
        return None
    categorical = np.asarray(categorical, dtype=bool)
    thresholds = getattr(mapper, "bin_thresholds_", None)
    if thresholds is None or len(thresholds) != len(categorical):
        return "bin thresholds do not match the features"
    width = _width(owner)
    if width is not None and len(categorical) != width:
        return f"categorical flags for {len(categorical)} features, the model has {width}"
    for f in np.flatnonzero(categorical):
        # Known categories are set as bits of a 256-bit bitset without a bounds check.
        values = np.asarray(thresholds[f], dtype=np.float64)
        if np.any(~np.isfinite(values)) or np.any(values < 0) or np.any(values > 255):
            return "categories outside 0..255"
    return None


def _check_binary_tree(tree: Any, owner: Any) -> str | None:
    data, idx_array, node_data, node_bounds = (np.asarray(a) for a in tree.get_arrays())
    if data.ndim != 2 or idx_array.ndim != 1 or node_data.ndim != 1 or len(node_data) < 1:
        return "index arrays of the wrong shape"
    n_points, width = data.shape
    if len(idx_array) != n_points or not np.array_equal(
        np.sort(idx_array.astype(np.int64)), np.arange(n_points)
    ):
        return "the point order is not a permutation of the points"
    n_nodes = len(node_data)
    start = node_data["idx_start"].astype(np.int64)
    end = node_data["idx_end"].astype(np.int64)
    if np.any(start < 0) or np.any(end < start) or np.any(end > n_points):
        return "node point ranges out of range"
    internal = np.flatnonzero(node_data["is_leaf"] == 0)
    if np.any(2 * internal + 2 >= n_nodes):
        return "internal nodes without children"
    if node_bounds.ndim != 3 or node_bounds.shape[1] != n_nodes or node_bounds.shape[2] != width:
        return "node bounds of the wrong shape"
    owner_width = _width(owner)
    if owner_width is not None and owner_width != width:
        return f"index over {width} columns, the model has {owner_width}"
    weights = getattr(tree, "sample_weight", None)
    if weights is not None and len(np.asarray(weights)) != n_points:
        return "sample weights of the wrong length"
    return None


STRUCTURE_CHECKS: dict[str, Callable[[Any, Any], str | None]] = {
    "sklearn.tree._tree.Tree": _check_tree,
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor": _check_tree_predictor,
    "sklearn.ensemble._hist_gradient_boosting.binning._BinMapper": _check_bin_mapper,
    "sklearn.neighbors._kd_tree.KDTree": _check_binary_tree,
    "sklearn.neighbors._ball_tree.BallTree": _check_binary_tree,
}


def check_structures(estimator: Any, source: str = "the model") -> int:
    """Refuse an estimator whose index-holding internals point outside their arrays.

    Returns how many objects were checked. Raises EstimatorLoadError naming the first bad one.
    """
    checked = 0
    for obj, owner in _walk(estimator):
        check = STRUCTURE_CHECKS.get(_type_name(obj))
        if check is None:
            continue
        try:
            problem = check(obj, owner)
        except (AttributeError, TypeError, ValueError, IndexError, KeyError) as exc:
            problem = f"unreadable ({exc})"
        if problem is not None:
            raise EstimatorLoadError(
                f"{source} contains a malformed {_type_name(obj)}: {problem}. "
                "scikit-learn would follow these indices without bounds checks; the file is "
                "corrupt or crafted, refit and save the model again"
            )
        checked += 1
    return checked
