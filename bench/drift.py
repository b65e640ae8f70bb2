"""Drift computation time: 50 features x 1,000 devices, from stored counts to metrics.

Fleet roll-up (merge every device's counts, then one drift report) and per-device PSI with
its noise level (vectorised over devices), each beside the naive baseline of one
`feature_drift` call per device and feature. Prints a markdown table and writes
bench/results/drift.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from fleet_server import drift
from model_tools.manifest import BinnedDistribution, FeatureProfile, ReferenceProfile

RESULTS = Path(__file__).resolve().parent / "results"


def setup(features: int, devices: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    edges = [float(e) for e in np.linspace(-1.5, 1.5, 9)]  # 10 bins + NaN
    shares = np.r_[np.full(10, 0.099), 0.01]
    profile = ReferenceProfile(
        rows=20_000,
        features=[
            FeatureProfile(
                name=f"f{i}",
                kind="numeric",
                distribution=BinnedDistribution(edges=edges, counts=[1980] * 10, nan=200),
                min=-3.0,
                max=3.0,
                mean=0.0,
                std=1.0,
            )
            for i in range(features)
        ],
        prediction=BinnedDistribution(categories=["a", "b"], counts=[10_000, 9_800]),
    )
    # What storage hands over: one (devices x bins) count matrix per feature.
    matrices = [rng.multinomial(600, shares, size=devices) for _ in range(features)]
    return profile, matrices


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer devices and repeats")
    args = parser.parse_args()
    features, devices = 50, (200 if args.quick else 1000)
    repeat = 3 if args.quick else 5
    profile, matrices = setup(features, devices)
    ref = [np.append(fp.distribution.counts, fp.distribution.nan) for fp in profile.features]

    def fleet_report():
        merged = [drift.merge_count_matrix(m) for m in matrices]
        drift.drift_report(profile, [(m[:-1], int(m[-1])) for m in merged])

    def fleet_naive():
        merged = []
        for m in matrices:
            total = [0] * m.shape[1]
            for row in m.tolist():
                total = [a + b for a, b in zip(total, row, strict=True)]
            merged.append(total)
        drift.drift_report(profile, [(m[:-1], m[-1]) for m in merged])

    def per_device_vectorised():
        for r, m in zip(ref, matrices, strict=True):
            psi = drift.psi(r, m)
            level = drift.psi_noise_level(drift.occupied_bins(r, m), r.sum(), m.sum(axis=1))
            _ = psi > level

    def per_device_loop():
        for fp, m in zip(profile.features, matrices, strict=True):
            for row in m:
                drift.feature_drift(
                    fp.distribution,
                    row[:-1],
                    int(row[-1]),
                    ref_min=fp.min,
                    ref_max=fp.max,
                    ref_std=fp.std,
                )

    loop = best_of(per_device_loop, 1)  # seconds at full size: once is enough
    rows = [
        (
            "fleet drift report (merge + 50 features)",
            best_of(fleet_report, repeat),
            best_of(fleet_naive, repeat),
            "pure-Python merge",
        ),
        (
            f"per-device PSI + noise gate ({features} x {devices})",
            best_of(per_device_vectorised, repeat),
            loop,
            "one feature_drift call each (all metrics)",
        ),
    ]
    lines = [
        f"{features} features x {devices} devices, 10 bins + NaN, 600 rows per device.",
        "",
        "| operation | time | baseline | baseline is |",
        "|---|---:|---:|---|",
    ]
    for name, t, base, what in rows:
        lines.append(f"| {name} | {t * 1000:.1f} ms | {base * 1000:.1f} ms | {what} |")
    lines += ["", f"One `feature_drift` call: {loop / (features * devices) * 1e6:.0f} µs."]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "drift.md").write_text(text)


if __name__ == "__main__":
    main()
