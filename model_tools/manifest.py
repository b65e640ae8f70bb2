"""The bundle manifest: the typed contents of `manifest.json`, shared by tools, agent and server.

Light on purpose (msgspec + stdlib): the agent on a device reads it without scikit-learn.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

FORMAT_VERSION = 1

Task = Literal["classification", "regression", "anomaly"]
FeatureKind = Literal["numeric", "categorical"]
DType = Literal["float32", "float64", "int64", "string"]


class FeatureSpec(msgspec.Struct, kw_only=True):
    """One input column as local apps send it."""

    name: str
    kind: FeatureKind
    dtype: DType
    allow_nan: bool = False
    min: float | None = None  # training minimum (numeric)
    max: float | None = None  # training maximum (numeric)
    categories: list[str] | None = None  # every category seen in training (categorical)


class OnnxInput(msgspec.Struct, kw_only=True):
    """One input tensor of the ONNX graph and the feature columns that fill it, in order."""

    name: str
    dtype: DType
    columns: list[int]


class OutputSpec(msgspec.Struct, kw_only=True):
    """Where the graph puts its answers."""

    label: str | None = None  # output name of the predicted label (classification, anomaly)
    probabilities: str | None = None  # output name of the [N, n_classes] matrix (zipmap off)
    value: str | None = None  # output name of the regression value or anomaly score
    classes: list[str | int] | None = None  # class labels, column order of probabilities


class BinnedDistribution(msgspec.Struct, kw_only=True):
    """Counts of one feature (or of the prediction) in fixed bins.

    Numeric: `edges` (right-closed bins, see `model_tools.profile`), `counts` has len(edges)+1
    entries. Categorical / class labels: `categories`, `counts` has len(categories)+1 entries,
    the last one being "other". `nan` is its own bin; `below_min`/`above_max` count values
    outside the training range (they are also in the outer bins).
    """

    edges: list[float] | None = None
    categories: list[str] | None = None
    counts: list[int]
    nan: int = 0
    below_min: int = 0
    above_max: int = 0


class FeatureProfile(msgspec.Struct, kw_only=True):
    name: str
    kind: FeatureKind
    distribution: BinnedDistribution
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    std: float | None = None


class MultivariateProfile(msgspec.Struct, kw_only=True):
    """A PCA of the reference's numeric features, for the per-row reconstruction error.

    A row's error: take the `features` columns, replace NaN by `fill` (the reference medians),
    standardise with `mean`/`scale`, project on the `components` (orthonormal rows) and back, and
    take the Euclidean norm of what the projection lost. `edges` are the reference errors'
    deciles (right-closed bins like every other here), `counts` the reference errors in them.
    """

    features: list[int]  # indices into Manifest.inputs (numeric features only)
    fill: list[float]
    mean: list[float]
    scale: list[float]
    components: list[list[float]]  # [k][len(features)]
    variance_target: float = 0.65  # share of variance the components must explain
    explained: float = 0.0  # share they do explain on the reference
    edges: list[float] = []
    counts: list[int] = []
    rows: int = 0
    mean_error: float = 0.0
    std_error: float = 0.0


class ReferenceProfile(msgspec.Struct, kw_only=True):
    """What "normal" looks like: the reference data's bins and the prediction distribution."""

    rows: int
    features: list[FeatureProfile]
    prediction: BinnedDistribution
    warnings: list[str] = []
    multivariate: MultivariateProfile | None = None  # absent: no multivariate drift


class CalibrationMap(msgspec.Struct, kw_only=True):
    """Monotone piecewise-linear maps from a classifier's raw probabilities to calibrated ones.

    Column `columns[i]` of the probability matrix maps through `np.interp(p, knots[i], values[i])`.
    Binary models map the positive column (1) only and take 1 - p for the other; multiclass
    models map every column one-vs-rest and then divide each row by its sum. `applied` False
    means the raw probabilities are used as they are: calibrating did not lower the expected
    calibration error on held-out folds (`ece_raw`, `ece_calibrated`), or there were no labels.
    """

    applied: bool = False
    method: Literal["isotonic", "identity"] = "identity"
    source: Literal["cross_validation", "validation", "none"] = "none"
    rows: int = 0  # labelled rows the map was chosen and fitted on
    folds: int = 0
    ece_raw: float | None = None
    ece_calibrated: float | None = None
    columns: list[int] = []
    knots: list[list[float]] = []
    values: list[list[float]] = []
    reason: str = ""


class PerformanceEstimation(msgspec.Struct, kw_only=True):
    """What a device needs to estimate a classifier's performance without labels (CBPE)."""

    calibration: CalibrationMap
    positive: int | None = None  # binary models: column of the positive class
    # Binary models: edges of the raw positive-probability histogram (right-closed).
    score_edges: list[float] | None = None
    reference_rows: int = 0
    reference_accuracy: float | None = None  # expected accuracy on the reference data


class RuntimeBudget(msgspec.Struct, kw_only=True):
    model_bytes: int
    latency_ms_p50: float
    latency_ms_p99: float
    peak_memory_bytes: int
    # SelfTest on a device fails when its median single-row latency exceeds
    # latency_ms_p50 * latency_tolerance (devices are slower than laptops).
    latency_tolerance: float = 20.0


class GoldenTolerance(msgspec.Struct, kw_only=True):
    atol: float = 1e-4
    rtol: float = 1e-3


class Manifest(msgspec.Struct, kw_only=True):
    format_version: int = FORMAT_VERSION
    name: str
    version: str
    created_at: str  # ISO 8601 UTC
    task: Task
    inputs: list[FeatureSpec]
    onnx_inputs: list[OnnxInput]
    outputs: OutputSpec
    files: dict[str, str]  # member name -> sha256 hex, every member but manifest.json/.sig
    variant: Literal["float32", "int8-dynamic", "int8-static"] = "float32"
    quantization: dict[str, Any] = {}
    parity: dict[str, Any] = {}
    lineage: dict[str, Any] = {}
    profile: ReferenceProfile
    budget: RuntimeBudget
    golden_tolerance: GoldenTolerance = msgspec.field(default_factory=GoldenTolerance)
    estimation: PerformanceEstimation | None = None  # classifiers with probabilities only

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.inputs]


class ManifestError(ValueError):
    """The manifest is not valid JSON of the expected shape."""


_decoder = msgspec.json.Decoder(Manifest)


def decode_manifest(data: bytes) -> Manifest:
    """Parse and type-check manifest bytes; raise ManifestError with the reason."""
    try:
        manifest = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ManifestError(f"manifest.json is invalid: {exc}") from exc
    if manifest.format_version != FORMAT_VERSION:
        raise ManifestError(
            f"manifest format_version {manifest.format_version} is not supported "
            f"(this edgefleet reads version {FORMAT_VERSION}); upgrade edgefleet"
        )
    return manifest


def encode_manifest(manifest: Manifest) -> bytes:
    """Canonical bytes of a manifest (sorted keys, so signing is reproducible)."""
    return msgspec.json.format(msgspec.json.encode(manifest, order="sorted"), indent=2)
