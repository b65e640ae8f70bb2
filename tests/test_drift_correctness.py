"""Drift metrics from merged device counts equal an independent computation on the raw rows.

Rows are split into many devices and windows, each part is counted with `model_tools.binning`
as a device would, the counts are merged, and `fleet_server.drift` computes the metrics. The
expected values come from the raw rows binned here with `np.searchsorted` and scored with
scipy. Random data covers skewed, discrete (merged edges) and NaN-bearing features and values
outside the training range; real data comes from scikit-learn's bundled datasets.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import jensenshannon
from scipy.special import rel_entr

from edge_agent.protocol import FeatureCounts
from fleet_server import drift
from model_tools.binning import count_categorical, count_numeric, quantile_edges
from model_tools.manifest import BinnedDistribution, FeatureProfile, ReferenceProfile

N_DEVICES = 37
N_WINDOWS = 5

# ---------------------------------------------------------------- how devices count


def device_counts(
    values: np.ndarray, edges: list[float], rng: np.random.Generator, vmin: float, vmax: float
) -> list[FeatureCounts]:
    """Split rows over devices x windows (some parts empty) and count each part."""
    part = rng.integers(0, N_DEVICES * N_WINDOWS, size=values.size)
    out = []
    for p in range(N_DEVICES * N_WINDOWS):
        dist = count_numeric(values[part == p], edges, vmin, vmax)
        out.append(
            FeatureCounts(
                bins=dist.counts, nan=dist.nan, below_min=dist.below_min, above_max=dist.above_max
            )
        )
    return out


# ---------------------------------------------------------------- the independent computation


def raw_counts(values: np.ndarray, edges: list[float]) -> np.ndarray:
    """Bins + NaN bin of the raw rows, right-closed, without model_tools or fleet_server."""
    nan = np.isnan(values)
    idx = np.searchsorted(np.asarray(edges), values[~nan], side="left")
    counts = [int((idx == i).sum()) for i in range(len(edges) + 1)]
    return np.array(counts + [int(nan.sum())])


def expected_psi(ref: np.ndarray, cur: np.ndarray) -> float:
    p = ref / ref.sum()
    q = cur / cur.sum()
    p = np.where(p == 0, 1e-4, p)
    q = np.where(q == 0, 1e-4, q)
    # PSI is the symmetrised Kullback-Leibler divergence (Jeffreys).
    return float(rel_entr(q, p).sum() + rel_entr(p, q).sum())


def expected_chi2(ref: np.ndarray, cur: np.ndarray) -> tuple[float, float, int]:
    table = np.array([ref, cur])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2:
        return 0.0, 1.0, 0
    res = stats.chi2_contingency(table, correction=False)
    return float(res.statistic), float(res.pvalue), int(res.dof)


def check_feature(
    ref_values: np.ndarray,
    cur_values: np.ndarray,
    rng: np.random.Generator,
    edges: list[float] | None = None,
) -> drift.FeatureDrift:
    """Count, merge, compute; compare every metric with the raw-row computation."""
    finite_ref = ref_values[~np.isnan(ref_values)]
    edges = quantile_edges(ref_values) if edges is None else edges
    vmin, vmax = float(finite_ref.min()), float(finite_ref.max())
    std = float(finite_ref.std())
    reference = count_numeric(ref_values, edges, vmin, vmax)

    parts = device_counts(cur_values, edges, rng, vmin, vmax)
    merged = drift.merge_counts(parts)
    # The vectorised forms agree with the list form: matrix sum, and via per-device groups.
    matrix = np.stack([drift.counts_vector(p) for p in parts])
    assert np.array_equal(drift.merge_count_matrix(matrix), merged)
    _, per_device = drift.sum_by_group(matrix, np.arange(len(parts)) % N_DEVICES)
    assert np.array_equal(per_device.sum(axis=0), merged)
    whole = drift.merge_feature_counts(parts)
    assert whole.below_min == int((cur_values < vmin).sum())
    assert whole.above_max == int((cur_values > vmax).sum())

    ref_raw = raw_counts(ref_values, edges)
    cur_raw = raw_counts(cur_values, edges)
    assert np.array_equal(merged, cur_raw), "merged device counts must equal the whole's counts"
    assert np.array_equal(np.append(reference.counts, reference.nan), ref_raw)

    fd = drift.feature_drift(
        reference,
        merged[:-1],
        int(merged[-1]),
        kind="numeric",
        ref_min=vmin,
        ref_max=vmax,
        ref_std=std,
    )

    assert fd.n_ref == ref_values.size and fd.n_cur == cur_values.size
    assert fd.psi == pytest.approx(expected_psi(ref_raw, cur_raw), abs=1e-9)
    assert fd.js == pytest.approx(
        jensenshannon(ref_raw / ref_raw.sum(), cur_raw / cur_raw.sum(), base=2), abs=1e-9
    )

    stat, p_value, dof = expected_chi2(ref_raw, cur_raw)
    assert fd.k - 1 == dof
    assert fd.chi2 == pytest.approx(stat, rel=1e-9, abs=1e-9)
    assert fd.chi2_p == pytest.approx(p_value, rel=1e-7, abs=1e-12)
    assert fd.noise_psi == pytest.approx(
        stats.chi2.ppf(0.99, max(dof, 1)) * (1 / fd.n_ref + 1 / fd.n_cur), rel=1e-9
    )

    # KS: the binned CDFs are exact at the (right-closed) edges, so the binned statistic never
    # exceeds the raw one; between two edges each CDF rises by at most that bin's share, so the
    # raw supremum can exceed the binned one by at most the largest single-bin share.
    cur_finite = cur_values[~np.isnan(cur_values)]
    if cur_finite.size and finite_ref.size:
        raw_ks = stats.ks_2samp(finite_ref, cur_finite).statistic
        p = ref_raw[:-1] / ref_raw[:-1].sum()
        q = cur_raw[:-1] / cur_raw[:-1].sum()
        assert fd.ks <= raw_ks + 1e-12
        assert raw_ks - fd.ks <= np.maximum(p, q).max() + 1e-12

        # Wasserstein: exactly W1 of the bin masses placed at their representative positions ...
        positions = drift.bin_positions(edges, vmin, vmax)
        w_binned = stats.wasserstein_distance(positions, positions, ref_raw[:-1], cur_raw[:-1])
        if std > 0:
            assert fd.wasserstein == pytest.approx(w_binned / std, rel=1e-9, abs=1e-12)
            # ... and within the mass-moving bound of the raw W1 (triangle inequality: each side
            # moved to its bins' positions costs the mean distance of a row to its position).
            moved = sum(
                float(np.abs(v - positions[np.searchsorted(edges, v, side="left")]).mean())
                for v in (finite_ref, cur_finite)
            )
            raw_w = stats.wasserstein_distance(finite_ref, cur_finite)
            assert abs(fd.wasserstein * std - raw_w) <= moved + 1e-9
        else:
            assert fd.wasserstein is None
    json.dumps(fd.to_dict(), allow_nan=False)
    return fd


# ---------------------------------------------------------------- random data


def _normal(rng, n, shift=0.0):
    return rng.normal(10 + 2 * shift, 2, n)  # shift in standard deviations


def _lognormal(rng, n, shift=0.0):
    return rng.lognormal(0.5 + shift, 0.8, n)


def _discrete(rng, n, shift=0.0):
    # Poisson(2): the decile edges collide and merge into fewer bins.
    return rng.poisson(2 + 3 * shift, n).astype(float)


def _with_nans(rng, n, shift=0.0):
    x = rng.gamma(2, 3, n) + shift * 3
    x[rng.random(n) < 0.05 + 0.2 * shift] = np.nan
    return x


def _out_of_range(rng, n, shift=0.0):
    # The current side widens: many values fall below the training minimum / above the max.
    return rng.uniform(0, 1, n) * (1 + 2 * shift) - shift


GENERATORS = [_normal, _lognormal, _discrete, _with_nans, _out_of_range]


@pytest.mark.parametrize("gen", GENERATORS, ids=lambda g: g.__name__.strip("_"))
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shift", [0.0, 0.5])
def test_random_features_match_independent_computation(gen, seed, shift):
    rng = np.random.default_rng(seed)
    ref = gen(rng, 3000)
    cur = gen(rng, int(rng.integers(800, 5000)), shift)
    fd = check_feature(ref, cur, rng)
    if gen is _discrete:
        assert fd.k < 11  # merged edges
    if shift:
        assert fd.passes(0.1)


def test_discrete_feature_with_a_single_edge_and_zero_std():
    rng = np.random.default_rng(3)
    ref = np.zeros(1000)
    cur = np.where(rng.random(2000) < 0.1, 1.0, 0.0)
    fd = check_feature(ref, cur, rng)
    assert fd.wasserstein is None  # a constant reference has no scale
    assert fd.psi > 0.5


def test_current_with_nans_only_in_the_current_side():
    rng = np.random.default_rng(4)
    ref = rng.normal(size=2000)
    cur = rng.normal(size=2000)
    cur[:300] = np.nan  # a sensor starts dropping values; the rest looks unchanged
    fd = check_feature(ref, cur, rng)
    assert fd.nan_ref == 0 and fd.nan_cur == 300
    assert fd.passes(0.25)
    assert fd.ks < 0.05  # the non-NaN values did not move


# ---------------------------------------------------------------- real data


def _bundled(name: str):
    datasets = pytest.importorskip("sklearn.datasets")
    return getattr(datasets, f"load_{name}")()


@pytest.mark.parametrize("name", ["iris", "wine", "breast_cancer", "diabetes", "digits"])
def test_real_datasets_random_split_and_shift(name):
    data = _bundled(name)
    X = np.asarray(data.data, dtype=float)
    y = np.asarray(data.target)
    rng = np.random.default_rng(7)
    order = rng.permutation(len(X))
    ref_rows, cur_rows = order[: len(X) // 2], order[len(X) // 2 :]
    # A real shift too: the current rows of the lower half of the target only.
    shifted_rows = cur_rows[y[cur_rows] <= np.median(y)]
    columns = range(X.shape[1]) if X.shape[1] <= 30 else range(0, X.shape[1], 3)
    for j in columns:
        cur = X[cur_rows, j].copy()
        cur[rng.random(cur.size) < 0.03] = np.nan
        check_feature(X[ref_rows, j], cur, rng)
        check_feature(X[ref_rows, j], X[shifted_rows, j], rng)


def test_real_dataset_drift_report_and_categorical_prediction():
    data = _bundled("wine")
    X, y = np.asarray(data.data, dtype=float), np.asarray(data.target)
    rng = np.random.default_rng(11)
    order = rng.permutation(len(X))
    ref_rows, cur_rows = order[:100], order[100:]
    cur_rows = cur_rows[y[cur_rows] != 0]  # class 0 disappears from the current traffic

    names = [f"{n} / raw" for n in data.feature_names]  # arbitrary strings as names
    features = []
    for j, name in enumerate(names):
        col = X[ref_rows, j]
        edges = quantile_edges(col)
        features.append(
            FeatureProfile(
                name=name,
                kind="numeric",
                distribution=count_numeric(col, edges, float(col.min()), float(col.max())),
                min=float(col.min()),
                max=float(col.max()),
                mean=float(col.mean()),
                std=float(col.std()),
            )
        )
    classes = ["0", "1", "2"]
    profile = ReferenceProfile(
        rows=len(ref_rows),
        features=features,
        prediction=count_categorical([str(v) for v in y[ref_rows]], classes),
    )

    feature_counts = []
    for j, fp in enumerate(features):
        parts = device_counts(X[cur_rows, j], fp.distribution.edges, rng, fp.min, fp.max)
        feature_counts.append(drift.merge_feature_counts(parts))
    pred = count_categorical([str(v) for v in y[cur_rows]] + ["7"], classes)  # "7": other
    report = drift.drift_report(profile, feature_counts, (pred.counts, pred.nan))

    assert list(report.features) == names
    for j, name in enumerate(names):
        ref_raw = raw_counts(X[ref_rows, j], features[j].distribution.edges)
        cur_raw = raw_counts(X[cur_rows, j], features[j].distribution.edges)
        assert report.features[name].psi == pytest.approx(expected_psi(ref_raw, cur_raw), abs=1e-9)

    p = report.prediction
    assert p.kind == "categorical" and p.ks is None and p.wasserstein is None
    ref_pred = np.array(profile.prediction.counts + [0])
    cur_pred = np.array(pred.counts + [0])
    assert p.psi == pytest.approx(expected_psi(ref_pred, cur_pred), abs=1e-9)
    stat, p_value, _ = expected_chi2(ref_pred, cur_pred)
    assert p.chi2 == pytest.approx(stat, rel=1e-9)
    assert p.chi2_p == pytest.approx(p_value, rel=1e-7, abs=1e-15)
    assert p.chi2_p < 1e-4 and p.passes(0.25)  # class 0 vanished: drift, clearly
    assert p.js == pytest.approx(
        jensenshannon(ref_pred / ref_pred.sum(), cur_pred / cur_pred.sum(), base=2), abs=1e-9
    )
    encoded = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert set(encoded["features"]) == set(names)
    assert encoded["prediction"]["ks"] is None


def test_categorical_chi_square_matches_scipy_chisquare_goodness_of_fit():
    # With a very large reference the two-sample test approaches the one-sample
    # goodness-of-fit test against the reference shares: a sanity link to scipy.chisquare.
    ref = np.array([400_000, 300_000, 200_000, 100_000])
    cur = np.array([420, 280, 190, 110])
    fd = drift.feature_drift(
        BinnedDistribution(categories=["a", "b", "c"], counts=ref.tolist()), cur, 0
    )
    gof = stats.chisquare(cur, ref / ref.sum() * cur.sum())
    assert fd.chi2 == pytest.approx(gof.statistic, rel=2e-3)
    assert fd.chi2_p == pytest.approx(gof.pvalue, rel=2e-2)
