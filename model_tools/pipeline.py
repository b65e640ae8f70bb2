"""build_bundle: convert -> quantize -> parity gate -> profile -> estimation -> golden -> budget
-> package -> sign.

Each stage is a function of its own module; this one only wires them and keeps the report.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from model_tools.bundle import write_bundle
from model_tools.calibration import class_index, fit_calibration
from model_tools.convert import Conversion, check_fitted, convert, final_estimator, has_linear_op
from model_tools.errors import InputDataError, ModelToolsError
from model_tools.estimation import (
    MAX_ESTIMATED_CLASSES,
    build_estimation,
    out_of_fold_probabilities,
)
from model_tools.feeds import feeds_from_columns
from model_tools.golden import build_golden, golden_indices
from model_tools.manifest import (
    CalibrationMap,
    Manifest,
    ReferenceProfile,
    RuntimeBudget,
)
from model_tools.parity import (
    ParityGateError,
    ParityRow,
    ParityThresholds,
    evaluate_variant,
    format_parity_table,
    sklearn_answers,
)
from model_tools.profile import build_profile
from model_tools.quantize import Variant, build_variants
from model_tools.reconstruction import fit_multivariate
from model_tools.schema import EstimatorSchema, Table, feature_specs, inspect_estimator, read_table
from model_tools.session import run_model
from model_tools.signing import key_id

__all__ = [
    "BuildResult",
    "ParityGateError",
    "ParityThresholds",
    "build_bundle",
    "choose_variant",
    "split_validation",
]

QuantizeMode = Literal["auto", "int8", "float32"]
Progress = Callable[[str], None]
VALIDATION_FRACTION = 0.2


@dataclass
class BuildResult:
    """What build_bundle made, and the evidence for it."""

    bundle_bytes: bytes
    path: Path | None
    manifest: Manifest
    parity: list[ParityRow]
    quantization: dict[str, Any]
    chosen: str
    reason: str
    key_id: str | None
    warnings: list[str] = field(default_factory=list)
    variants: list[Variant] = field(default_factory=list, repr=False)  # every candidate graph

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.bundle_bytes).hexdigest()

    @property
    def parity_text(self) -> str:
        return format_parity_table(self.parity, self.chosen, self.reason)

    def to_json(self) -> dict[str, Any]:
        """The stable JSON shape printed by `edgefleet model convert --json` (docs/model-tools.md)."""
        m = self.manifest
        return {
            "bundle": str(self.path) if self.path is not None else None,
            "sha256": self.sha256,
            "bytes": len(self.bundle_bytes),
            "name": m.name,
            "version": m.version,
            "task": m.task,
            "variant": self.chosen,
            "reason": self.reason,
            "signed": self.key_id is not None,
            "key_id": self.key_id,
            "parity": m.parity,
            "quantization": self.quantization,
            "budget": {
                "model_bytes": m.budget.model_bytes,
                "latency_ms_p50": m.budget.latency_ms_p50,
                "latency_ms_p99": m.budget.latency_ms_p99,
                "peak_memory_bytes": m.budget.peak_memory_bytes,
            },
            "profile_rows": m.profile.rows,
            "warnings": list(self.warnings),
        }


def split_validation(
    table: Table, fraction: float = VALIDATION_FRACTION, seed: int = 0
) -> tuple[Table, Table]:
    """Carve a seeded validation split from the sample: (rest, validation)."""
    n = table.n_rows
    if n < 10:
        return table, table  # too few rows to split: validate on everything, and say so upstream
    order = np.random.default_rng(seed).permutation(n)
    k = max(1, int(round(n * fraction)))
    return table.take(np.sort(order[k:])), table.take(np.sort(order[:k]))


def choose_variant(
    variants: list[Variant], rows: dict[str, ParityRow], mode: QuantizeMode
) -> tuple[Variant, str]:
    """The smallest variant that passes the gate (int8 only when quantization really happened)."""
    built = {v.name: v for v in variants if v.built}
    passing = [built[name] for name, row in rows.items() if row.passed]
    float32 = built["float32"]
    int8 = [v for v in variants if v.name != "float32"]
    if mode == "float32":
        if not rows["float32"].passed:
            raise _gate_error(rows, "float32 does not pass the parity gate")
        return float32, "float32 requested"
    int8_passing = [v for v in passing if v.name != "float32"]
    if mode == "int8":
        if not int8_passing:
            why = "; ".join(
                f"{v.name}: {v.note if not v.built else 'fails ' + ', '.join(rows[v.name].failures)}"
                for v in int8
            )
            raise _gate_error(
                rows, f"no int8 variant is usable ({why}); use --quantize auto or float32"
            )
        best = min(int8_passing, key=lambda v: v.size)
        return best, f"int8 requested; {best.name} is the smallest int8 variant that passes"
    if not passing:
        raise _gate_error(rows, "no variant passes the parity gate")
    best = min(passing, key=lambda v: (v.size, v.name != "float32"))
    if best.name != "float32":
        return best, (
            f"smallest passing variant: {best.size} bytes vs float32 {float32.size} "
            f"({best.size / float32.size:.0%})"
        )
    if not any(v.built for v in int8):
        return float32, "nothing to quantize: " + int8[0].note if int8 else "float32 only"
    notes = []
    for v in int8:
        if not v.built:
            notes.append(f"{v.name} {v.note}")
        elif not rows[v.name].passed:
            notes.append(f"{v.name} fails the gate ({', '.join(rows[v.name].failures)})")
        else:
            notes.append(f"{v.name} passes but is not smaller ({v.size} vs {float32.size} bytes)")
    return float32, "float32 kept: " + "; ".join(notes)


def _gate_error(rows: dict[str, ParityRow], message: str) -> ParityGateError:
    table = list(rows.values())
    return ParityGateError(
        f"parity gate failed: {message}. Check the validation data, or relax the thresholds "
        "(--min-agreement / --max-accuracy-drop) if the differences are acceptable",
        table,
        format_parity_table(table),
    )


def _lineage(
    estimator: Any, sample: Table, reference: Table, validation: Table, seed: int
) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("edgefleet", "scikit-learn", "skl2onnx", "onnx", "onnxruntime", "numpy"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    try:
        params = {k: repr(v)[:200] for k, v in estimator.get_params(deep=False).items()}
    except Exception:  # third-party estimators may not implement get_params fully
        params = {}
    return {
        "estimator": f"{type(estimator).__module__}.{type(estimator).__qualname__}",
        "final_estimator": type(final_estimator(estimator)).__name__,
        "params": params,
        "versions": versions,
        "python": platform.python_version(),
        "sample_sha256": sample.sha256,
        "reference_sha256": reference.sha256,
        "validation_sha256": validation.sha256,
        "sample_rows": sample.n_rows,
        "seed": seed,
    }


def _emit(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


def build_bundle(
    estimator: Any,
    sample: Any,
    *,
    name: str,
    version: str,
    validation: Any = None,
    reference: Any = None,
    quantize: QuantizeMode = "auto",
    sign_key: Ed25519PrivateKey | None = None,
    parity: ParityThresholds = ParityThresholds(),  # noqa: B008 - frozen dataclass
    progress: Progress | None = None,
    out_path: str | os.PathLike[str] | None = None,
    label_column: str | None = None,
    seed: int = 0,
    training: Any = None,
) -> BuildResult:
    """Turn a fitted estimator into a verified (and, with `sign_key`, signed) bundle.

    `sample`, `validation`, `reference` and `training` accept a path (.csv/.npy/.npz), a 2-D
    array, an (X, y) tuple or a `Table`. Without `validation`, 20 % of the sample is held out.
    `training` (labelled: the data the estimator was fitted on) lets a classifier's calibration
    map be fitted on out-of-fold probabilities of 5-fold cross-validation; without it, labelled
    validation data (held out from training) is used, see `model_tools.estimation`.
    Raises ParityGateError when no variant passes, ModelToolsError subclasses for bad input.
    """
    if quantize not in ("auto", "int8", "float32"):
        raise ModelToolsError(f"quantize must be auto, int8 or float32, not {quantize!r}")
    if not name or not version:
        raise ModelToolsError("a bundle needs a name and a version (--name, --version)")
    warnings: list[str] = []
    _emit(progress, "reading data")
    check_fitted(estimator)
    schema = inspect_estimator(estimator)
    sample_t = read_table(sample, schema, label_column)
    if validation is None:
        calib_t, valid_t = split_validation(sample_t, seed=seed)
        if calib_t is valid_t:
            warnings.append(
                f"sample has only {sample_t.n_rows} rows: validating on the sample itself; pass --validation"
            )
    else:
        calib_t, valid_t = sample_t, read_table(validation, schema, label_column)
    # The profile needs no labels: a reference file without the label column is accepted.
    ref_t = (
        sample_t
        if reference is None
        else read_table(reference, schema, label_column, label_optional=True)
    )
    specs = feature_specs(sample_t, schema)

    _emit(progress, "converting with skl2onnx")
    conv = convert(estimator, schema, sample_t.names)
    matmul: Conversion | None = None
    if quantize != "float32" and has_linear_op(conv.model_bytes):
        matmul = convert(estimator, schema, sample_t.names, linear_matmul=True)

    _emit(progress, f"quantizing ({quantize})")
    calib_feeds = feeds_from_columns(conv.onnx_inputs, calib_t.columns)
    variants = build_variants(
        conv.model_bytes,
        matmul_bytes=matmul.model_bytes if matmul is not None and matmul.linear_matmul else None,
        calibration=calib_feeds,
        mode=quantize,
    )

    _emit(progress, f"parity gate on {valid_t.n_rows} validation rows")
    valid_feeds = feeds_from_columns(conv.onnx_inputs, valid_t.columns)
    answers = sklearn_answers(estimator, _sklearn_input(valid_t, schema), conv.task, valid_t.labels)
    rows = {
        v.name: evaluate_variant(v.name, v.model_bytes, conv.outputs, valid_feeds, answers, parity)
        for v in variants
        if v.built
    }
    chosen, reason = choose_variant(variants, rows, quantize)
    if valid_t.labels is None:
        warnings.append(
            "no labels in the validation data: the gate checked agreement and output differences "
            "only, not accuracy/R² (add a label column, --label-column)"
        )

    _emit(progress, f"profiling {ref_t.n_rows} reference rows")
    ref_feeds = feeds_from_columns(conv.onnx_inputs, ref_t.columns)
    ref_out = run_model(chosen.model_bytes, ref_feeds)
    pred_name = conv.outputs.label if conv.task == "classification" else conv.outputs.value
    profile: ReferenceProfile = build_profile(
        specs, ref_t.columns, ref_out[pred_name], conv.task, conv.outputs.classes
    )
    warnings.extend(profile.warnings)
    profile.multivariate, why_not = fit_multivariate(specs, ref_t.columns)
    if why_not is not None and sum(s.kind == "numeric" for s in specs) >= 2:
        warnings.append(why_not)

    estimation = None
    n_classes = len(conv.outputs.classes or [])
    if n_classes > MAX_ESTIMATED_CLASSES:
        warnings.append(
            f"{n_classes} classes: no label-free performance estimate (its expected confusion matrix "
            f"would fill every telemetry window; at most {MAX_ESTIMATED_CLASSES} classes)"
        )
    elif conv.task == "classification" and conv.outputs.probabilities and conv.outputs.classes:
        _emit(progress, "calibration map for performance estimation")
        calibration = _calibration(
            estimator, schema, conv.outputs.classes, training, label_column, chosen.model_bytes,
            valid_t, valid_feeds, conv.outputs.probabilities, seed, warnings,
        )
        estimation = build_estimation(
            calibration, conv.outputs.classes, ref_out[conv.outputs.probabilities], ref_out[pred_name]
        )

    _emit(progress, "golden set and runtime budget")
    idx = golden_indices(valid_t.n_rows, seed=seed)
    golden = build_golden(chosen.model_bytes, {k: v[idx] for k, v in valid_feeds.items()})
    budget: RuntimeBudget = measure_budget_for(chosen.model_bytes, valid_feeds)

    quant_report = {
        "requested": quantize,
        "chosen": chosen.name,
        "reason": reason,
        "variants": [v.to_dict() for v in variants],
    }
    parity_report = {
        "thresholds": {
            "min_agreement": parity.min_agreement,
            "max_accuracy_drop": parity.max_accuracy_drop,
            "max_r2_drop": parity.max_r2_drop,
            "regression_tolerance": parity.regression_tolerance,
            "max_abs_diff": parity.max_abs_diff,
        },
        "rows": valid_t.n_rows,
        "labels": valid_t.labels is not None,
        "carved_from_sample": validation is None,
        "variants": [r.to_dict() for r in rows.values()],
        "chosen": chosen.name,
        "reason": reason,
    }
    manifest = Manifest(
        name=name,
        version=version,
        created_at=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        task=conv.task,
        inputs=specs,
        onnx_inputs=conv.onnx_inputs,
        outputs=conv.outputs,
        files={},
        variant=chosen.name,
        quantization=quant_report,
        parity=parity_report,
        lineage=_lineage(estimator, sample_t, ref_t, valid_t, seed),
        profile=profile,
        budget=budget,
        estimation=estimation,
    )
    _emit(progress, "packaging" + (" and signing" if sign_key is not None else " (unsigned)"))
    written = write_bundle(None, manifest, chosen.model_bytes, golden, sign_key)
    assert isinstance(written, bytes)
    path = None
    if out_path is not None:
        path = Path(out_path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(written)
        os.replace(tmp, path)
    from model_tools.bundle import read_bundle

    # Read back what we wrote: the manifest with its file hashes, exactly as a device will see it.
    final_manifest = read_bundle(written, require_signature=False).manifest
    return BuildResult(
        bundle_bytes=written,
        path=path,
        manifest=final_manifest,
        parity=list(rows.values()),
        quantization=quant_report,
        chosen=chosen.name,
        reason=reason,
        key_id=key_id(sign_key) if sign_key is not None else None,
        warnings=warnings,
        variants=variants,
    )


def _calibration(
    estimator: Any,
    schema: EstimatorSchema,
    classes: list[Any],
    training: Any,
    label_column: str | None,
    model_bytes: bytes,
    valid_t: Table,
    valid_feeds: dict[str, np.ndarray],
    proba_name: str,
    seed: int,
    warnings: list[str],
) -> CalibrationMap:
    """Out-of-fold probabilities of labelled training data, else the shipped model's on
    labelled validation data, else no calibration (the manifest says why)."""
    if training is not None:
        train_t = read_table(training, schema, label_column)
        if train_t.labels is None:
            warnings.append("the training data has no labels: it cannot calibrate (add a label column)")
        else:
            try:
                probs = out_of_fold_probabilities(
                    estimator, _sklearn_input(train_t, schema), train_t.labels, classes, seed=seed
                )
            except ValueError as exc:
                warnings.append(f"cross-validating the estimator failed ({exc}): calibrating on validation data")
            else:
                return fit_calibration(probs, class_index(list(train_t.labels), classes), "cross_validation", seed=seed)
    if valid_t.labels is None:
        return CalibrationMap(
            reason="no labelled data: raw probabilities are used uncalibrated (pass --training or labelled "
            "--validation data)"
        )
    probs = run_model(model_bytes, valid_feeds)[proba_name]
    return fit_calibration(probs, class_index(list(valid_t.labels), classes), "validation", seed=seed)


def measure_budget_for(model_bytes: bytes, feeds: dict[str, np.ndarray]) -> RuntimeBudget:
    from model_tools.budget import measure_budget

    return measure_budget(model_bytes, feeds)


def _sklearn_input(table: Table, schema: EstimatorSchema) -> Any:
    """Rows the way the estimator was fitted: a DataFrame when it knows feature names."""
    if schema.names is not None:
        try:
            import pandas as pd
        except ImportError as exc:
            raise InputDataError(
                "the model was fitted on a DataFrame (it has feature names): install pandas to "
                "let edgefleet compare its predictions"
            ) from exc
        return pd.DataFrame(dict(zip(table.names, table.columns, strict=True)))
    return table.matrix()
