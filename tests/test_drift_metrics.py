"""Unit tests of fleet_server.drift: the chi-square functions against scipy, metric properties,
merging, latency percentiles and error messages."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from edge_agent.protocol import LATENCY_EDGES_MS, FeatureCounts
from fleet_server import drift
from model_tools.manifest import BinnedDistribution

# ---------------------------------------------------------------- chi-square distribution

DFS = [1, 2, 3, 4, 5, 9, 10, 19, 30, 99, 250, 1000]
XS = [1e-6, 0.01, 0.5, 1, 2, 5, 9, 15, 21.67, 40, 100, 300, 1200]


@pytest.mark.parametrize("df", DFS)
def test_chi2_sf_and_cdf_match_scipy(df):
    for x in XS:
        expected = stats.chi2.sf(x, df)
        got = drift.chi2_sf(x, df)
        if expected > 1e-300:
            assert got == pytest.approx(expected, rel=1e-9, abs=1e-300), (x, df)
        else:
            assert got < 1e-290
        assert drift.chi2_cdf(x, df) == pytest.approx(stats.chi2.cdf(x, df), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("df", DFS)
@pytest.mark.parametrize("q", [1e-6, 0.01, 0.05, 0.5, 0.9, 0.95, 0.99, 0.999, 1 - 1e-9])
def test_chi2_ppf_matches_scipy(df, q):
    assert drift.chi2_ppf(q, df) == pytest.approx(stats.chi2.ppf(q, df), rel=1e-9)


@settings(max_examples=200, deadline=None)
@given(st.floats(0.5, 500), st.floats(1e-3, 2000))
def test_chi2_sf_property_against_scipy(df, x):
    assert drift.chi2_sf(x, df) == pytest.approx(stats.chi2.sf(x, df), rel=1e-8, abs=1e-290)


def test_chi2_edge_cases():
    assert drift.chi2_sf(0, 3) == 1.0
    assert drift.chi2_sf(math.inf, 3) == 0.0
    assert drift.chi2_ppf(0.0, 3) == 0.0
    assert drift.chi2_ppf(1.0, 3) == math.inf
    with pytest.raises(ValueError, match="degrees of freedom"):
        drift.chi2_sf(1.0, 0)
    with pytest.raises(ValueError, match="q must be"):
        drift.chi2_ppf(1.5, 3)


# ---------------------------------------------------------------- metric properties

counts_pair = st.integers(2, 15).flatmap(
    lambda k: st.tuples(
        st.lists(st.integers(0, 10_000), min_size=k, max_size=k).filter(lambda c: sum(c) > 0),
        st.lists(st.integers(0, 10_000), min_size=k, max_size=k).filter(lambda c: sum(c) > 0),
    )
)


@settings(max_examples=200, deadline=None)
@given(counts_pair)
def test_metric_properties(pair):
    a, b = (np.array(c) for c in pair)
    assert drift.psi(a, b) >= 0
    assert drift.psi(a, b) == pytest.approx(drift.psi(b, a), abs=1e-12)  # PSI is symmetric
    assert drift.psi(a, a) == 0
    js = drift.js_distance(a, b)
    assert 0 <= js <= 1
    assert js == pytest.approx(drift.js_distance(b, a), abs=1e-12)
    assert drift.js_distance(a, 3 * a) == pytest.approx(0, abs=1e-7)  # scale-free
    assert 0 <= drift.ks_binned(a, b) <= 1
    stat, df = drift.chi2_statistic(a, b)
    assert stat >= 0 and df == drift.occupied_bins(a, b) - 1


def test_vectorised_metrics_equal_row_by_row():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 50, size=8)
    cur = rng.integers(0, 50, size=(20, 8))
    cur[3] = 0  # an empty row: NaN, never a crash
    pos = drift.bin_positions([1, 2, 3, 4, 5, 6, 7], 0, 8)
    for fn, args in [
        (drift.psi, ()),
        (drift.js_distance, ()),
        (drift.ks_binned, ()),
        (drift.wasserstein_binned, (pos, 2.0)),
    ]:
        many = fn(ref, cur, *args)
        for i in range(len(cur)):
            one = fn(ref, cur[i], *args)
            assert (math.isnan(one) and math.isnan(many[i])) or one == pytest.approx(many[i])
    stats_, dfs = drift.chi2_statistic(ref, cur)
    assert dfs[0] == drift.chi2_statistic(ref, cur[0])[1]
    assert np.isnan(stats_[3])
    assert np.isinf(drift.psi_noise_level(drift.occupied_bins(ref, cur), ref.sum(), cur.sum(1))[3])


def test_psi_replaces_empty_shares_by_1e_4_without_renormalising():
    ref = np.array([50, 50, 0])
    cur = np.array([50, 0, 50])
    p = np.array([0.5, 0.5, 1e-4])
    q = np.array([0.5, 1e-4, 0.5])
    assert drift.psi(ref, cur) == pytest.approx(float(np.sum((q - p) * np.log(q / p))), abs=1e-15)


def test_ks_ignores_the_nan_bin_and_normalises_over_non_nan_rows():
    ref = BinnedDistribution(edges=[0.0, 1.0], counts=[10, 10, 10], nan=0)
    fd = drift.feature_drift(ref, [5, 5, 5], 1000, ref_min=-1, ref_max=2, ref_std=1)
    assert fd.ks == 0
    assert fd.wasserstein == 0
    assert fd.passes(0.25)  # but PSI sees the NaN flood


def test_bin_positions_close_outer_bins_with_reference_min_and_max():
    assert drift.bin_positions([1.0, 2.0], 0.0, 5.0).tolist() == [0.5, 1.5, 3.5]
    assert drift.bin_positions([1.0, 2.0]).tolist() == [1.0, 1.5, 2.0]
    assert drift.bin_positions([], 3.0, 4.0).tolist() == [3.0]
    # An inconsistent min above the first edge must not reverse the positions.
    assert drift.bin_positions([1.0, 2.0], 1.5, 1.8).tolist() == [1.0, 1.5, 2.0]


def test_wasserstein_of_a_whole_bin_move_is_the_distance_between_positions():
    pos = drift.bin_positions([1.0, 2.0, 3.0], 0.0, 4.0)  # 0.5, 1.5, 2.5, 3.5
    assert drift.wasserstein_binned([10, 0, 0, 0], [0, 0, 10, 0], pos, 1.0) == pytest.approx(2.0)
    assert drift.wasserstein_binned([10, 0, 0, 0], [0, 0, 10, 0], pos, 4.0) == pytest.approx(0.5)
    assert math.isnan(drift.wasserstein_binned([1, 0, 0, 0], [0, 1, 0, 0], pos, 0.0))


# ---------------------------------------------------------------- merging


def test_merge_counts_accepts_feature_counts_and_arrays():
    fcs = [FeatureCounts(bins=[1, 2, 3], nan=1), FeatureCounts(bins=[0, 0, 1], nan=0)]
    assert drift.merge_counts(fcs).tolist() == [1, 2, 4, 1]
    assert drift.merge_counts([[1, 2], np.array([3, 4])]).tolist() == [4, 6]
    assert drift.merge_counts([], size=3).tolist() == [0, 0, 0]
    assert drift.merge_count_matrix(np.array([[1, 2], [3, 4]])).tolist() == [4, 6]
    keys, sums = drift.sum_by_group(np.array([[1, 0], [2, 0], [0, 5]]), ["b", "a", "b"])
    assert keys.tolist() == ["a", "b"] and sums.tolist() == [[2, 0], [1, 5]]


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([[1, 2], [1, 2, 3]], "different reference profiles"),
        ([[1, -2]], "negative"),
        ([[1.5, 2]], "whole numbers"),
        ([], "nothing to merge"),
    ],
)
def test_merge_counts_errors(items, message):
    with pytest.raises(drift.DriftInputError, match=message):
        drift.merge_counts(items)


def test_merge_feature_counts_keeps_every_counter():
    merged = drift.merge_feature_counts(
        [
            FeatureCounts(bins=[1, 2], nan=1, below_min=1, above_max=0, unseen=2),
            FeatureCounts(bins=[3, 4], nan=0, below_min=2, above_max=5, unseen=1),
        ]
    )
    assert merged == FeatureCounts(bins=[4, 6], nan=1, below_min=3, above_max=5, unseen=3)


# ---------------------------------------------------------------- feature_drift / report


def test_feature_drift_refuses_counts_from_another_profile():
    ref = BinnedDistribution(edges=[0.0], counts=[5, 5])
    with pytest.raises(drift.DriftInputError, match="3 bins, the reference has 2"):
        drift.feature_drift(ref, [1, 2, 3], 0)


def test_feature_drift_with_no_current_rows_is_not_an_error():
    ref = BinnedDistribution(edges=[0.0], counts=[5, 5])
    fd = drift.feature_drift(ref, [0, 0], 0, ref_std=1.0)
    assert math.isnan(fd.psi) and fd.noise_psi == math.inf and not fd.passes(0.0)
    out = fd.to_dict()
    assert out["psi"] is None and out["noise_psi"] is None
    json.dumps(out, allow_nan=False)


# ---------------------------------------------------------------- latency


def test_latency_percentile_interpolates_inside_right_closed_bins():
    counts = [0] * (len(LATENCY_EDGES_MS) + 1)
    counts[5] = 10  # (0.5, 1.0]
    counts[6] = 10  # (1.0, 2.5]
    assert drift.latency_percentile(counts, LATENCY_EDGES_MS, 0.5) == pytest.approx(1.0)
    assert drift.latency_percentile(counts, LATENCY_EDGES_MS, 0.25) == pytest.approx(0.75)
    assert drift.latency_percentile(counts, LATENCY_EDGES_MS, 0.95) == pytest.approx(2.35)
    assert drift.latency_percentile(counts, LATENCY_EDGES_MS, 0.0) == pytest.approx(0.5)
    assert drift.latency_percentile([0] * len(counts), LATENCY_EDGES_MS, 0.5) is None


def test_latency_percentile_in_the_open_last_bin_is_its_lower_edge():
    counts = [0] * (len(LATENCY_EDGES_MS) + 1)
    counts[0] = 90
    counts[-1] = 10
    assert drift.latency_percentile(counts, LATENCY_EDGES_MS, 0.99) == LATENCY_EDGES_MS[-1]
    # First bin is closed at zero: latencies are never negative.
    assert drift.latency_percentile(counts, LATENCY_EDGES_MS, 0.45) == pytest.approx(0.0125)


def test_latency_percentile_is_within_a_bin_of_the_raw_quantile():
    rng = np.random.default_rng(1)
    raw = rng.lognormal(0.0, 1.0, 20_000)  # ms
    edges = np.asarray(LATENCY_EDGES_MS)
    counts = np.bincount(np.searchsorted(edges, raw, side="left"), minlength=edges.size + 1)
    for q in (0.5, 0.9, 0.95, 0.99):
        got = drift.latency_percentile(counts, LATENCY_EDGES_MS, q)
        true = float(np.quantile(raw, q))
        i = int(np.searchsorted(edges, true, side="left"))
        lo = edges[i - 1] if i > 0 else 0.0
        hi = edges[i] if i < edges.size else edges[-1]
        assert lo - 1e-9 <= got <= hi + 1e-9, (q, got, true)


def test_latency_percentile_errors():
    with pytest.raises(ValueError, match="fraction"):
        drift.latency_percentile([1] * 15, LATENCY_EDGES_MS, 95)
    with pytest.raises(drift.DriftInputError, match="need edges"):
        drift.latency_percentile([1, 2], LATENCY_EDGES_MS, 0.5)
