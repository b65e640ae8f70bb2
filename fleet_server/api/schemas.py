"""The request bodies of the REST API as msgspec Structs: every JSON body is decoded against its
schema before a view uses it, so a wrong type, a number out of range, a control character or an
unknown field is a 400 naming the field, never a 500 from deeper down.

The OpenAPI document publishes the same schemas (`json_schemas()`), so clients and the hostile
input tests see exactly what the server checks.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import msgspec
from flask import request
from msgspec import UNSET, Meta, Struct, UnsetType

from fleet_server.api.common import DEEP_JSON, ApiError

# Names the protocol uses for devices, models and versions (edge_agent.protocol.ID_PATTERN).
ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
Id = Annotated[str, Meta(pattern=ID, description="1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")]
# Free text a person reads (reasons, comments, names): no NUL, newline or other control character.
PLAIN = r"^[^\x00-\x1f\x7f]*$"
Text = Annotated[str, Meta(pattern=PLAIN, max_length=1000)]
ShortText = Annotated[str, Meta(pattern=PLAIN, min_length=1, max_length=200)]
TagValue = Annotated[str, Meta(pattern=PLAIN, max_length=200)]
HOST_PORT = r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):[0-9]{1,5}$"
HostPort = Annotated[str, Meta(pattern=HOST_PORT, max_length=260, description="HOST:PORT, e.g. 127.0.0.1:8470")]
PathText = Annotated[str, Meta(pattern=PLAIN, min_length=1, max_length=4096)]
Url = Annotated[str, Meta(pattern=r"^https?://[^\x00-\x20\x7f]+$", max_length=2048)]
Secret = Annotated[str, Meta(pattern=r"^[\x21-\x7e]+$", min_length=16, max_length=256)]
Pem = Annotated[str, Meta(min_length=1, max_length=16384)]
Seconds = Annotated[float, Meta(gt=0, le=366 * 86400.0)]
Count = Annotated[int, Meta(ge=0, le=10**9)]
Ratio = Annotated[float, Meta(ge=-1e6, le=1e6)]


class Body(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A request body: unknown fields are refused (a typo would otherwise be ignored)."""


# ------------------------------------------------------------------ devices


class DeviceCreate(Body):
    """POST /devices: provision a device; the options go into its printed agent config."""

    id: Id
    tags: Annotated[dict[Annotated[str, Meta(pattern=PLAIN, min_length=1, max_length=64)], TagValue],
                    Meta(max_length=64)] = {}
    data_dir: PathText | UnsetType = UNSET  # the agent's data_dir
    listen: HostPort | UnsetType = UNSET  # the agent's local HTTP API
    window_s: Annotated[float, Meta(gt=0, le=86400)] | UnsetType = UNSET  # telemetry window


class DeviceTags(Body):
    """PUT /devices/{id}/tags: the device's tags, replaced as a whole (keys are checked by
    fleet_server.device_groups)."""

    tags: Annotated[dict[Annotated[str, Meta(min_length=1, max_length=64)], TagValue], Meta(max_length=64)]


class GroupPut(Body):
    """PUT /groups/{name}: a saved tag query (docs/api.md for the query language)."""

    query: Annotated[str, Meta(pattern=PLAIN, min_length=1, max_length=4000)]
    description: Text = ""


class RotationRef(Body):
    """POST /device/credentials and /device/credentials/confirm (the device itself)."""

    rotation_id: Annotated[str, Meta(pattern=PLAIN, min_length=1, max_length=64)]


# ------------------------------------------------------------------ models


class DriftPolicyOverrides(Body):
    """The keys of a model version's drift policy that differ from the server's default."""

    warn_psi: Annotated[float, Meta(gt=0, le=100)] | UnsetType = UNSET
    alert_psi: Annotated[float, Meta(gt=0, le=100)] | UnsetType = UNSET
    min_predictions: Count | UnsetType = UNSET
    consecutive: Annotated[int, Meta(ge=1, le=10**6)] | UnsetType = UNSET


class PolicyUpdate(Body):
    """PUT /models/{name}/{version}/policy: `null` restores the server's default policy."""

    policy: DriftPolicyOverrides | None


class KeyCreate(Body):
    """POST /keys: trust an Ed25519 public key."""

    pem: Pem
    comment: Text = ""


# ------------------------------------------------------------------ alerts


class WebhookCreate(Body):
    """POST /webhooks: where alerts go; the secret signs each delivery (random when absent)."""

    url: Url
    secret: Secret | None = None


# ------------------------------------------------------------------ rollouts


class TargetBody(Body):
    all: bool = False
    tags: Annotated[dict[Annotated[str, Meta(pattern=PLAIN, min_length=1, max_length=64)], TagValue],
                    Meta(max_length=64)] | UnsetType = UNSET
    group: TagValue | None = None
    device_group: Annotated[str, Meta(pattern=PLAIN, min_length=1, max_length=64)] | None = None  # a saved group
    query: Annotated[str, Meta(pattern=PLAIN, min_length=1, max_length=4000)] | None = None
    devices: Annotated[list[Id], Meta(max_length=1_000_000)] | UnsetType = UNSET


class StageBody(Body):
    percent: Annotated[float, Meta(gt=0, le=100)] | None = None
    count: Annotated[int, Meta(ge=1, le=10**9)] | None = None
    mode: Literal["live", "shadow"] = "live"
    min_soak_s: Annotated[float, Meta(ge=0, le=366 * 86400.0)] | UnsetType = UNSET
    min_reporting: Count | UnsetType = UNSET
    approval: bool = False


class GateSettings(Body):
    max: Ratio | UnsetType = UNSET
    min: Ratio | UnsetType = UNSET
    min_sample: Count | UnsetType = UNSET
    enabled: bool | UnsetType = UNSET
    floor_ms: Annotated[float, Meta(ge=0, le=1e6)] | UnsetType = UNSET
    wait_s: Annotated[float, Meta(ge=0, le=366 * 86400.0)] | UnsetType = UNSET


class WindowBody(Body):
    """A recurring maintenance window (hawkBit's model): opens at each match of `cron` (5 fields,
    wall clock in `timezone`) for `duration` ('2h', '90m' or seconds)."""

    cron: Annotated[str, Meta(pattern=PLAIN, min_length=9, max_length=200, examples=["0 2 * * *"])]
    duration: Annotated[str, Meta(pattern=PLAIN, min_length=1, max_length=40)] | Annotated[
        float, Meta(gt=0, le=7 * 86400.0)]
    timezone: Annotated[str, Meta(pattern=PLAIN, min_length=1, max_length=64, examples=["Europe/Madrid"])] = "UTC"


class ScheduleBody(Body):
    """When a rollout may act (docs/rollouts.md, schedules): not before a time (ISO 8601 with its
    offset, or epoch seconds); stages take devices only inside `window`; with `device_windows`,
    each device activates only inside its own window (tags maintenance_window, maintenance_tz)."""

    not_before: Annotated[str, Meta(pattern=PLAIN, max_length=64)] | Annotated[
        float, Meta(ge=0, le=4_102_444_800.0)] | None = None  # up to 2100-01-01
    window: WindowBody | None = None
    device_windows: bool = False


class RolloutCreate(Body):
    """POST /rollouts (docs/rollouts.md); the controller checks the meaning (gate names, ...)."""

    model: Id
    version: Id
    target: TargetBody | UnsetType = UNSET
    stages: Annotated[list[StageBody], Meta(max_length=100)] | UnsetType = UNSET
    gates: Annotated[dict[Annotated[str, Meta(max_length=64)], GateSettings], Meta(max_length=64)] | UnsetType = UNSET
    on_failure: Literal["pause", "rollback"] = "pause"
    device_timeout_s: Seconds | UnsetType = UNSET
    name: Text = ""
    blue_green: bool = False
    schedule: ScheduleBody | None = None


class RolloutAction(Body):
    """POST /rollouts/{id}/pause, /resume, /advance and /abort; the body may be empty. The
    reason is kept in the audit log of pause and abort."""

    reason: Text = ""


# ------------------------------------------------------------------ decoding

S = TypeVar("S", bound=Body)

# The schema of each JSON body the API takes, by (method, OpenAPI path): used by the views and
# published in the OpenAPI document.
REQUEST_BODIES: dict[tuple[str, str], type[Body]] = {
    ("post", "/api/v1/devices"): DeviceCreate,
    ("put", "/api/v1/devices/{device_id}/tags"): DeviceTags,
    ("put", "/api/v1/groups/{name}"): GroupPut,
    ("post", "/api/v1/device/credentials"): RotationRef,
    ("post", "/api/v1/device/credentials/confirm"): RotationRef,
    ("put", "/api/v1/models/{name}/{version}/policy"): PolicyUpdate,
    ("post", "/api/v1/keys"): KeyCreate,
    ("post", "/api/v1/webhooks"): WebhookCreate,
    ("post", "/api/v1/rollouts"): RolloutCreate,
    ("post", "/api/v1/rollouts/{rollout_id}/pause"): RolloutAction,
    ("post", "/api/v1/rollouts/{rollout_id}/abort"): RolloutAction,
    ("post", "/api/v1/rollouts/{rollout_id}/resume"): RolloutAction,
    ("post", "/api/v1/rollouts/{rollout_id}/advance"): RolloutAction,
}
OPTIONAL_BODY = (RolloutAction,)
DEEP_NESTING = b"[" * 1000  # no body of this API nests arrays a thousand deep

_PATTERNS = {
    ID: "not valid: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
    PLAIN: "must be text without control characters (NUL, newline, tab, ...)",
    HOST_PORT: "must be HOST:PORT, e.g. 127.0.0.1:8470",
}
_TYPES = {"`float`": "a number", "`int`": "a whole number", "`str`": "a string", "`bool`": "true or false",
          "`array`": "an array", "`object`": "an object", "`null`": "null"}


def explain(exc: msgspec.ValidationError | msgspec.DecodeError) -> str:
    """msgspec's message turned around so it starts with the field: `window_s: expected ...`."""
    text = str(exc)
    message, sep, where = text.rpartition(" - at `")
    if not sep:
        message, where = text, "$"
    field = where.rstrip("`").removeprefix("$").lstrip(".") or "the body"
    for pattern, readable in _PATTERNS.items():
        if message == f"Expected `str` matching regex {pattern!r}":
            message = readable
    for name, readable in _TYPES.items():
        message = message.replace(name, readable)
    message = message.replace("`", "'")
    return f"{field}: {message[:1].lower()}{message[1:]}"


def decode(schema: type[S], data: bytes) -> S:
    """Decode JSON bytes against `schema`; ApiError (400) naming the field otherwise."""
    if DEEP_NESTING in data:  # msgspec stops at the first wrong type; say what the body really is
        raise ApiError(DEEP_JSON)
    try:
        return msgspec.json.decode(data, type=schema)
    except RecursionError:
        raise ApiError(DEEP_JSON) from None
    except msgspec.ValidationError as exc:
        raise ApiError(f"invalid request body: {explain(exc)}") from None
    except msgspec.DecodeError as exc:
        raise ApiError(f"the request body is not valid JSON ({exc}): send a JSON object") from None


def body(schema: type[S]) -> S:
    """The request's JSON body as `schema`. Actions whose body is optional accept an empty one."""
    data = request.get_data(cache=True)
    if not data.strip() and schema in OPTIONAL_BODY:
        return schema()
    if not request.is_json:
        raise ApiError("the request body must be a JSON object (Content-Type: application/json)")
    return decode(schema, data)


def to_dict(value: Body) -> dict[str, Any]:
    """A decoded body as plain JSON types, without the fields the client left out."""
    return msgspec.to_builtins(value)


def json_schemas() -> dict[str, Any]:
    """JSON Schema of every request body, for the OpenAPI document's components."""
    _, components = msgspec.json.schema_components(
        sorted(set(REQUEST_BODIES.values()), key=lambda s: s.__name__), ref_template="#/components/schemas/{name}"
    )
    return components
