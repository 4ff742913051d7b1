"""The trajectory's top-direction share and its random-walk null, checked against numpy SVD, explicit partial sums,
the closed-form spectrum of a random walk and direct simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradlens.stats.trajectory import cumulative_gram, random_walk_top_shares, top_share, unit_wishart_gram

EPS = float(np.finfo(np.float64).eps)


def test_top_share_equals_numpy_svd():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 300)) * np.linspace(3.0, 0.1, 12)[:, None]
    s = np.linalg.svd(x, compute_uv=False)
    assert top_share(x @ x.T) == pytest.approx(s[0] ** 2 / (s**2).sum(), rel=1e3 * EPS)


def test_top_share_of_a_line_and_of_orthogonal_rows():
    v = np.random.default_rng(1).standard_normal(50)
    line = np.outer(np.arange(1, 9), v)
    assert top_share(line @ line.T) == pytest.approx(1.0, rel=1e3 * EPS)
    assert top_share(np.eye(8)) == pytest.approx(1 / 8, rel=1e3 * EPS)
    assert math.isnan(top_share(np.zeros((4, 4))))


def test_cumulative_gram_is_the_gram_of_the_partial_sums():
    u = np.random.default_rng(2).standard_normal((9, 40))
    x = np.cumsum(u, axis=0)
    np.testing.assert_allclose(cumulative_gram(u @ u.T), x @ x.T, rtol=0, atol=1e2 * EPS * (x**2).sum())


def test_unit_wishart_gram_has_unit_diagonal_and_the_moments_of_random_directions():
    rng = np.random.default_rng(3)
    dim, steps = 400, 6
    grams = np.stack([unit_wishart_gram(steps, dim, rng) for _ in range(3000)])
    np.testing.assert_allclose(np.diagonal(grams, axis1=1, axis2=2), 1.0, rtol=0, atol=1e2 * EPS)
    off = grams[:, ~np.eye(steps, dtype=bool)]
    # cosines of independent random directions: mean 0, variance 1/dim
    assert abs(off.mean()) < 5 * math.sqrt(1 / dim / off.size) * math.sqrt(steps)
    assert off.var() == pytest.approx(1 / dim, rel=0.05)


def test_random_walk_null_matches_the_closed_form_spectrum_of_min_t_s():
    """Equal steps in many dimensions: the Gram tends to min(t, s), whose eigenvalues are 1 / (4 sin^2((2k-1) pi /
    (4T+2))), k = 1..T."""
    steps = 30
    k = np.arange(1, steps + 1)
    lam = 1 / (4 * np.sin((2 * k - 1) * np.pi / (4 * steps + 2)) ** 2)
    expected = lam[0] / lam.sum()
    shares = random_walk_top_shares(np.ones(steps), dim=10**7, draws=20, seed=0)
    assert shares.mean() == pytest.approx(expected, abs=2e-3)


@pytest.mark.parametrize("dim", [5, 20])  # fewer dimensions than steps, and Bartlett's sampling
def test_random_walk_null_matches_direct_simulation_in_few_dimensions(dim):
    rng = np.random.default_rng(5)
    norms = np.linspace(2.0, 0.5, 10)
    direct = []
    for _ in range(4000):
        z = rng.standard_normal((10, dim))
        x = np.cumsum(z / np.linalg.norm(z, axis=1, keepdims=True) * norms[:, None], axis=0)
        s = np.linalg.svd(x, compute_uv=False)
        direct.append(s[0] ** 2 / (s**2).sum())
    sampled = random_walk_top_shares(norms, dim=dim, draws=4000, seed=6)
    se = math.sqrt(np.var(direct) / 4000 + sampled.var() / 4000)
    assert sampled.mean() == pytest.approx(np.mean(direct), abs=4 * se)
