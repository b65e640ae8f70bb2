"""Input schema: what columns an estimator expects, reading sample data, and feature specs.

Data is held as a `Table` of per-column arrays (float64 for numeric, object/str for
categorical) because a CSV with a string column does not fit one numeric matrix.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model_tools.errors import InputDataError
from model_tools.manifest import FeatureSpec

LABEL_COLUMN_DEFAULTS = ("label", "target")
_MISSING = {"", "nan", "NaN", "NA", "N/A", "null", "None"}


@dataclass
class EstimatorSchema:
    """What an estimator expects as input."""

    n_features: int
    names: list[str] | None  # feature_names_in_ when fitted on a DataFrame
    categorical: set[int] = field(default_factory=set)  # columns holding strings
    categories: dict[int, list[str]] = field(default_factory=dict)
    named_columns: bool = False  # a ColumnTransformer selects columns by name


@dataclass
class Table:
    """Feature columns (in the estimator's order), optional labels, and where they came from."""

    names: list[str]
    columns: list[np.ndarray]
    labels: np.ndarray | None = None
    sha256: str | None = None
    source: str = "array"

    @property
    def n_rows(self) -> int:
        return len(self.columns[0]) if self.columns else 0

    def matrix(self, categorical: set[int] | None = None) -> np.ndarray:
        """Rows as one 2-D array: float64 when all numeric, else object (what sklearn accepts)."""
        if all(c.dtype.kind == "f" for c in self.columns):
            return np.column_stack(self.columns).astype(np.float64)
        out = np.empty((self.n_rows, len(self.columns)), dtype=object)
        for i, col in enumerate(self.columns):
            out[:, i] = col
        return out

    def take(self, index: np.ndarray) -> Table:
        return Table(
            names=list(self.names),
            columns=[c[index] for c in self.columns],
            labels=None if self.labels is None else self.labels[index],
            sha256=self.sha256,
            source=self.source,
        )


def _walk(estimator: Any):
    """Yield (estimator, column selection or None) through pipelines and column transformers."""
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import FeatureUnion, Pipeline

    if isinstance(estimator, Pipeline):
        for _, step in estimator.steps:
            if step in (None, "passthrough"):
                continue
            yield from _walk(step)
            break  # only the first step sees the raw columns
    elif isinstance(estimator, ColumnTransformer):
        yield estimator, None
    elif isinstance(estimator, FeatureUnion):
        for _, part in estimator.transformer_list:
            yield from _walk(part)
    else:
        yield estimator, None


def _is_string_encoder(est: Any) -> bool:
    cats = getattr(est, "categories_", None)
    if cats is None:
        return False
    return any(np.asarray(c).dtype.kind in "OUS" for c in cats)


def _first_step(est: Any) -> Any:
    from sklearn.pipeline import Pipeline

    while isinstance(est, Pipeline):
        est = est.steps[0][1]
    return est


def inspect_estimator(estimator: Any) -> EstimatorSchema:
    """Find the number, names and string-valued columns the fitted estimator expects."""
    from sklearn.compose import ColumnTransformer

    n = getattr(estimator, "n_features_in_", None)
    names = getattr(estimator, "feature_names_in_", None)
    if n is None:
        raise InputDataError(
            f"{type(estimator).__name__} does not say how many features it expects "
            "(no n_features_in_): fit it with scikit-learn >= 1.0"
        )
    schema = EstimatorSchema(
        n_features=int(n), names=None if names is None else [str(x) for x in names]
    )
    for part, _ in _walk(estimator):
        if isinstance(part, ColumnTransformer):
            for _, trans, cols in part.transformers_:
                if trans in ("drop",):
                    continue
                idx = _column_indices(cols, schema)
                if any(isinstance(c, str) for c in np.atleast_1d(cols)):
                    schema.named_columns = True
                first = _first_step(trans) if not isinstance(trans, str) else None
                if first is not None and _is_string_encoder(first):
                    for pos, i in enumerate(idx):
                        schema.categorical.add(i)
                        schema.categories[i] = [str(v) for v in first.categories_[pos]]
        elif _is_string_encoder(part):
            for i in range(schema.n_features):
                schema.categorical.add(i)
                schema.categories[i] = [str(v) for v in part.categories_[i]]
    return schema


def _column_indices(cols: Any, schema: EstimatorSchema) -> list[int]:
    if isinstance(cols, slice):
        return list(range(schema.n_features))[cols]
    arr = np.atleast_1d(np.asarray(cols))
    if arr.dtype == bool:
        return [int(i) for i in np.flatnonzero(arr)]
    out = []
    for c in arr.tolist():
        if isinstance(c, str):
            if schema.names is None or c not in schema.names:
                raise InputDataError(f"column {c!r} selected by the ColumnTransformer is unknown")
            out.append(schema.names.index(c))
        else:
            out.append(int(c))
    return out


def _parse_numeric(values: Sequence[Any], name: str, first_row: int = 2) -> np.ndarray:
    out = np.empty(len(values), dtype=np.float64)
    for r, v in enumerate(values):
        if v is None:
            out[r] = math.nan
            continue
        if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
            out[r] = float(v)
            continue
        text = str(v).strip()
        if text in _MISSING:
            out[r] = math.nan
            continue
        try:
            out[r] = float(text)
        except ValueError:
            raise InputDataError(
                f"column {name!r}, row {r + first_row}: {text!r} is not a number, but the model "
                "expects numbers in this column; fix the data or add an encoder for it to the model"
            ) from None
    return out


def _to_str_column(values: Sequence[Any]) -> np.ndarray:
    return np.asarray([str(v) for v in values], dtype=object)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_columns(columns: Sequence[np.ndarray]) -> str:
    """Content hash of in-memory data, for lineage."""
    h = hashlib.sha256()
    for col in columns:
        h.update(np.asarray(col).astype(str if col.dtype == object else col.dtype).tobytes())
    return h.hexdigest()


def _build_table(
    names: list[str],
    raw_columns: list[Sequence[Any]],
    schema: EstimatorSchema,
    labels: np.ndarray | None,
    source: str,
    first_row: int,
) -> Table:
    if len(raw_columns) != schema.n_features:
        raise InputDataError(
            f"{source} has {len(raw_columns)} feature columns but the model expects "
            f"{schema.n_features}; pass data with exactly the training columns"
            + (
                " (and name the label column with --label-column)"
                if source.endswith(".csv")
                else ""
            )
        )
    if not raw_columns or len(raw_columns[0]) == 0:
        raise InputDataError(
            f"{source} has no rows: give at least a few hundred rows of sample data"
        )
    columns = []
    for i, (name, raw) in enumerate(zip(names, raw_columns, strict=True)):
        if i in schema.categorical:
            columns.append(_to_str_column(raw))
        else:
            columns.append(_parse_numeric(raw, name, first_row))
    return Table(names=names, columns=columns, labels=labels, source=source)


def _decode_labels(values: Sequence[Any]) -> np.ndarray:
    """Labels from text: numbers when they all parse (ints stay ints), else strings."""
    try:
        nums = np.asarray([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        return np.asarray([str(v) for v in values], dtype=object)
    if np.all(np.isfinite(nums)) and np.all(nums == np.round(nums)):
        return nums.astype(np.int64)
    return nums


def read_csv(
    path: Path,
    schema: EstimatorSchema,
    label_column: str | None = None,
    *,
    label_optional: bool = False,
) -> Table:
    """Read a CSV with a header; pick the estimator's columns and the label column.

    With `label_optional` (data that needs no labels, like the reference profile), a named label
    column that the file lacks means the file has no labels instead of an error.
    """
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise InputDataError(
                f"{path} is empty: give a CSV with a header row and data rows"
            ) from None
        rows = []
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise InputDataError(
                    f"{path}, line {lineno}: {len(row)} values but the header has {len(header)} columns; "
                    "fix the row"
                )
            rows.append(row)
    header = [h.strip() for h in header]
    label_absent = label_column is not None and label_column not in header
    if label_absent and not label_optional:
        raise InputDataError(
            f"{path} has no column {label_column!r} (columns: {header}); check --label-column"
        )
    if label_absent:
        label_column = None
    elif label_column is None:
        feature_names = set(schema.names or [])
        candidates = [c for c in LABEL_COLUMN_DEFAULTS if c in header and c not in feature_names]
        if candidates and (schema.names is not None or len(header) == schema.n_features + 1):
            label_column = candidates[0]
    label_idx = header.index(label_column) if label_column is not None else None
    labels = (
        _decode_labels([r[label_idx] for r in rows]) if label_idx is not None and rows else None
    )
    if schema.names is not None:
        missing = [n for n in schema.names if n not in header]
        if missing:
            raise InputDataError(
                f"{path} lacks the model's column(s) {missing}; its header is {header}"
            )
        extra = [h for h in header if h not in schema.names and h != label_column]
        if extra:
            raise InputDataError(
                f"{path} has {len(header) - (label_idx is not None)} feature columns but the model "
                f"expects {schema.n_features}: unexpected column(s) {extra}; drop them or name the "
                "label column with --label-column"
            )
        names = list(schema.names)
        idx = [header.index(n) for n in names]
    else:
        idx = [i for i in range(len(header)) if i != label_idx]
        names = [header[i] for i in idx]
    raw = [[r[i] for r in rows] for i in idx]
    table = _build_table(names, raw, schema, labels, str(path), first_row=2)
    table.sha256 = _sha256_file(path)
    return table


def table_from_arrays(
    X: Any,
    y: Any | None,
    schema: EstimatorSchema,
    source: str = "array",
    names: list[str] | None = None,
) -> Table:
    """Wrap an in-memory 2-D array (or list of rows) and optional labels."""
    arr = np.asarray(X, dtype=object if not isinstance(X, np.ndarray) else None)
    if arr.ndim != 2:
        raise InputDataError(f"{source} must be a 2-D array of rows, got shape {arr.shape}")
    names = names or schema.names or [f"x{i}" for i in range(arr.shape[1])]
    raw = [arr[:, i] for i in range(arr.shape[1])]
    if len(names) != len(raw):
        names = [f"x{i}" for i in range(arr.shape[1])]
    labels = None if y is None else np.asarray(y)
    if labels is not None and len(labels) != arr.shape[0]:
        raise InputDataError(f"{source}: {arr.shape[0]} rows but {len(labels)} labels")
    table = _build_table(names, raw, schema, labels, source, first_row=0)
    table.sha256 = sha256_columns(table.columns)
    return table


def read_table(
    source: Any,
    schema: EstimatorSchema,
    label_column: str | None = None,
    *,
    label_optional: bool = False,
) -> Table:
    """Read data from a path (.csv, .npy, .npz with X and optional y), an array, (X, y) or a Table."""
    if isinstance(source, Table):
        return source
    if isinstance(source, tuple) and len(source) == 2:
        return table_from_arrays(source[0], source[1], schema)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InputDataError(f"{path}: no such data file")
        suffix = path.suffix.lower()
        if suffix == ".csv":
            return read_csv(path, schema, label_column, label_optional=label_optional)
        if suffix in (".npy", ".npz"):
            try:
                loaded = np.load(path, allow_pickle=False)
            except ValueError as exc:
                raise InputDataError(
                    f"{path} holds Python objects, which are not loaded (pickle runs code); "
                    "save numeric arrays, or use a CSV for string columns"
                ) from exc
            if suffix == ".npz":
                with loaded as npz:
                    if "X" not in npz.files:
                        raise InputDataError(
                            f"{path} has no array 'X' (found {npz.files}); save X and optionally y"
                        )
                    X, y = npz["X"], (npz["y"] if "y" in npz.files else None)
            else:
                X, y = loaded, None
            table = table_from_arrays(X, y, schema, source=str(path))
            table.sha256 = _sha256_file(path)
            return table
        raise InputDataError(
            f"{path}: unsupported data format {suffix!r}; use .csv (with header), .npy or .npz"
        )
    return table_from_arrays(source, None, schema)


def feature_specs(table: Table, schema: EstimatorSchema) -> list[FeatureSpec]:
    """Per-feature name, kind, dtype, NaN allowance, training range and categories."""
    specs = []
    for i, (name, col) in enumerate(zip(table.names, table.columns, strict=True)):
        if i in schema.categorical:
            cats = sorted(set(schema.categories.get(i, [])) | {str(v) for v in col})
            specs.append(
                FeatureSpec(name=name, kind="categorical", dtype="string", categories=cats)
            )
        else:
            finite = col[~np.isnan(col)]
            specs.append(
                FeatureSpec(
                    name=name,
                    kind="numeric",
                    dtype="float64",
                    allow_nan=bool(np.isnan(col).any()),
                    min=float(finite.min()) if finite.size else None,
                    max=float(finite.max()) if finite.size else None,
                )
            )
    return specs
