"""IsolationForest as one TreeEnsembleRegressor: every tree's leaves hold their path length.

skl2onnx's own converter emits a Gather, a TreeEnsembleRegressor, two LabelEncoders and a dozen
arithmetic nodes per tree, so a single row through 100 trees costs milliseconds. A leaf's path
length (its depth plus the average path length of the training samples left in it) is a
constant of the fitted tree, so all trees fit in one TreeEnsembleRegressor summing them; a few
arithmetic nodes then turn the sum into sklearn's `decision_function` and `predict`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ALIAS = "EdgefleetIsolationForest"
OPTIONS = {"score_samples": [True, False]}


def average_path_length(n_samples: np.ndarray) -> np.ndarray:
    """c(n): the average path length of an unsuccessful search in a BST of n samples.

    The same formula as sklearn.ensemble._iforest._average_path_length, in float64.
    """
    n = np.asarray(n_samples, dtype=np.float64)
    out = np.zeros_like(n)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


def node_depths(tree: Any) -> np.ndarray:
    """Number of edges from the root to each node (sklearn's node depth minus one)."""
    depths = np.zeros(tree.node_count, dtype=np.int64)
    for node in range(tree.node_count):  # children always have larger ids than their parent
        left, right = tree.children_left[node], tree.children_right[node]
        if left != -1:
            depths[left] = depths[right] = depths[node] + 1
    return depths


def leaf_path_lengths(tree: Any) -> np.ndarray:
    """Per node, the path length sklearn adds for a sample ending in that node (if a leaf)."""
    return node_depths(tree) + average_path_length(tree.n_node_samples)


def float32_at_most(values: np.ndarray) -> np.ndarray:
    """The largest float32 <= each float64 value.

    sklearn compares float32 features with float64 thresholds; onnxruntime compares with
    float32 thresholds. Rounding each threshold down keeps `x <= t` exact for float32 x.
    """
    rounded = np.asarray(values, dtype=np.float64).astype(np.float32)
    too_big = rounded.astype(np.float64) > values
    rounded[too_big] = np.nextafter(rounded[too_big], np.float32(-np.inf))
    return rounded


def tree_ensemble_attributes(op: Any) -> dict[str, Any]:
    """TreeEnsembleRegressor attributes for every tree of a fitted IsolationForest."""
    # sklearn subsets a tree's columns only when max_features leaves some out (BaseBagging's
    # requires_feature_indexing); otherwise the tree indexes the input columns directly.
    subsample = op._max_features != op.n_features_in_
    names = [
        "nodes_treeids", "nodes_nodeids", "nodes_featureids", "nodes_values", "nodes_modes",
        "nodes_truenodeids", "nodes_falsenodeids", "nodes_missing_value_tracks_true",
        "target_treeids", "target_nodeids", "target_weights",
    ]  # fmt: skip
    columns: dict[str, list[Any]] = {name: [] for name in names}
    for tree_id, (est, features) in enumerate(
        zip(op.estimators_, op.estimators_features_, strict=True)
    ):
        tree = est.tree_
        leaf = tree.children_left == -1
        feature = np.where(leaf, 0, tree.feature)
        if subsample:
            feature = np.where(leaf, 0, np.asarray(features)[feature])
        threshold = np.where(leaf, 0.0, float32_at_most(tree.threshold))
        n = tree.node_count
        columns["nodes_treeids"] += [tree_id] * n
        columns["nodes_nodeids"] += list(range(n))
        columns["nodes_featureids"] += feature.astype(int).tolist()
        columns["nodes_values"] += threshold.astype(np.float32).tolist()
        columns["nodes_modes"] += ["LEAF" if is_leaf else "BRANCH_LEQ" for is_leaf in leaf]
        columns["nodes_truenodeids"] += np.where(leaf, 0, tree.children_left).tolist()
        columns["nodes_falsenodeids"] += np.where(leaf, 0, tree.children_right).tolist()
        columns["nodes_missing_value_tracks_true"] += np.where(
            leaf, 0, tree.missing_go_to_left.astype(int)
        ).tolist()
        leaves = np.flatnonzero(leaf)
        columns["target_treeids"] += [tree_id] * len(leaves)
        columns["target_nodeids"] += leaves.tolist()
        columns["target_weights"] += leaf_path_lengths(tree)[leaves].astype(np.float32).tolist()
    columns["target_ids"] = [0] * len(columns["target_nodeids"])
    return columns


def calculate_isolation_forest_output_shapes(operator: Any) -> None:
    from skl2onnx.common.data_types import Int64TensorType

    n = operator.inputs[0].get_first_dimension()
    operator.outputs[0].type = Int64TensorType([n, 1])
    for output in operator.outputs[1:]:
        output.type.shape = [n, 1]


def convert_isolation_forest(scope: Any, operator: Any, container: Any) -> None:
    from skl2onnx.common.data_types import (
        BooleanTensorType,
        DoubleTensorType,
        Int32TensorType,
        Int64TensorType,
    )
    from skl2onnx.proto import onnx_proto

    op = operator.raw_operator
    options = container.get_options(op, dict(score_samples=None))
    input_type = operator.inputs[0].type
    x = operator.inputs[0].full_name
    if isinstance(input_type, (BooleanTensorType, Int32TensorType, Int64TensorType)):
        cast = scope.get_unique_variable_name("x_float")
        container.add_node("Cast", [x], [cast], to=onnx_proto.TensorProto.FLOAT,
                           name=scope.get_unique_operator_name("Cast"))  # fmt: skip
        x = cast
    double = isinstance(input_type, DoubleTensorType)
    dtype = np.float64 if double else np.float32
    proto = onnx_proto.TensorProto.DOUBLE if double else onnx_proto.TensorProto.FLOAT

    def constant(name: str, value: Any, np_dtype: Any = dtype, tensor: int = proto) -> str:
        const = scope.get_unique_variable_name(name)
        container.add_initializer(const, tensor, [1], [np_dtype(value)])
        return const

    def node(op_type: str, inputs: list[str], output: str | None = None, **attrs: Any) -> str:
        out = output or scope.get_unique_variable_name(op_type.lower())
        container.add_node(op_type, inputs, [out], name=scope.get_unique_operator_name(op_type), **attrs)  # fmt: skip
        return out

    # Sum over trees of each tree's path length for the row.
    ml_version = 3 if container.target_opset_any_domain("ai.onnx.ml") >= 3 else 1
    path_sum = scope.get_unique_variable_name("path_length_sum")
    denominator = len(op.estimators_) * float(average_path_length(np.array([op._max_samples]))[0])
    container.add_node(
        "TreeEnsembleRegressor",
        [x],
        [path_sum],
        op_domain="ai.onnx.ml",
        op_version=ml_version,
        name=scope.get_unique_operator_name("TreeEnsembleRegressor"),
        n_targets=1,
        aggregate_function="SUM",
        post_transform="NONE",
        # sklearn scores 2^-1 when the denominator is 0 (trees of one sample: every path is 0).
        base_values=[1.0 if denominator == 0 else 0.0],
        **tree_ensemble_attributes(op),
    )
    if double:
        path_sum = node("Cast", [path_sum], to=proto)
    # score_samples = -2^(-sum / denominator) = -exp(sum * -ln2 / denominator)
    scale = -np.log(2.0) / (denominator or 1.0)
    power = node("Exp", [node("Mul", [path_sum, constant("scale", scale)])])
    if options.get("score_samples"):
        node("Neg", [power], operator.outputs[2].full_name)
    # decision_function = score_samples - offset_ = -offset_ - 2^(...)
    scores = node(
        "Sub", [constant("neg_offset", -op.offset_), power], operator.outputs[1].full_name
    )
    # predict: -1 where decision_function < 0, else 1
    outlier = node("Less", [scores, constant("zero", 0.0)])
    minus_one = constant("minus_one", -1, np.int64, onnx_proto.TensorProto.INT64)
    one = constant("one", 1, np.int64, onnx_proto.TensorProto.INT64)
    node("Where", [outlier, minus_one, one], operator.outputs[0].full_name)


def register() -> None:
    """Make skl2onnx convert IsolationForest with this converter (idempotent)."""
    from skl2onnx import update_registered_converter
    from sklearn.ensemble import IsolationForest

    update_registered_converter(
        IsolationForest,
        ALIAS,
        calculate_isolation_forest_output_shapes,
        convert_isolation_forest,
        options=OPTIONS,
    )
