"""Custom skl2onnx converters, registered through skl2onnx's `update_registered_converter`."""

from model_tools.converters.isolation_forest import register as register_isolation_forest

__all__ = ["register_converters"]


def register_converters() -> None:
    """Register edgefleet's converters with skl2onnx; safe to call before every conversion."""
    register_isolation_forest()
