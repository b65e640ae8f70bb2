"""The MQTT wire format (DESIGN section 3): topics and typed payloads, shared by agent and server.

Every payload is JSON with a `v` field. Decoding validates types and sizes; anything that does
not decode is a `ProtocolError` with a short `reason` the server counts rejects by.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Literal

import msgspec

PROTOCOL_VERSION = 1
MAX_PAYLOAD_BYTES = 256 * 1024  # larger messages are rejected unread
TOPIC_ROOT = "ef"

TopicKind = Literal["desired", "ack", "credentials", "reported", "status", "telemetry", "events"]
DEVICE_TOPICS: tuple[str, ...] = ("reported", "status", "telemetry", "events")
# `credentials`: a password rotation's notice (retained; no secret in it), see edge_agent/credentials.py.
SERVER_TOPICS: tuple[str, ...] = ("desired", "ack", "credentials")

# A device's seqs count up from its install's first seq, the outbox's creation time in seconds
# shifted left by this many bits: a reinstall (a new data dir under the same device id) a second
# or more later starts about 2**20 per second above the previous install's seqs. To the server,
# a seq more than SEQ_NEW_INSTALL_JUMP above a device's highest is a new install; a real gap
# (messages an outbox dropped under its byte bound) stays far below it.
SEQ_INSTALL_SHIFT = 20
SEQ_NEW_INSTALL_JUMP = 1 << (SEQ_INSTALL_SHIFT - 1)

# Fleet and device ids appear in topics, file names and URLs: keep them to a safe alphabet.
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# Fixed latency histogram edges (milliseconds, right-closed like every other bin here) so that
# histograms from any device and window add up. The last bin is (1000, +inf).
LATENCY_EDGES_MS: tuple[float, ...] = (
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0,
)

UpdateMode = Literal["live", "shadow"]

# Ground-truth feedback bins (right-closed). Calibration: the predicted top-class probability in
# deciles (0, .1], (.1, .2], ..., (.9, 1]. Regression errors: |truth - prediction| in multiples
# of the reference predictions' spread (see feedback_error_edges).
CALIBRATION_EDGES: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
FEEDBACK_ERROR_SCALE: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
FEEDBACK_ANOMALY_CLASSES: tuple[int, ...] = (-1, 1)  # outlier, inlier (scikit-learn's labels)


class ProtocolError(ValueError):
    """A message that does not follow the protocol; `reason` is a short countable key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# Counts and sequence numbers a device sends: non-negative and at most 2**53, so that sums stay
# within SQLite's 64-bit INTEGER and JSON's exact integers (a larger one refused as `invalid`
# instead of failing the whole ingest batch at storage).
Count = Annotated[int, msgspec.Meta(ge=0, le=2**53)]

def valid_id(value: str) -> bool:
    return bool(ID_PATTERN.match(value))


def topic(fleet: str, device: str, kind: TopicKind) -> str:
    """`ef/{fleet}/d/{device}/{kind}`; ids are checked so that no wildcard or slash slips in."""
    if not valid_id(fleet) or not valid_id(device):
        raise ProtocolError("bad_id", f"fleet {fleet!r} / device {device!r}")
    return f"{TOPIC_ROOT}/{fleet}/d/{device}/{kind}"


def parse_topic(name: str) -> tuple[str, str, str]:
    """Split a device topic into (fleet, device, kind) or raise ProtocolError('foreign_topic')."""
    parts = name.split("/")
    if (
        len(parts) != 5
        or parts[0] != TOPIC_ROOT
        or parts[2] != "d"
        or not valid_id(parts[1])
        or not valid_id(parts[3])
        or parts[4] not in DEVICE_TOPICS + SERVER_TOPICS
    ):
        raise ProtocolError("foreign_topic", name[:200])
    return parts[1], parts[3], parts[4]


def subscription(fleet: str = "+", kind: str = "+", shared_group: str | None = None) -> str:
    """A subscription filter for device topics, optionally as an MQTT 5 shared subscription."""
    flt = f"{TOPIC_ROOT}/{fleet}/d/+/{kind}"
    return f"$share/{shared_group}/{flt}" if shared_group else flt


def feedback_error_edges(prediction_edges: Sequence[float] | None) -> list[float]:
    """Absolute-error bin edges of a regression model, from its profile's prediction edges.

    The scale is the spread of the reference predictions between the outer profile edges (the
    10th and 90th percentiles by default); if that is zero, the largest |edge|; else 1.0.
    Agent and server both call this, so the bins of every device line up.
    """
    edges = list(prediction_edges or ())
    scale = edges[-1] - edges[0] if len(edges) >= 2 else 0.0
    if not scale > 0:
        scale = max((abs(e) for e in edges), default=0.0) or 1.0
    return [scale * k for k in FEEDBACK_ERROR_SCALE]


# ---------------------------------------------------------------- server -> device


class DesiredState(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """The model a device should run (retained on `desired`). Reconciled, not a command."""

    v: int = PROTOCOL_VERSION
    model: str  # bundle name
    version: str  # bundle version
    url: str  # download URL (the device authenticates with its credentials)
    sha256: str  # of the whole .efb file
    size: int  # bytes of the .efb file
    mode: UpdateMode = "live"
    rollout_id: str | None = None
    allow_downgrade: bool = False  # replaying an older version needs the rollout to ask for it
    # A different input schema would break local apps; the rollout must say it means it.
    allow_schema_change: bool = False
    issued_at: float = 0.0
    # Maintenance windows: [start, end) UTC epoch seconds inside which a live update may be
    # activated; the device downloads, verifies and self-tests before. None: at once.
    activate_windows: list[tuple[float, float]] | None = None


class DeliveryAck(msgspec.Struct, kw_only=True):
    """The seqs of a device's outbox messages the server has stored (on `ack`, not retained).

    A PUBACK only proves that the broker received a message; this proves that the server has it:
    stored now, stored before (a duplicate is acknowledged again), or refused for good (a resend
    could not change that). Only then does the device delete the message from its outbox.
    """

    v: int = PROTOCOL_VERSION
    device: str
    seqs: list[Count]


# ---------------------------------------------------------------- device -> server


class Hardware(msgspec.Struct, kw_only=True):
    arch: str = ""
    ram_mb: int = 0
    cpu_count: int = 0
    cpu_model: str = ""
    profile: str = ""  # simulated hardware profile name, empty on real devices


class ReportedState(msgspec.Struct, kw_only=True):
    """What a device runs and where its update is (retained on `reported`)."""

    v: int = PROTOCOL_VERSION
    device: str
    ts: float
    model: str | None = None
    active_version: str | None = None
    previous_version: str | None = None
    candidate_version: str | None = None  # being installed, or running in shadow
    mode: UpdateMode | None = None  # mode of the candidate
    rollout_id: str | None = None
    update_state: str = "idle"
    update_outcome: str | None = None  # success / failure / rolled_back / rollback_failed
    # Idle after a transient failure with attempts left: the device will try the same desired
    # again (a rollout counts it as still updating, not failed).
    update_retry: bool = False
    last_error: str | None = None
    agent_version: str = ""
    hardware: Hardware = msgspec.field(default_factory=Hardware)
    uptime_s: float = 0.0


class Status(msgspec.Struct, kw_only=True):
    """`online` / `offline` (retained; `offline` is also the MQTT last will)."""

    v: int = PROTOCOL_VERSION
    device: str
    state: Literal["online", "offline"]
    ts: float


class Histogram(msgspec.Struct, kw_only=True):
    """Counts over LATENCY_EDGES_MS (len(edges) + 1 bins)."""

    counts: list[int]
    sum_ms: float = 0.0


class FeatureCounts(msgspec.Struct, kw_only=True, array_like=True):
    """One feature's window counts in the bundle's reference bins (array-like on the wire).

    `bins` aligns with the profile's bins (numeric: len(edges)+1; categorical: len(categories)+1
    with "other" last). `unseen` counts categories never seen in training (also in "other").
    """

    bins: list[Count]
    nan: Count = 0
    below_min: Count = 0
    above_max: Count = 0
    unseen: Count = 0


class ShadowCounts(msgspec.Struct, kw_only=True):
    """A shadow candidate beside the active model on the same live requests."""

    version: str
    compared: int = 0
    agreed: int = 0  # same label (classification) or within tolerance (regression)
    errors: int = 0
    latency: Histogram | None = None
    prediction: FeatureCounts | None = None  # candidate's predictions in the profile's bins


class SampleRow(msgspec.Struct, kw_only=True, array_like=True):
    """One reservoir-sampled (input, output) pair; features turned off for privacy are null."""

    x: list[float | str | None]
    y: float | str | int | None


class Resources(msgspec.Struct, kw_only=True):
    cpu_s: float = 0.0
    rss_bytes: int = 0
    disk_free_bytes: int = 0


class Feedback(msgspec.Struct, kw_only=True):
    """Ground truth joined with one model version's predictions in a window (mergeable counts).

    Every field adds up across windows and devices of the same `version`. Classification:
    `confusion` is [true class][predicted class] in the order of the manifest's classes (anomaly
    models: FEEDBACK_ANOMALY_CLASSES) and sums to `joined`; the calibration lists bin the
    predicted top-class probability over CALIBRATION_EDGES (models with probabilities only).
    Regression: `joined` is the count behind `abs_error_sum` / `sq_error_sum` (MAE, RMSE) and
    `error_bins` counts |truth - prediction| over `feedback_error_edges(profile edges)`.
    `late`, `unknown`, `duplicate` and `rejected` describe feedback that joined nothing: they
    are counted in the window's main block (`TelemetryWindow.feedback`) only.
    """

    version: str | None = None  # model version that made the joined predictions
    joined: int = 0  # feedback items joined into the counts below
    unknown_label: int = 0  # joined to a prediction, but the truth is not one of its classes
    late: int = 0  # well-formed id whose prediction is no longer in the record
    unknown: int = 0  # id this agent never issued
    duplicate: int = 0  # a second answer for the same prediction (the first one counts)
    rejected: int = 0  # feedback requests refused as malformed (nothing in them was counted)
    confusion: list[list[int]] | None = None  # [true class][predicted class], classes order
    abs_error_sum: float = 0.0
    sq_error_sum: float = 0.0
    error_bins: list[int] | None = None  # len(feedback_error_edges(...)) + 1 bins
    calibration_counts: list[int] | None = None  # predictions per probability decile
    calibration_hits: list[int] | None = None  # of those, how many were right
    calibration_prob_sum: list[float] | None = None  # sum of top-class probabilities per decile


class PerformanceEstimate(msgspec.Struct, kw_only=True):
    """Label-free performance sums of one window's predictions (CBPE), all mergeable by adding.

    Per row, `p` is the calibrated probability vector (the manifest's `estimation.calibration`
    applied to the model's probabilities) and `k` the predicted class, in the manifest's class
    order. `confusion[c][k]` sums p[c] over rows predicted k: the expected confusion matrix,
    [true class][predicted class] like `Feedback.confusion`. `predicted[k]` counts rows predicted
    k; `confidence_sq_sum` is Σ p[k]² (the sampling noise of the expected accuracy needs it).
    Binary models also count rows per bin of the raw positive probability over
    `estimation.score_edges` (`score_counts`) and sum the calibrated positive probability per bin
    (`score_positive`): cumulated in score order, the expected ROC curve.
    """

    rows: Count = 0
    predicted: list[Count] = []
    confusion: list[list[float]] = []
    confidence_sq_sum: float = 0.0
    score_counts: list[Count] | None = None
    score_positive: list[float] | None = None


class ReconstructionSums(msgspec.Struct, kw_only=True):
    """The window's per-row PCA reconstruction errors (profile.multivariate), mergeable.

    `bins` counts errors over the profile's reference `edges`; `filled` counts rows that had a
    NaN replaced by the reference median before the error was computed.
    """

    rows: Count = 0
    sum: float = 0.0
    sum_sq: float = 0.0
    bins: list[Count] = []
    filled: Count = 0


class QualityCounts(msgspec.Struct, kw_only=True, array_like=True):
    """One feature's values in refused rows: missing/NaN, outside the training range, of the
    wrong type (a string for a number, a number for a category), and unseen categories."""

    nan: Count = 0
    below_min: Count = 0
    above_max: Count = 0
    wrong_type: Count = 0
    unseen: Count = 0


class RefusedRows(msgspec.Struct, kw_only=True):
    """Rows of predict requests refused by validation, still counted per feature.

    A refused request refuses all its rows; each row's values are counted here (a data-quality
    statistic), never binned into `features`. Rows of the wrong shape (wrong value count, not a
    list or object) count in `malformed` only. Data quality of a feature over every row a
    device was asked about: `features[j]` of the window (accepted rows) plus `refused.features[j]`,
    over `predictions + refused.rows`.
    """

    rows: Count = 0
    malformed: Count = 0
    features: list[QualityCounts] = []  # aligned with the manifest's inputs


class TelemetryWindow(msgspec.Struct, kw_only=True):
    """One window of a device's serving, summarised into mergeable counts."""

    v: int = PROTOCOL_VERSION
    device: str
    seq: Count
    model: str | None
    model_version: str | None
    window_start: float
    window_end: float
    sent_at: float = 0.0
    predictions: Count = 0  # rows predicted
    requests: Count = 0
    errors: dict[str, Count] = {}  # validation and runtime errors by kind
    latency: Histogram
    features: list[FeatureCounts] = []  # aligned with the manifest's inputs
    prediction: FeatureCounts | None = None  # aligned with the profile's prediction bins
    shadow: ShadowCounts | None = None
    sample: list[SampleRow] = []
    feedback: Feedback | None = None  # the window's model version, and the unjoinable counters
    feedback_other: list[Feedback] = []  # late-arriving truth for predictions of other versions
    resources: Resources = msgspec.field(default_factory=Resources)
    dropped_total: Count = 0  # outbox messages this device dropped since it was installed
    # Optional (older agents send none, older servers ignore them): see the types above.
    estimate: PerformanceEstimate | None = None  # classifiers whose bundle has `estimation`
    multivariate: ReconstructionSums | None = None  # bundles whose profile has `multivariate`
    refused: RefusedRows | None = None  # only when the window refused rows


class UpdateEvent(msgspec.Struct, kw_only=True):
    """One transition of the update state machine, or a refusal, with its reason."""

    v: int = PROTOCOL_VERSION
    device: str
    seq: Count
    ts: float
    kind: Literal["transition", "refused", "outcome"] = "transition"
    from_state: str | None = None
    to_state: str | None = None
    event: str | None = None  # success / failure / nothing_to_do
    version: str | None = None
    rollout_id: str | None = None
    outcome: str | None = None
    reason: str | None = None


_MESSAGE_TYPES: dict[str, type[msgspec.Struct]] = {
    "desired": DesiredState,
    "ack": DeliveryAck,
    "reported": ReportedState,
    "status": Status,
    "telemetry": TelemetryWindow,
    "events": UpdateEvent,
}
_decoders = {kind: msgspec.json.Decoder(t) for kind, t in _MESSAGE_TYPES.items()}
_encoder = msgspec.json.Encoder()


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def decode(kind: str, payload: bytes) -> msgspec.Struct:
    """Decode and validate a payload of the given topic kind, or raise ProtocolError."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ProtocolError("oversized", f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
    decoder = _decoders.get(kind)
    if decoder is None:
        raise ProtocolError("foreign_topic", kind)
    try:
        message = decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise ProtocolError("invalid", str(exc)[:200]) from exc
    except msgspec.DecodeError as exc:
        raise ProtocolError("malformed", str(exc)[:200]) from exc
    except RecursionError:  # msgspec recurses per nesting level; one such payload must not kill ingest
        raise ProtocolError("malformed", "JSON nested too deeply") from None
    except UnicodeDecodeError as exc:  # a string that is not UTF-8: msgspec raises this, not DecodeError
        raise ProtocolError("malformed", f"not UTF-8: {exc}"[:200]) from None
    if message.v != PROTOCOL_VERSION:
        raise ProtocolError("unsupported_version", f"v={message.v}")
    return message
