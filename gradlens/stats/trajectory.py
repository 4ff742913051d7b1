"""How much of a run's cumulative update lies along one direction, and what a random walk would give.

Notation: ``u_t`` (t = 1..T) the vectorised update of step t (of one module's B, of Delta W = s B A, or of the
whole adapter), ``x_t = u_1 + ... + u_t`` the cumulative update after step t (B starts at 0, so ``x_t = vec(B_t)``).
The trajectory matrix has rows ``x_t``; its top-direction share is ``s_1^2 / sum_i s_i^2`` (the inverse of its
stable rank). RELEX (arXiv 2605.21468) reports that GRPO's weight-update trajectory is dominated by one direction.

A random walk already puts most of its trajectory's energy in one direction: its rows are nested partial sums, all
carrying the first steps. With T equal steps in many dimensions the Gram is ``min(t, s)``, whose top eigenvalue holds
``8 / pi^2 = 0.81`` of the trace as T grows. So the share is read against :func:`random_walk_top_shares`: random
walks with the run's own step norms in the same number of dimensions.
"""

from __future__ import annotations

import numpy as np

from gradlens.stats.core import gram_singular_values, stable_rank


def cumulative_gram(increment_gram: np.ndarray) -> np.ndarray:
    """The Gram of the partial sums ``x_t = sum_{k<=t} u_k`` from the Gram of the increments ``u_k``:
    ``L G L^T`` with ``L`` the lower-triangular matrix of ones."""
    g = np.asarray(increment_gram, np.float64)
    return np.cumsum(np.cumsum(g, axis=0), axis=1)


def top_share(gram: np.ndarray) -> float:
    """``s_1^2 / sum_i s_i^2`` of the matrix whose Gram is ``gram`` (1 for a straight line, ``1/T`` at most
    isotropic); NaN for a zero matrix."""
    return 1.0 / stable_rank(gram_singular_values(gram))


def unit_wishart_gram(steps: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """The Gram of ``steps`` independent uniformly random unit vectors in ``dim`` dimensions, sampled in
    ``O(steps^2)`` whatever ``dim`` (Bartlett's decomposition of the Wishart matrix ``Z Z^T``, ``Z`` Gaussian, then
    rows scaled to unit norm); with ``dim < steps`` from ``Z`` itself."""
    if dim < steps:
        z = rng.standard_normal((steps, dim))
        w = z @ z.T
    else:
        a = np.tril(rng.standard_normal((steps, steps)), -1)
        a[np.diag_indices(steps)] = np.sqrt(rng.chisquare(dim - np.arange(steps)))
        w = a @ a.T
    d = np.sqrt(np.diag(w))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nan_to_num(w / np.outer(d, d))


def random_walk_top_shares(step_norms: np.ndarray, dim: int, draws: int = 200, seed: int = 0) -> np.ndarray:
    """:func:`top_share` of ``draws`` random walks in ``dim`` dimensions whose step t has norm ``step_norms[t]`` and
    a uniformly random direction (the null for a trajectory with those step sizes)."""
    n = np.asarray(step_norms, np.float64)
    rng = np.random.default_rng(seed)
    scale = np.outer(n, n)
    return np.array([top_share(cumulative_gram(unit_wishart_gram(len(n), dim, rng) * scale))
                     for _ in range(draws)])
