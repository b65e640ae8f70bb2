"""Rollout gates: the canary cohort against the control cohort over the same window. Pure.

Every gate reports its measured value, its threshold and its sample size; a gate whose sample
is still too small is `pending`, never passed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edge_agent.protocol import LATENCY_EDGES_MS
from fleet_server.drift import chi2_sf, chi2_statistic, js_distance, latency_percentile
from fleet_server.rollout_model import RolloutSpec


@dataclass
class CohortStats:
    """What a cohort's devices reported during the stage, summed."""

    devices: int = 0  # devices in the cohort
    updated: int = 0  # reported the stage's version (active, or candidate in shadow)
    update_failed: int = 0  # reported a failed or rolled-back update to the stage's version
    timed_out: int = 0  # said nothing within the device timeout
    predictions: int = 0
    errors: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_EDGES_MS) + 1))
    prediction_counts: list[int] = field(default_factory=list)
    # shadow stages: the candidate beside the active model on the same requests
    shadow_compared: int = 0
    shadow_agreed: int = 0
    shadow_latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_EDGES_MS) + 1))
    shadow_prediction_counts: list[int] = field(default_factory=list)
    max_feature_psi: float | None = None  # worst input drift against the reference profile
    # ground-truth feedback received during the stage, for predictions of the cohort's version
    labels: int = 0
    correct: int = 0
    stage_age_s: float = 0.0  # seconds since the stage started (how long labels were waited for)
    # label-free estimate of the cohort's version: rows, Σ calibrated confidence, Σ its square
    est_rows: int = 0
    est_hits: float = 0.0
    est_sq_sum: float = 0.0
    # multivariate drift of the canary against the version's reference: PSI and its noise level
    multivariate_psi: float | None = None
    multivariate_noise: float | None = None
    multivariate_rows: int = 0
    refused_rows: int = 0  # rows refused by input validation (their requests' rows)


@dataclass
class GateResult:
    name: str
    status: str  # "pass" | "fail" | "pending" | "skipped" (not applicable: counts as passed)
    value: float | None
    threshold: float
    comparison: str  # "<=" or ">="
    sample: int
    min_sample: int
    unit: str
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def waiting(self) -> str:
        """Why a pending gate waits, in words: a sample still too small, or (with its sample in) a
        difference that sampling noise still explains."""
        if self.value is not None and self.sample >= self.min_sample:
            return f"gate {self.name}: within sampling noise at {self.sample} {self.unit}, waiting for more"
        return f"gate {self.name}: sample {self.sample} of {self.min_sample} {self.unit}"


def _p95(hist: list[int]) -> float | None:
    if sum(hist) == 0:
        return None
    return latency_percentile(np.asarray(hist), LATENCY_EDGES_MS, 0.95)


def _result(name: str, settings: dict[str, Any], value: float | None, sample: int,
            detail: str = "", skipped: bool = False) -> GateResult:
    comparison = ">=" if "min" in settings and "max" not in settings else "<="
    threshold = float(settings["min"] if comparison == ">=" else settings["max"])
    min_sample = int(settings.get("min_sample", 1))
    if skipped:
        status = "skipped"
    elif value is None or sample < min_sample:
        status = "pending"
    elif comparison == "<=":
        status = "pass" if value <= threshold else "fail"
    else:
        status = "pass" if value >= threshold else "fail"
    return GateResult(name, status, value, threshold, comparison, sample, min_sample,
                      settings.get("unit", ""), detail)


def _ratio(cand: float | None, base: float | None, floor_ms: float) -> float | None:
    if not cand or not base:
        return None
    return max(cand, floor_ms) / max(base, floor_ms)


# Live, the canary's and the control's predictions are two samples: a distance above the bar
# fails only when a chi-square test of homogeneity rules out sampling noise at this level. The
# gate is judged again at every controller pass, so a level fit for one look fails identical
# models now and then (seen: 0.102 at 200 predictions of a model under a new version).
PREDICTION_NOISE_P = 1e-4


def _hold_within_noise(result: GateResult, canary: list[int], control: list[int]) -> None:
    """A failed live `prediction_js` whose difference sampling noise explains waits (pending) for
    more predictions, which shrink the noise until the gate decides."""
    stat, df = chi2_statistic(canary, control)
    p = chi2_sf(float(stat), int(df)) if df else 1.0
    if p >= PREDICTION_NOISE_P:
        result.status = "pending"
        result.detail += (f" (above the threshold, within sampling noise: chi-square p = {p:.2g} >= "
                          f"{PREDICTION_NOISE_P:g}; waiting for more predictions)")


def evaluate_gates(spec: RolloutSpec, mode: str, canary: CohortStats,
                   control: CohortStats) -> list[GateResult]:
    """Evaluate every enabled gate for a stage in `mode` ("shadow" or "live")."""
    results: list[GateResult] = []
    floor = float(spec.gate("p95_latency_ratio").get("floor_ms", 0.0))
    enabled = spec.enabled_gates()
    shadow = mode == "shadow"

    def add(name: str, value: float | None, sample: int, detail: str = "",
            skipped: bool = False) -> None:
        if name in enabled:
            results.append(_result(name, spec.gate(name), value, sample, detail, skipped))

    attempts = canary.updated + canary.update_failed
    add("update_failure_rate", canary.update_failed / attempts if attempts else None, attempts,
        f"{canary.update_failed} of {attempts} devices failed to install or self-test")

    if shadow:
        add("shadow_agreement",
            canary.shadow_agreed / canary.shadow_compared if canary.shadow_compared else None,
            canary.shadow_compared, "candidate's answer equals the active model's")
        cand, base = _p95(canary.shadow_latency), _p95(canary.latency)
        add("p95_latency_ratio", _ratio(cand, base, floor), canary.shadow_compared,
            f"candidate p95 {cand} ms / active p95 {base} ms on the same devices (floor {floor:g} ms)")
        cand_pred, base_pred = canary.shadow_prediction_counts, canary.prediction_counts
        sample = min(sum(cand_pred), sum(base_pred)) if cand_pred and base_pred else 0
        add("prediction_js", js_distance(cand_pred, base_pred) if sample else None, sample,
            "candidate vs active predictions on the same requests")
    else:
        # A 100 % stage has no control cohort: the comparisons were made in earlier stages.
        alone = control.devices == 0
        why = "no control cohort left (every target device is in the canary)" if alone else ""
        c_rate = canary.errors / canary.predictions if canary.predictions else None
        k_rate = control.errors / control.predictions if control.predictions else 0.0
        add("error_rate_delta", c_rate - k_rate if c_rate is not None else None,
            canary.predictions, why or f"canary {c_rate} vs control {k_rate}", alone)
        cand, base = _p95(canary.latency), _p95(control.latency)
        add("p95_latency_ratio", _ratio(cand, base, floor), canary.predictions,
            why or f"canary p95 {cand} ms vs control p95 {base} ms (floor {floor:g} ms)", alone)
        a, b = canary.prediction_counts, control.prediction_counts
        sample = min(sum(a), sum(b)) if a and b else 0
        before = len(results)
        add("prediction_js", js_distance(a, b) if sample else None, sample,
            why or "canary vs control prediction distributions", alone)
        if len(results) > before and results[-1].status == "fail":
            _hold_within_noise(results[-1], a, b)
    # In shadow the inputs are counted in the active model's bins, not the candidate's: input
    # drift against the candidate's reference is measured from the first live stage on.
    add("input_drift_psi", canary.max_feature_psi, canary.predictions,
        "measured from the first live stage" if shadow
        else "worst feature PSI of the canary cohort against the reference", shadow)
    labels_decide = _accuracy_delta(add, spec, shadow, canary, control)
    _monitoring_gates(add, spec, results, shadow, canary, control, labels_decide)
    population = canary.devices
    add("timeout_share", canary.timed_out / population if population else None, population,
        f"{canary.timed_out} of {population} devices timed out")
    return results


def _accuracy_delta(add: Any, spec: RolloutSpec, shadow: bool, canary: CohortStats, control: CohortStats) -> bool:
    """Canary accuracy minus control accuracy on labels received during the stage; True when
    both cohorts have their labels (realized accuracy then decides, not the estimate)."""
    sample = min(canary.labels, control.labels)
    if shadow or control.devices == 0:
        why = ("the candidate's answers are not served in shadow, so no truth joins them" if shadow
               else "no control cohort left (every target device is in the canary)")
        add("accuracy_delta", None, sample, why, True)
        return False
    c_acc = canary.correct / canary.labels if canary.labels else None
    k_acc = control.correct / control.labels if control.labels else None
    settings = spec.gate("accuracy_delta")
    if sample < int(settings.get("min_sample", 1)) and canary.stage_age_s >= float(settings.get("wait_s", 0.0)):
        add("accuracy_delta", None, sample,
            f"too few labels within wait_s ({canary.labels} canary, {control.labels} control): not judged", True)
        return False
    delta = c_acc - k_acc if c_acc is not None and k_acc is not None else None
    add("accuracy_delta", delta, sample,
        f"canary accuracy {c_acc} on {canary.labels} labels vs control {k_acc} on {control.labels}")
    return delta is not None and sample >= int(settings.get("min_sample", 1))


# An estimated difference must be this many standard errors below zero to fail. The gate is
# judged again at every controller pass, so a level fit for one look (2.576) fails identical
# models now and then (seen: -0.030 at 360 predictions on a shared machine).
ESTIMATE_Z = 3.0
MULTIVARIATE_NOISE = "within the sampling noise of the canary's rows"


def _estimate(s: CohortStats) -> tuple[float | None, float]:
    """(estimated accuracy, its standard error as a mean of calibrated confidences)."""
    if not s.est_rows:
        return None, math.inf
    mean = s.est_hits / s.est_rows
    var = max(s.est_sq_sum / s.est_rows - mean * mean, 0.0)
    return mean, math.sqrt(var / s.est_rows)


def _monitoring_gates(add: Any, spec: RolloutSpec, results: list[GateResult], shadow: bool, canary: CohortStats,
                      control: CohortStats, labels_decide: bool) -> None:
    """estimated_accuracy_delta, multivariate_drift_psi and input_error_rate_delta."""
    alone = control.devices == 0
    why = ("measured in live stages (the candidate's answers are not served in shadow)" if shadow
           else "no control cohort left (every target device is in the canary)" if alone else "")
    c_est, c_se = _estimate(canary)
    k_est, k_se = _estimate(control)
    delta = c_est - k_est if c_est is not None and k_est is not None else None
    # A cohort that predicts but sends no estimate (a bundle without estimation inputs, agents
    # that predate them) would hold the stage forever: the gate does not apply to it.
    enough = int(spec.gate("estimated_accuracy_delta").get("min_sample", 1))
    silent = [name for name, s in (("canary", canary), ("control", control))
              if s.predictions >= enough and not s.est_rows]
    if not why and silent:
        why = f"no estimate from the {' and '.join(silent)} (bundle without estimation inputs, or older agents)"
    skip = bool(why) or labels_decide
    detail = why or ("realized accuracy_delta has its labels and decides" if labels_decide else
                     f"canary estimated accuracy {_fmt(c_est)} on {canary.est_rows} predictions vs control "
                     f"{_fmt(k_est)} on {control.est_rows}; noise {ESTIMATE_Z} x {_fmt(math.hypot(c_se, k_se))}")
    before = len(results)
    add("estimated_accuracy_delta", delta, min(canary.est_rows, control.est_rows), detail, skip)
    # Below the threshold but not beyond the sampling noise of the two estimates: not a failure
    # yet, and not a pass either (a canary whose estimate is below the bar never advances): the
    # stage waits for more predictions, which shrink the noise until the gate decides.
    if (len(results) > before and results[-1].status == "fail" and delta is not None
            and delta > -ESTIMATE_Z * math.hypot(c_se, k_se)):
        results[-1].status = "pending"
        results[-1].detail += " (below the threshold, within sampling noise: waiting for more predictions)"
    # Symmetrically, a pass must clear the threshold by the noise: the controller looks at every
    # pass, and a noisy look above the bar would otherwise advance a canary that is below it.
    elif (len(results) > before and results[-1].status == "pass" and delta is not None
            and delta - ESTIMATE_Z * math.hypot(c_se, k_se) < results[-1].threshold):
        results[-1].status = "pending"
        results[-1].detail += " (above the threshold, within sampling noise: waiting for more predictions)"

    before = len(results)
    no_profile = (not shadow and not canary.multivariate_rows
                  and canary.predictions >= int(spec.gate("multivariate_drift_psi").get("min_sample", 1)))
    add("multivariate_drift_psi", canary.multivariate_psi, canary.multivariate_rows,
        "measured from the first live stage" if shadow else
        "the version has no multivariate profile (or its agents predate it)" if no_profile else
        "PSI of the canary's PCA reconstruction errors against the reference", shadow or no_profile)
    if (len(results) > before and results[-1].status == "fail" and canary.multivariate_noise is not None
            and (canary.multivariate_psi or 0.0) <= canary.multivariate_noise):
        results[-1].status = "pass"
        results[-1].detail += f" ({MULTIVARIATE_NOISE}, {canary.multivariate_noise:.3g})"

    c_rows = canary.predictions + canary.refused_rows
    k_rows = control.predictions + control.refused_rows
    c_rate = canary.refused_rows / c_rows if c_rows else None
    k_rate = control.refused_rows / k_rows if k_rows else 0.0
    live_why = ("measured in live stages (the active model validates in shadow)" if shadow
                else "no control cohort left (every target device is in the canary)" if alone else "")
    add("input_error_rate_delta", c_rate - k_rate if c_rate is not None else None, c_rows,
        live_why or f"rows refused by input validation: canary {_fmt(c_rate)} vs control {_fmt(k_rate)}",
        bool(live_why))


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def verdict(results: list[GateResult]) -> str:
    """'fail' if any gate failed, 'pass' if all passed, else 'pending'."""
    statuses = {r.status for r in results}
    if "fail" in statuses:
        return "fail"
    return "pass" if statuses <= {"pass", "skipped"} else "pending"
