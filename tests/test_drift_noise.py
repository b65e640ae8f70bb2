"""The noise gate: no-drift sample pairs are flagged about 1 % of the time, real shifts are not missed.

Under no drift PSI * n_ref * n_cur / (n_ref + n_cur) is approximately chi-square(k - 1), so the
gate (the 99th percentile) should let through about 1 % of clean pairs. The bounds below are
loose enough for the approximation and the simulation's randomness, tight enough to fail if
the level were off by a factor (e.g. a missing (1/n_ref + 1/n_cur) term or a wrong df).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from fleet_server import drift
from model_tools.binning import count_numeric, quantile_edges

PAIRS = 4000

CONFIGS = [
    # n_ref, n_cur, true shares of the bins (NaN bin included, where present)
    (1000, 1000, np.full(10, 0.1)),
    (5000, 500, np.full(10, 0.1)),
    (2000, 2000, np.array([0.5, 0.2, 0.15, 0.1, 0.05])),
    (500, 800, np.full(10, 0.1)),
    (20000, 600, np.r_[np.full(10, 0.099), 0.01]),  # a 1 % NaN bin
]


def false_flag_rate(n_ref: int, n_cur: int, shares: np.ndarray, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    ref = rng.multinomial(n_ref, shares, size=PAIRS)
    cur = rng.multinomial(n_cur, shares, size=PAIRS)
    psi = drift.psi(ref, cur)
    level = drift.psi_noise_level(drift.occupied_bins(ref, cur), n_ref, n_cur)
    return float((psi > level).mean()), float(psi.mean())


@pytest.mark.parametrize(("n_ref", "n_cur", "shares"), CONFIGS)
def test_no_drift_pairs_pass_the_noise_gate_about_one_percent_of_the_time(n_ref, n_cur, shares):
    rate, mean_psi = false_flag_rate(n_ref, n_cur, shares, seed=n_ref + n_cur)
    assert 0.002 < rate < 0.03, f"false-flag rate {rate:.4f}, expected about 0.01"
    # DESIGN's rule of thumb for the mean: (k - 1) * (1/n_ref + 1/n_cur).
    expected_mean = (shares.size - 1) * (1 / n_ref + 1 / n_cur)
    assert mean_psi == pytest.approx(expected_mean, rel=0.1)


def test_design_example_100_rows_each_side_10_bins():
    # Mean PSI ~ 0.18, a good share of clean pairs beyond 0.25: a fixed threshold alone
    # would cry wolf, the noise level (~0.43) does not.
    rng = np.random.default_rng(5)
    shares = np.full(10, 0.1)
    ref = rng.multinomial(100, shares, size=PAIRS)
    cur = rng.multinomial(100, shares, size=PAIRS)
    psi = drift.psi(ref, cur)
    assert psi.mean() == pytest.approx(0.18, rel=0.1)
    assert (psi > 0.25).mean() > 0.1
    level = drift.psi_noise_level(10, 100, 100)
    assert level == pytest.approx(stats.chi2.ppf(0.99, 9) * 0.02, rel=1e-9)
    assert level == pytest.approx(0.433, abs=1e-3)
    assert (psi > drift.psi_noise_level(drift.occupied_bins(ref, cur), 100, 100)).mean() < 0.03


def _trial(rng: np.random.Generator, shift_std: float, n: int = 1000) -> drift.FeatureDrift:
    # The full path as deployed: edges from the reference sample itself, raw values counted.
    ref = rng.normal(0, 1, n)
    cur = rng.normal(shift_std, 1, n)
    edges = quantile_edges(ref)
    reference = count_numeric(ref, edges, ref.min(), ref.max())
    current = count_numeric(cur, edges)
    return drift.feature_drift(
        reference,
        current.counts,
        current.nan,
        ref_min=ref.min(),
        ref_max=ref.max(),
        ref_std=ref.std(),
    )


def test_clean_samples_with_reference_quantile_edges_are_rarely_flagged():
    # Edges at the reference's own deciles make the reference side less noisy than a random
    # sample, so the gate is conservative here: well under the two-sample rate.
    rng = np.random.default_rng(8)
    flagged = sum(_trial(rng, 0.0).passes(0.0) for _ in range(1000))
    assert flagged / 1000 < 0.02


def test_half_a_standard_deviation_shift_is_flagged():
    rng = np.random.default_rng(9)
    trials = [_trial(rng, 0.5) for _ in range(300)]
    assert sum(t.passes(0.1) for t in trials) / len(trials) > 0.99
    assert all(t.psi > t.noise_psi for t in trials)
