"""Estimated performance without labels (confidence-based performance estimation, CBPE). Pure.

Devices apply the bundle's calibration map to every prediction and send the expected confusion
matrix (Σ of calibrated class probabilities per predicted class) and, for binary models, a
histogram of the raw score with the calibrated positive probability summed per bin. Summed
over any group of devices and buckets (`MonitoringSums`), they give the expected accuracy,
precision, recall, F1 and ROC AUC of exactly those predictions. The estimate assumes the
relation between inputs and outcome is what it was on the reference data (no concept shift):
covariate shift is what it sees; a changed P(y | x) it cannot. See docs/performance.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from fleet_server.monitoring_sums import MonitoringSums

__all__ = ["INTERVAL_Z", "estimated_auc", "estimated_metrics", "estimated_vs_realized"]

INTERVAL_Z = 1.96  # the sampling-noise interval is this many standard errors each side


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def estimated_auc(score_counts: Sequence[int], score_positive: Sequence[float]) -> float | None:
    """ROC AUC of the expected ROC curve: thresholds at the histogram's bin edges, from the
    highest score down; expected positives per bin are the calibrated sums, negatives the rest.
    Rows inside one bin count as tied (the trapezoid), so the result is exact up to the bin width."""
    pos = [float(p) for p in score_positive]
    neg = [max(float(c) - p, 0.0) for c, p in zip(score_counts, pos, strict=True)]
    total_pos, total_neg = sum(pos), sum(neg)
    if total_pos <= 0 or total_neg <= 0:
        return None
    area = 0.0
    tp = fp = 0.0
    for p, n in zip(reversed(pos), reversed(neg), strict=True):
        area += n * (tp + p / 2.0)
        tp += p
        fp += n
    return area / (total_pos * total_neg)


def estimated_metrics(sums: MonitoringSums, classes: Sequence[Any] | None, positive: int | None = None) -> dict[str, Any]:
    """Estimated accuracy with its sampling-noise interval; binary: precision, recall, F1, ROC AUC.

    `rows` is the number of predictions behind the figures; everything is None without rows.
    The interval: if the calibration holds, the accuracy these very rows would show once
    labelled lies within `accuracy ± INTERVAL_Z · sqrt(Σ q(1 − q)) / rows` (q: a row's
    calibrated probability of its predicted class) about 95 % of the time.
    """
    n = sums.est_rows
    out: dict[str, Any] = {"rows": n, "accuracy": None, "interval": None, "noise": None}
    conf = sums.est_confusion
    if not n or conf is None:
        return out
    hits = sum(conf[k][k] for k in range(len(conf)))
    accuracy = hits / n
    noise = INTERVAL_Z * math.sqrt(max(hits - sums.est_sq_sum, 0.0)) / n
    out.update(accuracy=accuracy, noise=noise, interval=[max(accuracy - noise, 0.0), min(accuracy + noise, 1.0)])
    labels = [str(c) for c in classes] if classes is not None else [str(i) for i in range(len(conf))]
    predicted = sums.est_predicted or [0] * len(conf)
    per_class = []
    for k, label in enumerate(labels):
        tp = conf[k][k]
        support = sum(conf[k])  # expected rows truly of class k
        precision = _ratio(tp, predicted[k])
        recall = _ratio(tp, support)
        f1 = _ratio(2 * tp, predicted[k] + support)
        per_class.append({"class": label, "predicted": predicted[k], "support": support,
                          "precision": precision, "recall": recall, "f1": f1})
    out["per_class"] = per_class
    if len(conf) == 2:
        pos = 1 if positive is None else positive
        out.update(positive_class=labels[pos], precision=per_class[pos]["precision"],
                   recall=per_class[pos]["recall"], f1=per_class[pos]["f1"])
        if sums.est_score_counts is not None and sums.est_score_positive is not None:
            out["roc_auc"] = estimated_auc(sums.est_score_counts, sums.est_score_positive)
    return out


def estimated_vs_realized(estimated: Mapping[str, Any], realized_accuracy: float | None, labels: int) -> dict[str, Any]:
    """The estimate beside the realized accuracy of the same scope and bucket, and its error.

    The two cover different rows (truth arrives for some predictions, later): `error` is
    estimated − realized and `within` says whether the realized value lies in the estimate's
    interval widened by the realized value's own sampling noise.
    """
    est = estimated.get("accuracy")
    out: dict[str, Any] = {"estimated": est, "realized": realized_accuracy, "labels": labels, "error": None,
                           "within": None}
    if est is None or realized_accuracy is None or not labels:
        return out
    out["error"] = est - realized_accuracy
    realized_noise = INTERVAL_Z * math.sqrt(max(realized_accuracy * (1 - realized_accuracy), 1e-12) / labels)
    out["within"] = abs(out["error"]) <= math.hypot(estimated.get("noise") or 0.0, realized_noise)
    return out
