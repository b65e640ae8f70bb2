"""The drift policy and the alert state machine, as tables: buckets in, transitions out."""

from __future__ import annotations

import json
import math

import pytest

from fleet_server.alerts import (
    AlertTransition,
    BucketDrift,
    DriftPolicy,
    Level,
    PolicyError,
    SeriesState,
    evaluate,
)
from fleet_server.drift import feature_drift
from model_tools.manifest import BinnedDistribution

POLICY = DriftPolicy()  # warn 0.1, alert 0.25, 500 rows, 3 in a row

# One letter per bucket: o ok, w warn, a alert, . too few rows, n high PSI inside the noise,
# x PSI not computable.
BUCKET = {
    "o": (1000, 0.05, 0.02),
    "w": (1000, 0.15, 0.02),
    "a": (1000, 0.40, 0.02),
    ".": (20, 0.90, 0.02),
    "n": (1000, 0.40, 0.50),
    "x": (1000, math.nan, math.inf),
}


def buckets(spec: str, start: int = 0) -> list[BucketDrift]:
    letters = spec.split()
    return [BucketDrift(i + start, *BUCKET[c]) for i, c in enumerate(letters)]


def run(spec: str, policy: DriftPolicy = POLICY):
    return evaluate(buckets(spec), policy, scope="fleet", model_version="3", feature="temp")


def brief(t: AlertTransition) -> tuple:
    return (t.bucket, t.action, t.level.value, t.first_bucket, t.last_bucket)


CASES = [
    # spec, expected transitions (bucket, action, level, first, last)
    ("w w", []),
    ("w w w", [(2, "open", "warn", 0, 2)]),
    ("w w w w w", [(2, "open", "warn", 0, 2)]),  # opens once, stays open
    ("w w o w w w", [(5, "open", "warn", 3, 5)]),  # an ok bucket resets the streak
    ("w . w . . w", [(5, "open", "warn", 0, 5)]),  # too few rows: no advance, no reset
    ("w w w o", [(2, "open", "warn", 0, 2), (3, "resolve", "warn", 0, 2)]),
    ("w w w . . o", [(2, "open", "warn", 0, 2), (5, "resolve", "warn", 0, 2)]),
    ("w w w . . .", [(2, "open", "warn", 0, 2)]),  # no data: stays open
    ("a a a", [(2, "open", "warn", 0, 2), (2, "open", "alert", 0, 2)]),
    ("w a a a", [(2, "open", "warn", 0, 2), (3, "open", "alert", 1, 3)]),
    ("a a o", []),
    ("a a w", [(2, "open", "warn", 0, 2)]),  # alert streak broken; an alert bucket is also >= warn
    (
        "a a a w w o",
        [
            (2, "open", "warn", 0, 2),
            (2, "open", "alert", 0, 2),
            (3, "resolve", "alert", 0, 2),  # de-escalates: the warning stays open
            (5, "resolve", "warn", 0, 4),
        ],
    ),
    (
        "a a a o",
        [
            (2, "open", "warn", 0, 2),
            (2, "open", "alert", 0, 2),
            (3, "resolve", "alert", 0, 2),
            (3, "resolve", "warn", 0, 2),
        ],
    ),
    ("n n n n", []),  # PSI above the thresholds but within sampling noise
    ("w n w w", []),  # a noisy bucket counts as ok
    ("x x x", []),  # no computable PSI: not eligible
    ("w x w w", [(3, "open", "warn", 0, 3)]),
]


@pytest.mark.parametrize(("spec", "expected"), CASES, ids=[c[0] for c in CASES])
def test_alert_lifecycle(spec, expected):
    result = run(spec)
    assert [brief(t) for t in result.transitions] == expected


def test_levels_per_bucket_for_timelines():
    assert run("o w a . n x").levels == [
        Level.OK,
        Level.WARN,
        Level.ALERT,
        None,
        Level.OK,
        None,
    ]


@pytest.mark.parametrize(
    ("spec", "policy", "expected"),
    [
        (
            "w o w",
            DriftPolicy(consecutive=1),
            [(0, "open", "warn", 0, 0), (1, "resolve", "warn", 0, 0), (2, "open", "warn", 2, 2)],
        ),
        (
            ". . .",
            DriftPolicy(min_predictions=0, consecutive=3),
            [(2, "open", "warn", 0, 2), (2, "open", "alert", 0, 2)],
        ),
        ("w w w", DriftPolicy(warn_psi=0.2, alert_psi=0.3), []),
    ],
)
def test_policy_changes_the_lifecycle(spec, policy, expected):
    assert [brief(t) for t in run(spec, policy).transitions] == expected


def test_transition_carries_the_series_and_bucket_values():
    t = run("w w a").transitions[0]
    assert (t.scope, t.model_version, t.feature, t.feature_index) == ("fleet", "3", "temp", None)
    assert (t.psi, t.noise_psi, t.rows) == (0.40, 0.02, 1000)
    assert t.event == "drift.alert.open"
    assert json.loads(json.dumps(t.to_dict()))["level"] == "warn"


def test_prediction_series_has_no_feature_name():
    res = evaluate(buckets("a a a"), POLICY, scope="device:pi-7", model_version="3", feature=None)
    assert all(t.feature is None and t.scope == "device:pi-7" for t in res.transitions)


def test_resuming_from_state_equals_one_pass():
    spec = "w a a a . w o w w w o a"
    whole = run(spec)
    letters = spec.split()
    transitions, state = [], None
    for cut in range(0, len(letters), 2):  # evaluate two buckets per call, state via JSON
        part = [BucketDrift(cut + i, *BUCKET[c]) for i, c in enumerate(letters[cut : cut + 2])]
        if state is not None:
            state = SeriesState.from_dict(json.loads(json.dumps(state.to_dict())))
        res = evaluate(part, POLICY, scope="fleet", model_version="3", feature="temp", state=state)
        transitions += res.transitions
        state = res.state
    assert transitions == whole.transitions
    assert state == whole.state


def test_a_bucket_is_evaluated_once():
    res = run("w w")
    with pytest.raises(ValueError, match="time-ordered"):
        evaluate(
            buckets("w", start=1),
            POLICY,
            scope="fleet",
            model_version="3",
            feature="temp",
            state=res.state,
        )
    with pytest.raises(ValueError, match="time-ordered"):
        evaluate(
            [BucketDrift(5, 1000, 0.1, 0.0), BucketDrift(4, 1000, 0.1, 0.0)],
            POLICY,
            scope="fleet",
            model_version="3",
            feature="temp",
        )


def test_resume_from_alerts_open_in_storage():
    state = SeriesState.resume(["warn", Level.ALERT], last_seen=9)
    assert state.open_levels == [Level.WARN, Level.ALERT]
    res = evaluate(
        buckets("w o", start=10),
        POLICY,
        scope="fleet",
        model_version="3",
        feature="temp",
        state=state,
    )
    assert [brief(t) for t in res.transitions] == [
        (10, "resolve", "alert", None, None),
        (11, "resolve", "warn", 10, 10),
    ]


def test_bucket_from_feature_drift():
    ref = BinnedDistribution(edges=[0.0], counts=[500, 500])
    fd = feature_drift(ref, [900, 100], 0, ref_std=1.0)
    b = BucketDrift.from_feature_drift(1700000000.0, fd)
    assert (b.rows, b.psi, b.noise_psi) == (1000, fd.psi, fd.noise_psi)
    assert POLICY.level(b.psi, b.noise_psi, b.rows) is Level.ALERT
    assert BucketDrift.from_feature_drift(0, fd, rows=10).rows == 10


# ---------------------------------------------------------------- policy overrides


def test_policy_from_dict_overrides_only_given_keys():
    p = DriftPolicy.from_dict({"alert_psi": 0.3, "consecutive": 2})
    assert p == DriftPolicy(warn_psi=0.1, alert_psi=0.3, min_predictions=500, consecutive=2)
    assert DriftPolicy.from_dict(None) == DriftPolicy()
    assert DriftPolicy.from_dict({"min_predictions": 100.0}).min_predictions == 100
    base = DriftPolicy(min_predictions=50)
    assert DriftPolicy.from_dict({"warn_psi": 0.2}, base=base).min_predictions == 50
    assert DriftPolicy.from_dict(p.to_dict()) == p


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"alert_pis": 0.3}, "unknown drift policy key.*'alert_pis'.*known keys: warn_psi"),
        ({"warn_psi": 0.3}, r"warn_psi \(0.3\) must not exceed alert_psi \(0.25\)"),
        ({"warn_psi": "0.1"}, "warn_psi must be a number"),
        ({"alert_psi": -1}, "alert_psi must be a positive number"),
        ({"alert_psi": math.inf}, "alert_psi must be a positive number"),
        ({"consecutive": 0}, "consecutive must be at least 1"),
        ({"consecutive": 2.5}, "consecutive must be a whole number"),
        ({"min_predictions": True}, "min_predictions must be a whole number"),
        ({"min_predictions": -5}, "min_predictions must be at least 0"),
        (["warn_psi"], "must be an object"),
    ],
)
def test_policy_errors_say_what_is_wrong(overrides, message):
    with pytest.raises(PolicyError, match=message):
        DriftPolicy.from_dict(overrides)
