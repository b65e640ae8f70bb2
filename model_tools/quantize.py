"""Build the quantized variants of a graph and say honestly what changed.

onnxruntime's quantizer only rewrites MatMul/Conv/Gemm-style nodes. Tree ensembles, SVMs and
the `Linear*` ML ops come back unchanged (often byte-identical), so every variant is checked
for quantized ops before anyone calls it int8.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model_tools.convert import op_types

QUANTIZED_OPS = {
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "QuantizeLinear",
    "DequantizeLinear",
    "QLinearMatMul",
    "QLinearConv",
    "ConvInteger",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "QGemm",
}
QUANTIZABLE_OPS = {"MatMul", "Gemm", "Conv"}
INT8_VARIANTS = ("int8-dynamic", "int8-static")


@dataclass
class Variant:
    """One candidate graph and what quantization did to it."""

    name: str  # float32 | int8-dynamic | int8-static
    model_bytes: bytes | None
    base: str = "native"  # "matmul" when built from the MatMul form of a linear model
    quantized_ops: int = 0
    quantizable_ops: int = 0
    note: str = ""
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)

    @property
    def built(self) -> bool:
        return self.model_bytes is not None

    @property
    def size(self) -> int | None:
        return len(self.model_bytes) if self.model_bytes is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.name,
            "built": self.built,
            "bytes": self.size,
            "base": self.base,
            "quantizable_ops": self.quantizable_ops,
            "quantized_ops": self.quantized_ops,
            "note": self.note,
        }


def _calibration_reader(feeds: dict[str, np.ndarray], batch: int = 64, max_rows: int = 512) -> Any:
    """A CalibrationDataReader over sample feeds, in small batches (onnxruntime imported lazily)."""
    from onnxruntime.quantization import CalibrationDataReader

    n = min(len(next(iter(feeds.values()))), max_rows)
    batches = [{k: v[i : i + batch] for k, v in feeds.items()} for i in range(0, n, batch)]

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it: Iterator[dict[str, np.ndarray]] = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = iter(batches)

    return _Reader()


def _count(ops: dict[str, int], names: set[str]) -> int:
    return sum(n for op, n in ops.items() if op in names)


def _quantize(base_bytes: bytes, mode: str, calibration: dict[str, np.ndarray] | None) -> bytes:
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # calibration sessions warn about unused initializers
    # The quantizer logs advice through the root logger; our report says what matters.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        return _quantize_files(base_bytes, mode, calibration)
    finally:
        logging.disable(previous)


def _quantize_files(
    base_bytes: bytes, mode: str, calibration: dict[str, np.ndarray] | None
) -> bytes:
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    with tempfile.TemporaryDirectory(prefix="edgefleet-quant-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        src.write_bytes(base_bytes)
        if mode == "int8-dynamic":
            # DefaultTensorType: the MatMul form of linear models computes its weight from a
            # Mul node, whose type the quantizer cannot infer on its own.
            quantize_dynamic(
                src,
                dst,
                weight_type=QuantType.QInt8,
                extra_options={"DefaultTensorType": 1},  # onnx.TensorProto.FLOAT
            )
        else:
            reader = _calibration_reader(calibration or {})
            quantize_static(
                src,
                dst,
                reader,
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=sorted(QUANTIZABLE_OPS),
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            )
        return dst.read_bytes()


def build_variants(
    float_bytes: bytes,
    *,
    matmul_bytes: bytes | None = None,
    calibration: dict[str, np.ndarray] | None = None,
    mode: str = "auto",
) -> list[Variant]:
    """float32 plus, unless mode is float32, the int8 variants that really quantize something.

    `matmul_bytes` is the MatMul form of a linear model: the int8 variants start from it because
    the quantizer cannot touch LinearClassifier/LinearRegressor.
    """
    float_ops = op_types(float_bytes)
    variants = [
        Variant(
            "float32",
            float_bytes,
            quantizable_ops=_count(float_ops, QUANTIZABLE_OPS),
            ops_before=float_ops,
            ops_after=float_ops,
            note="the converted graph, unchanged",
        )
    ]
    if mode == "float32":
        return variants
    base_bytes, base = (
        (matmul_bytes, "matmul") if matmul_bytes is not None else (float_bytes, "native")
    )
    base_ops = op_types(base_bytes)
    quantizable = _count(base_ops, QUANTIZABLE_OPS)
    for name in INT8_VARIANTS:
        variant = Variant(name, None, base=base, quantizable_ops=quantizable, ops_before=base_ops)
        if quantizable == 0:
            ops = ", ".join(sorted(base_ops))
            variant.note = (
                f"not built: the graph has no MatMul/Gemm/Conv for onnxruntime's quantizer "
                f"(ops: {ops}); int8 would be the same float32 graph"
            )
            variants.append(variant)
            continue
        if name == "int8-static" and not calibration:
            variant.note = "not built: static quantization needs calibration rows"
            variants.append(variant)
            continue
        try:
            out = _quantize(base_bytes, name, calibration)
        except Exception as exc:  # the quantizer fails on some ML-domain graphs; report it
            variant.note = (
                f"not built: onnxruntime's quantizer failed ({type(exc).__name__}: {exc})"
            )
            variants.append(variant)
            continue
        after = op_types(out)
        variant.ops_after = after
        variant.quantized_ops = _count(after, QUANTIZED_OPS)
        if out == base_bytes or variant.quantized_ops == 0:
            variant.note = (
                "discarded: the quantizer returned the graph unchanged (no quantized ops)"
            )
            variants.append(variant)
            continue
        variant.model_bytes = out
        variant.note = (
            f"{variant.quantized_ops} quantized op(s) from {quantizable} MatMul/Gemm/Conv"
            + (" (MatMul form of the linear model)" if base == "matmul" else "")
            + f"; {len(base_bytes)} -> {len(out)} bytes"
        )
        variants.append(variant)
    return variants
