"""Golden set: a few rows with the exported model's own outputs, for the on-device self-test."""

from __future__ import annotations

import numpy as np

from model_tools.session import run_model

GOLDEN_ROWS = 32


def golden_indices(n_rows: int, rows: int = GOLDEN_ROWS, seed: int = 0) -> np.ndarray:
    """A reproducible choice of up to `rows` row indices."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_rows, size=min(rows, n_rows), replace=False))


def build_golden(model_bytes: bytes, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Arrays `input:<name>` and `output:<name>` (strings as numpy unicode: no pickles)."""
    golden: dict[str, np.ndarray] = {}
    for name, value in feeds.items():
        golden[f"input:{name}"] = value.astype(str) if value.dtype == object else value
    for name, value in run_model(model_bytes, feeds).items():
        arr = np.asarray(value)
        golden[f"output:{name}"] = arr.astype(str) if arr.dtype == object else arr
    return golden
