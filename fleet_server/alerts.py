"""Drift alert policy and the alert state machine: pure, no storage, no clock.

For one series - (scope, model version, feature or prediction) - a time-ordered sequence of
per-bucket drift results goes in; open/resolve transitions come out. The server persists them
(and the evaluator's state) and posts them to webhooks. Semantics follow Prometheus rules with
`for:` and two severities: see docs/drift.md, "Alert lifecycle".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from enum import StrEnum
from typing import Any

__all__ = [
    "AlertTransition",
    "BucketDrift",
    "DriftPolicy",
    "Evaluation",
    "Level",
    "LevelState",
    "Notification",
    "PolicyError",
    "SeriesState",
    "evaluate",
]

Bucket = float | int | str  # a bucket's start time (or any ordered, JSON-able id)


class Level(StrEnum):
    """A series' drift level in one eligible bucket. `warn` and `alert` are also severities."""

    OK = "ok"
    WARN = "warn"
    ALERT = "alert"


_RANK = {Level.OK: 0, Level.WARN: 1, Level.ALERT: 2}
_SEVERITIES = (Level.WARN, Level.ALERT)


class PolicyError(ValueError):
    """A drift policy override that cannot be used; the message says which key and why."""


@dataclass(frozen=True, slots=True)
class DriftPolicy:
    """When drift becomes a warning or an alert (DESIGN section 5 defaults)."""

    warn_psi: float = 0.1
    alert_psi: float = 0.25
    min_predictions: int = 500  # rows a bucket needs before its PSI counts at all
    consecutive: int = 3  # eligible buckets in a row at a level before the alert opens

    def __post_init__(self) -> None:
        for name in ("warn_psi", "alert_psi"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise PolicyError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise PolicyError(f"{name} must be a positive number, got {value!r}")
        for name, lowest in (("min_predictions", 0), ("consecutive", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise PolicyError(f"{name} must be a whole number, got {value!r}")
            if value < lowest:
                raise PolicyError(f"{name} must be at least {lowest}, got {value}")
        if self.warn_psi > self.alert_psi:
            raise PolicyError(
                f"warn_psi ({self.warn_psi}) must not exceed alert_psi ({self.alert_psi})"
            )

    @classmethod
    def from_dict(
        cls, overrides: Mapping[str, Any] | None, base: DriftPolicy | None = None
    ) -> DriftPolicy:
        """`base` (the defaults unless given) with the keys of `overrides` replaced.

        Unknown keys are refused rather than ignored: a typo (`alert_pis`) would otherwise
        silently keep the default. Whole floats (500.0, as JSON may carry) are accepted
        for the integer settings.
        """
        base = base or cls()
        if not overrides:
            return base
        if not isinstance(overrides, Mapping):
            raise PolicyError(f"a drift policy must be an object, got {type(overrides).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise PolicyError(
                f"unknown drift policy key(s) {', '.join(map(repr, unknown))}; "
                f"known keys: {', '.join(known)}"
            )
        values = dict(overrides)
        for name in ("min_predictions", "consecutive"):
            value = values.get(name)
            if isinstance(value, float) and value.is_integer():
                values[name] = int(value)
        return replace(base, **values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def level(self, psi: float, noise_psi: float, rows: int) -> Level | None:
        """The level of one bucket, or None when the bucket is not eligible.

        Not eligible: fewer than `min_predictions` rows, or a PSI that could not be computed.
        A level above ok needs the PSI to reach the threshold *and* exceed the noise level.
        """
        if rows < self.min_predictions or not math.isfinite(psi) or math.isnan(noise_psi):
            return None
        if psi <= noise_psi:
            return Level.OK
        if psi >= self.alert_psi:
            return Level.ALERT
        if psi >= self.warn_psi:
            return Level.WARN
        return Level.OK


@dataclass(frozen=True, slots=True)
class BucketDrift:
    """One bucket of one series: its rows (predictions) and the PSI with its noise level."""

    bucket: Bucket
    rows: int
    psi: float
    noise_psi: float

    @classmethod
    def from_feature_drift(cls, bucket: Bucket, drift: Any, rows: int | None = None) -> BucketDrift:
        """From a `fleet_server.drift.FeatureDrift`; rows default to its current count."""
        return cls(
            bucket=bucket,
            rows=drift.n_cur if rows is None else rows,
            psi=drift.psi,
            noise_psi=drift.noise_psi,
        )


def _num(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True, slots=True)
class AlertTransition:
    """An alert opened or resolved.

    `bucket` is the bucket that caused the transition. For `open` the span
    `first_bucket`..`last_bucket` is the streak that met the policy (last = bucket); for
    `resolve` it is the whole time the level held. `psi`, `noise_psi` and `rows` are the
    values of `bucket`.
    """

    action: str  # "open" | "resolve"
    scope: str  # "fleet", "tag:KEY=VALUE" or "device:ID"
    model_version: str
    feature: str | None  # None: the model's prediction distribution
    feature_index: int | None
    level: Level  # warn or alert: the severity of the alert that changed
    psi: float
    noise_psi: float
    rows: int
    first_bucket: Bucket | None
    last_bucket: Bucket | None
    bucket: Bucket

    @property
    def event(self) -> str:
        """The webhook event name: `drift.alert.open` / `drift.alert.resolve`."""
        return f"drift.alert.{self.action}"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["level"] = self.level.value
        out["psi"] = _num(self.psi)
        out["noise_psi"] = _num(self.noise_psi)
        return out


@dataclass(frozen=True, slots=True)
class LevelState:
    """Progress of one severity: the current streak and whether its alert is open."""

    streak: int = 0
    first_bucket: Bucket | None = None  # first bucket of the streak
    last_bucket: Bucket | None = None  # last eligible bucket at or above the level
    open: bool = False


@dataclass(frozen=True, slots=True)
class SeriesState:
    """Everything the evaluator remembers about one series between calls (JSON-able)."""

    warn: LevelState = field(default_factory=LevelState)
    alert: LevelState = field(default_factory=LevelState)
    last_seen: Bucket | None = None  # last bucket evaluated, eligible or not

    def of(self, severity: Level) -> LevelState:
        return self.warn if severity is Level.WARN else self.alert

    @property
    def open_levels(self) -> list[Level]:
        return [s for s in _SEVERITIES if self.of(s).open]

    @classmethod
    def resume(
        cls, open_levels: Iterable[Level | str], last_seen: Bucket | None = None
    ) -> SeriesState:
        """A state for alerts already open in storage when the evaluator's state was not kept.

        Their streaks restart from here (so a later resolve reports `first_bucket` None).
        """
        levels = {Level(v) for v in open_levels}
        return cls(
            warn=LevelState(open=Level.WARN in levels),
            alert=LevelState(open=Level.ALERT in levels),
            last_seen=last_seen,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SeriesState:
        return cls(
            warn=LevelState(**data.get("warn", {})),
            alert=LevelState(**data.get("alert", {})),
            last_seen=data.get("last_seen"),
        )


@dataclass(frozen=True, slots=True)
class Evaluation:
    """Transitions in order, the state to resume from, and each bucket's level (None: not
    eligible) for timelines."""

    transitions: list[AlertTransition]
    state: SeriesState
    levels: list[Level | None]


def _advance(
    severity: Level, ls: LevelState, level: Level, bucket: Bucket, consecutive: int
) -> tuple[LevelState, str | None, LevelState]:
    """One eligible bucket for one severity: (new state, action or None, state before reset)."""
    if _RANK[level] >= _RANK[severity]:
        streak = ls.streak + 1
        first = bucket if ls.streak == 0 else ls.first_bucket
        new = LevelState(streak=streak, first_bucket=first, last_bucket=bucket, open=ls.open)
        if not ls.open and streak >= consecutive:
            opened = replace(new, open=True)
            return opened, "open", opened
        return new, None, new
    # Below the level: the streak breaks; an open alert resolves at once (like Prometheus
    # without keep_firing_for) - the `consecutive` delay already filtered one-bucket blips.
    return LevelState(), ("resolve" if ls.open else None), ls


def evaluate(
    buckets: Iterable[BucketDrift],
    policy: DriftPolicy,
    *,
    scope: str,
    model_version: str,
    feature: str | None,
    feature_index: int | None = None,
    state: SeriesState | None = None,
) -> Evaluation:
    """Run the alert state machine over time-ordered buckets of one series.

    A bucket with fewer than `policy.min_predictions` rows (or no computable PSI) is not
    eligible: it neither advances nor resets a streak and never resolves an alert - too few
    rows say nothing either way. Buckets must be strictly increasing, also across calls that
    pass `state` (a bucket already evaluated raises ValueError instead of double counting).
    Within one bucket, resolves come before opens, and alert before warn for resolves.
    """
    state = state or SeriesState()
    transitions: list[AlertTransition] = []
    levels: list[Level | None] = []
    for b in buckets:
        if state.last_seen is not None and not b.bucket > state.last_seen:
            raise ValueError(
                f"bucket {b.bucket!r} is not after {state.last_seen!r}: buckets must be "
                "time-ordered and each evaluated once"
            )
        level = policy.level(b.psi, b.noise_psi, b.rows)
        levels.append(level)
        if level is None:
            state = replace(state, last_seen=b.bucket)
            continue
        new_states: dict[Level, LevelState] = {}
        actions: list[tuple[str, Level, LevelState]] = []
        for severity in _SEVERITIES:
            new, action, span = _advance(
                severity, state.of(severity), level, b.bucket, policy.consecutive
            )
            new_states[severity] = new
            if action:
                actions.append((action, severity, span))
        # Resolves first (the more severe first), then opens (the less severe first): a
        # consumer replaying the list sees a consistent picture after every step.
        actions.sort(
            key=lambda a: (a[0] != "resolve", -_RANK[a[1]] if a[0] == "resolve" else _RANK[a[1]])
        )
        for action, severity, span in actions:
            transitions.append(
                AlertTransition(
                    action=action,
                    scope=scope,
                    model_version=model_version,
                    feature=feature,
                    feature_index=feature_index,
                    level=severity,
                    psi=b.psi,
                    noise_psi=b.noise_psi,
                    rows=b.rows,
                    first_bucket=span.first_bucket,
                    last_bucket=span.last_bucket,
                    bucket=b.bucket,
                )
            )
        state = SeriesState(
            warn=new_states[Level.WARN], alert=new_states[Level.ALERT], last_seen=b.bucket
        )
    return Evaluation(transitions=transitions, state=state, levels=levels)


@dataclass
class Notification:
    """A stored alert transition to announce (MQTT and webhooks): the alert's id and its payload."""

    alert_id: int
    payload: dict[str, Any]
    event: str
