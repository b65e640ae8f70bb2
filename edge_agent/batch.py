"""Offline batch scoring of a CSV file with the active bundle, through the same validation.

Rows that fail validation do not stop the job: they get an `error` column in the output.
Columns that are not features (ids, timestamps) are copied to the output unchanged.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.runtime import ModelRuntime
from edge_agent.validation import RequestError

MISSING = {"", "nan", "NaN", "NA", "N/A", "null", "None"}


@dataclass
class BatchResult:
    rows: int
    predicted: int
    errors: int


def _cell(value: str, numeric: bool) -> Any:
    if value in MISSING:
        return None
    if not numeric:
        return value
    try:
        return float(value)
    except ValueError:
        return value  # the validator names the feature and says it is not a number


def score_csv(
    runtime: ModelRuntime,
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    batch_size: int = 256,
) -> BatchResult:
    """Score every row of `input_path` (CSV with a header naming the features)."""
    validator = runtime.validator
    with open(input_path, newline="", encoding="utf-8") as fin:
        reader = csv.reader(fin)
        try:
            header = next(reader)
        except StopIteration:
            raise ValueError(f"{input_path} is empty: expected a header row naming the features") from None
        missing = [name for name in validator.names if name not in header]
        if missing:
            raise ValueError(
                f"{input_path} lacks feature column(s) {missing[:5]}; the model needs {validator.names}"
            )
        cols = [header.index(name) for name in validator.names]
        passthrough = [i for i, h in enumerate(header) if h not in validator.index]
        classes = runtime.classes if runtime.manifest.outputs.probabilities else None
        out_header = [header[i] for i in passthrough] + ["prediction"]
        out_header += [f"proba_{c}" for c in classes or []] + ["error"]
        tmp = Path(output_path).with_name(f".{Path(output_path).name}.tmp")
        result = BatchResult(0, 0, 0)
        with open(tmp, "w", newline="", encoding="utf-8") as fout:
            writer = csv.writer(fout)
            writer.writerow(out_header)
            batch: list[list[str]] = []
            for line in reader:
                if not line:
                    continue
                batch.append(line)
                if len(batch) >= batch_size:
                    _score(runtime, batch, cols, passthrough, classes, writer, result)
                    batch = []
            if batch:
                _score(runtime, batch, cols, passthrough, classes, writer, result)
        os.replace(tmp, output_path)
    return result


def _score(runtime, lines, cols, passthrough, classes, writer, result: BatchResult) -> None:
    """Score one batch; output rows keep the input order, refused rows carry their error."""
    numeric = runtime.validator.numeric
    n_proba = len(classes or [])
    out_rows: list[list[Any]] = []
    good: list[tuple[int, list[Any]]] = []
    for line in lines:
        result.rows += 1
        out_rows.append([line[i] if i < len(line) else "" for i in passthrough])
        try:
            if len(line) <= max(cols):
                raise RequestError("wrong_feature_count", f"row {result.rows} has only {len(line)} columns")
            raw = [_cell(line[c], numeric[j]) for j, c in enumerate(cols)]
            good.append((len(out_rows) - 1, runtime.validator.check(raw, result.rows)))
        except RequestError as exc:
            result.errors += 1
            out_rows[-1] += [""] * (1 + n_proba) + [f"{exc.kind}: {exc}"]
    if good:
        out = runtime.run(runtime.feeds([values for _, values in good]))
        for k, (i, _) in enumerate(good):
            probas = [f"{p:.6g}" for p in out.probabilities[k]] if n_proba and out.probabilities else []
            out_rows[i] += [out.primary[k], *probas, ""]
            result.predicted += 1
    writer.writerows(out_rows)
