"""Build onnxruntime feeds from feature columns per `Manifest.onnx_inputs` (numpy only).

The convention every part shares: for each OnnxInput, take its `columns` of the row, in order,
cast them to its dtype, and stack them into a [N, len(columns)] tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from model_tools.manifest import OnnxInput

_NUMPY_DTYPES = {"float32": np.float32, "float64": np.float64, "int64": np.int64}


def column_to_tensor_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    """Cast one column to an ONNX input dtype (strings stay Python str in an object array)."""
    if dtype == "string":
        return np.asarray([str(v) for v in values], dtype=object)
    return np.asarray(values, dtype=_NUMPY_DTYPES[dtype])


def feeds_from_columns(
    onnx_inputs: Sequence[OnnxInput], columns: Sequence[np.ndarray]
) -> dict[str, np.ndarray]:
    """Feeds for a batch given one array per feature (in `Manifest.inputs` order)."""
    feeds: dict[str, np.ndarray] = {}
    for spec in onnx_inputs:
        parts = [column_to_tensor_dtype(np.asarray(columns[i]), spec.dtype) for i in spec.columns]
        tensor = np.stack(parts, axis=1) if parts else np.empty((0, 0))
        feeds[spec.name] = tensor
    return feeds


def feeds_from_rows(
    onnx_inputs: Sequence[OnnxInput], rows: Sequence[Sequence[object]]
) -> dict[str, np.ndarray]:
    """Feeds for a batch of rows, each a sequence of feature values in `Manifest.inputs` order."""
    n_features = 1 + max((c for spec in onnx_inputs for c in spec.columns), default=-1)
    columns = [np.asarray([row[i] for row in rows], dtype=object) for i in range(n_features)]
    return feeds_from_columns(onnx_inputs, columns)
