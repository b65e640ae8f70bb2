"""onnxruntime sessions configured the way devices run them: one thread, sequential."""

from __future__ import annotations

from typing import Any

import numpy as np


def make_session(model_bytes: bytes) -> Any:
    """An InferenceSession with one intra-op thread (two are unstable on 2-core machines)."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # graph-cleanup warnings are noise for users
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(
        model_bytes, sess_options=options, providers=["CPUExecutionProvider"]
    )


def run_model(model_bytes_or_session: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a model (bytes or session) and return outputs by name."""
    session = (
        make_session(model_bytes_or_session)
        if isinstance(model_bytes_or_session, (bytes, bytearray))
        else model_bytes_or_session
    )
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))
