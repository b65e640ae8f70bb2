"""Multivariate drift: two correlated features whose correlation flips sign leave every
marginal as it was, and per-feature drift sees nothing; the reconstruction error's distribution
moves. Clean data from the reference's own distribution moves neither."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest

from edge_agent.protocol import Resources
from edge_agent.runtime import ModelRuntime
from edge_agent.telemetry import Telemetry
from model_tools.bundle import read_bundle

N_REF = 4000
N_CUR = 3000
RHO = 0.9


def _draw(n: int, rho: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """x0, x1 standard normal with correlation rho; x2..x5 independent standard normal."""
    rng = np.random.default_rng(seed)
    cov = [[1.0, rho], [rho, 1.0]]
    pair = rng.multivariate_normal([0.0, 0.0], cov, size=n)
    X = np.column_stack([pair, rng.normal(size=(n, 4))])
    y = (X[:, 0] + X[:, 2] - X[:, 3] + rng.normal(scale=0.5, size=n) > 0).astype(int)
    return X, y


@cache
def _bundle():
    from sklearn.linear_model import LogisticRegression

    from model_tools.pipeline import build_bundle

    X, y = _draw(N_REF, RHO, seed=0)
    est = LogisticRegression().fit(X, y)
    data = build_bundle(est, (X, y), name="pair", version="1", quantize="float32").bundle_bytes
    bundle = read_bundle(data, require_signature=False)
    return bundle.manifest, ModelRuntime(bundle)


def _serve(rows: np.ndarray):
    manifest, rt = _bundle()
    t = Telemetry("d", clock=lambda: 0.0, sample_rows=0)
    t.set_model(manifest)
    for i in range(0, len(rows), 50):
        part = rows[i : i + 50].tolist()
        out = rt.run(rt.feeds(part))
        t.record(part, out.primary, 1e-5, out.probabilities)
    return t.flush(1.0, 1, Resources(), 0, "pair")


def _psi(ref: list[int], cur: list[int]) -> float:
    p = np.asarray(ref, float) / sum(ref)
    q = np.asarray(cur, float) / sum(cur)
    p, q = np.where(p == 0, 1e-4, p), np.where(q == 0, 1e-4, q)
    return float(((q - p) * np.log(q / p)).sum())


def _noise_psi(k: int, n_ref: int, n_cur: int) -> float:
    """99th percentile of PSI between two samples of one distribution (chi-square approx.)."""
    from scipy.stats import chi2

    return float(chi2.ppf(0.99, k - 1) * (1 / n_ref + 1 / n_cur))


def _verdict(window):
    """(error PSI, its noise level, |mean shift| in units of its 3-sigma threshold)."""
    manifest, _ = _bundle()
    mv = manifest.profile.multivariate
    w = window.multivariate
    psi = _psi(mv.counts, w.bins)
    noise = _noise_psi(len(mv.counts), mv.rows, w.rows)
    mean = w.sum / w.rows
    # The threshold scales with the merged sample: 3 standard errors of a mean of w.rows rows.
    threshold = 3.0 * mv.std_error * np.sqrt(1.0 / w.rows + 1.0 / mv.rows)
    return psi, noise, abs(mean - mv.mean_error) / threshold


def _feature_psi(window, j: int) -> float:
    manifest, _ = _bundle()
    ref = manifest.profile.features[j].distribution
    f = window.features[j]
    return _psi(ref.counts + [ref.nan], f.bins + [f.nan])


def test_the_profile_is_a_pca_of_the_standardised_reference():
    manifest, _ = _bundle()
    mv = manifest.profile.multivariate
    assert mv is not None and mv.features == list(range(6)) and mv.rows == N_REF
    # The correlated pair makes one component of about 1.9 / 6 of the variance; the rest ~1/6 each.
    assert mv.explained > mv.variance_target == 0.65
    assert 3 <= len(mv.components) <= 4
    w = np.asarray(mv.components)
    np.testing.assert_allclose(w @ w.T, np.eye(len(w)), atol=1e-12)
    assert sum(mv.counts) == N_REF and len(mv.counts) == len(mv.edges) + 1 == 10


def test_a_flipped_correlation_moves_the_reconstruction_error_and_no_marginal():
    X, _ = _draw(N_CUR, -RHO, seed=1)
    w = _serve(X)
    # Every feature on its own looks like the reference...
    for j in range(6):
        f_psi = _feature_psi(w, j)
        assert f_psi < 0.1, (j, f_psi)
    # ...but the rows no longer sit near the reference's principal plane.
    psi, noise, shift = _verdict(w)
    assert psi > max(0.25, noise), psi
    assert shift > 1.0, shift
    manifest, _ = _bundle()
    assert w.multivariate.sum / w.multivariate.rows > 1.25 * manifest.profile.multivariate.mean_error


def test_clean_data_stays_quiet():
    X, _ = _draw(N_CUR, RHO, seed=2)
    w = _serve(X)
    psi, noise, shift = _verdict(w)
    assert psi < noise, (psi, noise)
    assert shift < 1.0, shift


def test_nan_is_filled_with_the_reference_median():
    manifest, rt = _bundle()
    mv = manifest.profile.multivariate
    X, _ = _draw(4, RHO, seed=3)
    X[0, 1] = np.nan
    X[2, 4] = np.nan
    t = Telemetry("d", clock=lambda: 0.0, sample_rows=0)
    t.set_model(manifest)
    for row in X.tolist():
        t.record([row], [0], 1e-5, [[0.5, 0.5]])
    w = t.flush(1.0, 1, Resources(), 0, "pair").multivariate
    assert w.rows == 4 and w.filled == 2
    filled = np.where(np.isnan(X), np.asarray(mv.fill), X)
    z = (filled - np.asarray(mv.mean)) / np.asarray(mv.scale)
    comp = np.asarray(mv.components)
    err = np.linalg.norm(z - z @ comp.T @ comp, axis=1)
    assert w.sum == pytest.approx(err.sum(), rel=1e-9)
    assert np.asarray(mv.fill) == pytest.approx(np.median(_draw(N_REF, RHO, seed=0)[0], axis=0))
