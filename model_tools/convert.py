"""sklearn -> ONNX with skl2onnx: input layout, zipmap off, output mapping, clear errors."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from model_tools.errors import ConversionError
from model_tools.manifest import OnnxInput, OutputSpec, Task
from model_tools.schema import EstimatorSchema

SUPPORTED_URL = "https://onnx.ai/sklearn-onnx/supported.html"
# Ops whose removal forces skl2onnx to emit MatMul + Add for linear models, which the
# onnxruntime quantizer can then touch (it leaves LinearClassifier/LinearRegressor alone).
LINEAR_OPS = {"LinearClassifier", "LinearRegressor"}
# Pinned opsets: skl2onnx 1.20 refuses ai.onnx.ml 4 (IsolationForest asks for it), and
# onnxruntime 1.20+ runs opset 21 everywhere we deploy.
TARGET_OPSET = {"": 21, "ai.onnx.ml": 3}


@dataclass
class Conversion:
    """An ONNX graph and how to feed it and read it."""

    model_bytes: bytes
    onnx_inputs: list[OnnxInput]
    outputs: OutputSpec
    task: Task
    output_names: list[str]
    linear_matmul: bool = False


def final_estimator(estimator: Any) -> Any:
    from sklearn.pipeline import Pipeline

    while isinstance(estimator, Pipeline):
        estimator = estimator.steps[-1][1]
    return estimator


def check_fitted(estimator: Any) -> None:
    """Raise ConversionError when the estimator (or its last step) is not fitted."""
    from sklearn.base import BaseEstimator
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    if not isinstance(estimator, BaseEstimator):
        raise ConversionError(
            f"{type(estimator).__name__} is not a scikit-learn estimator; edgefleet converts "
            f"fitted scikit-learn estimators and pipelines (see {SUPPORTED_URL})"
        )
    try:
        check_is_fitted(estimator)
        check_is_fitted(final_estimator(estimator))
    except NotFittedError as exc:
        raise ConversionError(
            f"{type(estimator).__name__} is not fitted: call fit() on training data before converting"
        ) from exc
    except TypeError:
        pass  # not an estimator sklearn can check; conversion will tell


def detect_task(estimator: Any) -> Task:
    from sklearn.base import is_classifier, is_outlier_detector, is_regressor

    if is_classifier(estimator):
        return "classification"
    if is_regressor(estimator):
        return "regression"
    if is_outlier_detector(estimator):
        return "anomaly"
    raise ConversionError(
        f"{type(final_estimator(estimator)).__name__} is neither a classifier, a regressor nor an "
        "outlier detector; bundles hold predictive models only"
    )


def _safe(name: str, i: int) -> str:
    return f"c{i}_" + re.sub(r"[^0-9A-Za-z_]", "_", name)[:40]


def input_layout(schema: EstimatorSchema, names: list[str]) -> list[OnnxInput]:
    """One float32 `X` for all-numeric models; one [N, 1] tensor per column otherwise.

    skl2onnx's ColumnTransformer resolves integer column indices across several inputs and
    named columns by input name, so per-column inputs work for both; a string column cannot
    share a tensor with numbers.
    """
    if not schema.categorical and not schema.named_columns:
        return [OnnxInput(name="X", dtype="float32", columns=list(range(len(names))))]
    inputs = []
    for i, name in enumerate(names):
        dtype = "string" if i in schema.categorical else "float32"
        onnx_name = name if schema.named_columns else _safe(name, i)
        inputs.append(OnnxInput(name=onnx_name, dtype=dtype, columns=[i]))
    return inputs


def _initial_types(onnx_inputs: list[OnnxInput]) -> list[tuple[str, Any]]:
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType

    types = []
    for spec in onnx_inputs:
        cls = StringTensorType if spec.dtype == "string" else FloatTensorType
        types.append((spec.name, cls([None, len(spec.columns)])))
    return types


def _classes(est: Any) -> list[str] | list[int] | None:
    classes = getattr(est, "classes_", None)
    if classes is None:
        return None
    values = list(classes.tolist())
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return [int(v) for v in values]
    return [str(v) for v in values]


def has_predict_proba(estimator: Any) -> bool:
    return hasattr(estimator, "predict_proba")


def convert(
    estimator: Any,
    schema: EstimatorSchema,
    names: list[str],
    *,
    linear_matmul: bool = False,
) -> Conversion:
    """Convert a fitted estimator; `linear_matmul` emits MatMul for linear models (quantizable)."""
    from skl2onnx import to_onnx

    from model_tools.converters import register_converters

    check_fitted(estimator)
    register_converters()  # IsolationForest as one tree ensemble, not one subgraph per tree
    task = detect_task(estimator)
    final = final_estimator(estimator)
    onnx_inputs = input_layout(schema, names)
    options: dict[int, dict[str, Any]] = {}
    if task == "classification":
        options[id(final)] = {"zipmap": False}
    if type(final).__name__ in ("KNeighborsClassifier", "KNeighborsRegressor"):
        # onnxruntime's CDist kernel instead of a Scan loop: ~100x faster per row.
        options.setdefault(id(final), {})["optim"] = "cdist"
    try:
        model = to_onnx(
            estimator,
            initial_types=_initial_types(onnx_inputs),
            options=options or None,
            target_opset=TARGET_OPSET,
            black_op=LINEAR_OPS if linear_matmul else None,
        )
    except Exception as exc:
        msg = str(exc)
        if "shape calculator" in msg or "converter" in msg.lower() or "Unable to find" in msg:
            raise ConversionError(
                f"skl2onnx cannot convert {type(final).__name__} ({type(estimator).__name__}): "
                f"{msg.splitlines()[0] if msg else type(exc).__name__}. "
                f"See the supported estimators at {SUPPORTED_URL}; for your own estimator, register "
                "a converter with skl2onnx.update_registered_converter before converting"
            ) from exc
        raise ConversionError(
            f"converting {type(estimator).__name__} with skl2onnx failed: {msg or type(exc).__name__}"
        ) from exc
    output_names = [o.name for o in model.graph.output]
    if task == "classification":
        outputs = OutputSpec(
            label=output_names[0],
            probabilities=output_names[1]
            if has_predict_proba(estimator) and len(output_names) > 1
            else None,
            # Classifiers without predict_proba (e.g. SVC) expose decision scores instead.
            value=output_names[1]
            if not has_predict_proba(estimator) and len(output_names) > 1
            else None,
            classes=_classes(final),
        )
    elif task == "anomaly":
        outputs = OutputSpec(
            label=output_names[0], value=output_names[1] if len(output_names) > 1 else None
        )
    else:
        outputs = OutputSpec(value=output_names[0])
    return Conversion(
        model_bytes=model.SerializeToString(),
        onnx_inputs=onnx_inputs,
        outputs=outputs,
        task=task,
        output_names=output_names,
        linear_matmul=linear_matmul and uses_matmul(model),
    )


def op_types(model_bytes: bytes) -> dict[str, int]:
    """Count of each op type in a graph (top level and subgraphs)."""
    import onnx

    model = onnx.load_from_string(model_bytes)
    counts: dict[str, int] = {}

    def visit(graph: Any) -> None:
        for node in graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                for g in attr.graphs:
                    visit(g)

    visit(model.graph)
    return counts


def uses_matmul(model: Any) -> bool:
    return any(n.op_type in ("MatMul", "Gemm") for n in model.graph.node)


def has_linear_op(model_bytes: bytes) -> bool:
    return bool(LINEAR_OPS & set(op_types(model_bytes)))
