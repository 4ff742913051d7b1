"""Pure numpy statistics of a gradient trajectory; each docstring gives the formula it computes.

Notation: ``g_t`` (t = 0..T-1) is the vectorised gradient of one module (or the concatenation of several) at the
t-th usable recorded step, ``G_ts = g_t . g_s`` the ``T x T`` Gram matrix, ``s_1 >= s_2 >= ...`` singular values.
Nothing here reads files; :mod:`gradlens.analysis.driver` feeds these functions from a run, shard by shard.

Trajectory Grams are float64 (:func:`gram_product`): the stored gradients are float32, so every product
``x_tk x_sk`` is exact in float64 and an entry is off by at most ``gamma_D sum_k |x_tk x_sk| <= gamma_D ||x_t||
||x_s||`` with ``gamma_D = D eps / (1 - D eps)`` (Higham 2002, eq. 3.5), so each eigenvalue by at most
``gamma_D trace(G)`` (Weyl): float64 rounding. Float32 products would be twice as fast but off by ``2^-24`` per
term instead of ``2^-53``, which moves the small eigenvalues of a near-low-rank trajectory (the case under study) and
with them its effective rank by percents.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

EPS = float(np.finfo(np.float64).eps)
GRAM_BLOCK = 512  # columns per float64 block product of a Gram (the cast buffer: T x 512 float64, 0.4 MB at T=100)
STABLE_THRESHOLDS: tuple[float, ...] = (0.5, 0.8)
ENERGY_FRACTION = 0.9


# --------------------------------------------------------------------------------------------------------------------
# Gram matrices and cosines


def gram_product(a: np.ndarray, b: np.ndarray | None = None, block: int = GRAM_BLOCK) -> np.ndarray:
    """``a @ b.T`` (``b`` None: ``a @ a.T``) in float64, ``block`` columns at a time.

    Float32 rows are cast block by block into a small float64 buffer (cache-resident, never a float64 copy of the
    whole matrix); float64 rows are multiplied in place. The products and every sum are float64.
    """
    out = np.zeros((len(a), len(a) if b is None else len(b)))
    width = min(block, a.shape[1])
    buf_a = None if a.dtype == np.float64 else np.empty((len(a), width))
    buf_b = None if b is None or b.dtype == np.float64 else np.empty((len(b), width))
    for lo in range(0, a.shape[1], block):
        x = _block64(a, buf_a, lo, block)
        out += x @ (x if b is None else _block64(b, buf_b, lo, block)).T
    return out


def _block64(m: np.ndarray, buf: np.ndarray | None, lo: int, block: int) -> np.ndarray:
    """Columns ``lo:lo+block`` of ``m`` as float64: a view of ``m`` if it is float64, else cast into ``buf``."""
    cols = m[:, lo:lo + block]
    if buf is None:
        return cols
    out = buf[:, :cols.shape[1]]
    np.copyto(out, cols)
    return out


def gram_norms(gram: np.ndarray) -> np.ndarray:
    """``||g_t|| = sqrt(G_tt)`` (negative rounding noise on the diagonal is clipped to 0)."""
    return np.sqrt(np.clip(np.diagonal(gram), 0.0, None))


def cosine_matrix(gram: np.ndarray) -> np.ndarray:
    """``C_ts = G_ts / sqrt(G_tt G_ss)``; NaN in every row and column of a step whose gradient is exactly zero."""
    n = gram_norms(gram)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = gram / np.outer(n, n)
    c[n == 0, :] = np.nan
    c[:, n == 0] = np.nan
    return np.clip(c, -1.0, 1.0)


def lag_cosines(gram: np.ndarray, max_lag: int) -> list[np.ndarray]:
    """Series of step-to-step cosines: element ``L-1`` is ``[cos(g_t, g_{t+L}) for t in 0..T-L-1]``, L = 1..max_lag.

    The lag counts usable recorded steps. A lag >= T gives an empty series.
    """
    c = cosine_matrix(gram)
    return [np.diagonal(c, offset=lag).copy() for lag in range(1, max_lag + 1)]


def nanmean(x: np.ndarray) -> float:
    """Mean over the finite values of ``x``; NaN when there are none (no warning)."""
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else math.nan


def lag_cosine_means(gram: np.ndarray, max_lag: int) -> np.ndarray:
    """``mean_t cos(g_t, g_{t+L})`` for L = 1..max_lag (zero-gradient steps skipped; NaN where no pair exists)."""
    return np.array([nanmean(s) for s in lag_cosines(gram, max_lag)])


def cosine_to_mean(gram: np.ndarray) -> np.ndarray:
    """``cos(g_t, gbar)`` with ``gbar = (1/T) sum_s g_s``: ``sum_s G_ts / (||g_t|| sqrt(sum_{s,u} G_su))``.

    Uses ``g_t . gbar = (1/T) sum_s G_ts`` and ``||gbar||^2 = (1/T^2) sum_{s,u} G_su``. NaN if the mean is zero.
    """
    total = float(gram.sum())
    n = gram_norms(gram)
    if total <= 0:
        return np.full(len(n), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = gram.sum(axis=1) / (n * math.sqrt(total))
    c[n == 0] = np.nan
    return np.clip(c, -1.0, 1.0)


# --------------------------------------------------------------------------------------------------------------------
# Spectra


def unit_gram(gram: np.ndarray) -> np.ndarray:
    """The Gram matrix of the rows scaled to unit norm: ``G_ts / sqrt(G_tt G_ss)``, over the non-zero rows only."""
    n = gram_norms(gram)
    keep = n > 0
    return gram[np.ix_(keep, keep)] / np.outer(n[keep], n[keep])


def gram_singular_values(gram: np.ndarray) -> np.ndarray:
    """Singular values of the ``T x D`` matrix with rows ``g_t``, from its Gram: ``s_i = sqrt(max(lambda_i, 0))``.

    ``lambda_i`` are the eigenvalues of ``G`` (``numpy.linalg.eigvalsh``), in descending order. Eigenvalues below
    ``10 T eps lambda_max`` are rounding noise of a rank-deficient ``G`` (the eigensolver's own error) and are set
    to zero; everything above is kept.
    """
    if gram.size == 0:
        return np.zeros(0)
    lam = np.linalg.eigvalsh(np.asarray(gram, np.float64))[::-1]
    if lam[0] <= 0:
        return np.zeros_like(lam)
    lam[lam <= 10 * len(lam) * EPS * lam[0]] = 0.0
    return np.sqrt(lam)


def _masked(s: np.ndarray, rtol: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows of singular values (float64) and the mask of those above ``rtol * max``; rows with a non-finite value or
    no positive one mask nothing."""
    s = np.atleast_2d(np.asarray(s, np.float64))
    top = np.max(s, axis=1, initial=0.0, where=np.isfinite(s))
    valid = np.isfinite(s).all(axis=1) & (top > 0)
    return s, (s > rtol * top[:, None]) & valid[:, None]


def spectrum_rows(s: np.ndarray, rtol: float = 0.0, fraction: float = ENERGY_FRACTION) -> dict[str, np.ndarray]:
    """:func:`erank` (above ``rtol``), :func:`stable_rank` and :func:`energy_count` of each row of ``s`` (``(n, k)``),
    vectorised over the rows (one call per shard of steps instead of one per step)."""
    s, keep = _masked(s, rtol)
    pos = keep if rtol == 0.0 else _masked(s, 0.0)[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(keep, s, 0.0)
        p = v / v.sum(axis=1, keepdims=True)
        entropy = -np.where(keep, p * np.log(np.where(keep, p, 1.0)), 0.0).sum(axis=1)
        e = np.where(pos, s, 0.0) ** 2
        stable = e.sum(axis=1) / e.max(axis=1, initial=0.0)
        cum = np.cumsum(-np.sort(-e, axis=1), axis=1)
        count = (cum < fraction * cum[:, -1:] * (1 - 1e-12)).sum(axis=1) + 1.0 if e.shape[1] else stable
    return {"erank": np.where(keep.any(axis=1), np.exp(entropy), np.nan),
            "stable_rank": np.where(pos.any(axis=1), stable, np.nan),
            "energy90": np.where(pos.any(axis=1), count, np.nan)}


def erank(s: np.ndarray, rtol: float = 0.0) -> float:
    """Entropy effective rank (Roy & Vetterli 2007): ``exp(-sum_i p_i log p_i)``, ``p_i = s_i / sum_j s_j``.

    Over the non-zero singular values (those above ``rtol * s_max``); between 1 and their number; NaN if all are 0.
    """
    return float(spectrum_rows(s, rtol)["erank"][0])


def stable_rank(s: np.ndarray) -> float:
    """Stable rank ``||M||_F^2 / ||M||_2^2 = sum_i s_i^2 / s_1^2``; NaN for a zero matrix."""
    return float(spectrum_rows(s)["stable_rank"][0])


def energy_count(s: np.ndarray, fraction: float = ENERGY_FRACTION) -> float:
    """Fewest leading components holding ``fraction`` of the energy: min k with ``sum_{i<=k} s_i^2 >= f sum_i s_i^2``.

    NaN for a zero matrix.
    """
    return float(spectrum_rows(s, fraction=fraction)["energy90"][0])


def spectrum_stats(s: np.ndarray, rtol: float = 0.0) -> dict[str, float]:
    """``erank``, ``stable_rank`` and ``energy90`` of one set of singular values."""
    return {k: float(v[0]) for k, v in spectrum_rows(s, rtol).items()}


def trajectory_stats(gram: np.ndarray) -> dict[str, float]:
    """Spectral statistics of the trajectory matrix (rows ``g_t``), raw and with rows scaled to unit norm.

    Both come from the ``T x T`` float64 Gram matrix (:func:`gram_singular_values`, :func:`unit_gram`), never from
    an SVD of the tall matrix. Keys: ``erank_traj``, ``stable_rank_traj``, ``energy90_traj`` and the same with
    ``_unit``.
    """
    out = {}
    for suffix, g in (("", gram), ("_unit", unit_gram(gram))):
        for key, value in spectrum_stats(gram_singular_values(g)).items():
            out[f"{key}_traj{suffix}"] = value
    return out


def step_grams(grads: np.ndarray) -> np.ndarray:
    """The small Gram of each ``G_t`` in float64: ``G_t^T G_t`` (``r x r``), or ``G_t G_t^T`` if ``d_out < r``.

    One step at a time (syrk), so the float64 copy is one step, never a whole shard. Its trace is ``||G_t||^2``:
    non-finite exactly when ``G_t`` has a NaN or Inf (float32 squares cannot overflow float64) and zero exactly when
    ``G_t`` is.
    """
    grads = np.asarray(grads)
    n, d, r = grads.shape
    out = np.empty((n, min(d, r), min(d, r)))
    for t in range(n):
        x = grads[t].astype(np.float64)
        x = x if d >= r else x.T
        with np.errstate(all="ignore"):
            out[t] = x.T @ x
    return out


def step_singular_values(grads: np.ndarray, grams: np.ndarray | None = None) -> np.ndarray:
    """Singular values of each ``G_t``: ``(n, d_out, r) -> (n, min(d_out, r))``, descending, in float64.

    From the eigenvalues of the small Gram (:func:`step_grams`, or ``grams`` if already computed): 50x faster than a
    batched SVD of tall ``d_out x r`` matrices. The Gram squares the condition number, so a step whose smallest
    eigenvalue is below ``1e-6`` of its largest (``s_min < 1e-3 s_max``, rank-deficient steps included) gets a
    direct SVD instead, which keeps the relative error of every other eigenvalue below ``1e6 d_out eps``.
    """
    grams = step_grams(grads) if grams is None else grams
    lam = np.linalg.eigvalsh(grams)[:, ::-1]
    s = np.sqrt(np.clip(lam, 0.0, None))
    ill = lam[:, -1] <= 1e-6 * lam[:, 0]
    if ill.any():
        s[ill] = np.linalg.svd(np.asarray(grads)[ill].astype(np.float64), compute_uv=False)
    return s


def step_spectrum_stats(grads: np.ndarray, grams: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-step ``erank``, ``stable_rank`` and ``energy90`` of each ``G_t`` (arrays of length n; NaN for a zero G_t).

    Singular values below ``max(d_out, r) eps s_max`` count as zero (the ``numpy.linalg.matrix_rank`` tolerance).
    """
    grads = np.asarray(grads)
    rtol = max(grads.shape[1:], default=1) * EPS
    return spectrum_rows(step_singular_values(grads, grams), rtol)


# --------------------------------------------------------------------------------------------------------------------
# Sign stability


def sign_stability(sumsign: np.ndarray, counts: int | np.ndarray) -> np.ndarray:
    """Per entry ``|sum_t sign(g_t)| / n``, ``n`` the entry's count of steps with a non-zero gradient.

    ``sign(0) = 0``, so steps where an entry's gradient is exactly zero (a GRPO step whose groups all had equal
    rewards) carry no sign and do not dilute it; NaN for an entry that was never non-zero.
    """
    counts = np.asarray(counts)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.abs(np.asarray(sumsign, np.float64)) / counts
    return np.where(counts > 0, out, np.nan)


def stable_share(stability: np.ndarray, threshold: float) -> float:
    """Share of entries whose sign stability is strictly above ``threshold``."""
    stability = np.asarray(stability)
    return float((stability > threshold).mean()) if stability.size else math.nan


def sign_null_mean(steps: int) -> float:
    """``E|S_T| / T`` for a simple random walk ``S_T`` of T independent +-1 signs (the sign stability of chance).

    ``S_T = 2X - T`` with ``X ~ Binomial(T, 1/2)``; exactly ``binom(T-1, floor((T-1)/2)) / 2^(T-1)``
    (about ``sqrt(2 / (pi T))`` for large T), evaluated through log-gamma.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    m = (steps - 1) // 2
    log = math.lgamma(steps) - math.lgamma(m + 1) - math.lgamma(steps - m) - (steps - 1) * math.log(2)
    return math.exp(log)


def _half_binomial_pmfs(steps: int) -> Iterator[np.ndarray]:
    """``P(k) = binom(n, k) / 2^n`` for n = 1..steps, by Pascal's rule ``P_n(k) = (P_{n-1}(k-1) + P_{n-1}(k)) / 2``.

    All terms are positive, so each row's relative error is at most ``n eps`` (exact for small n); no scipy import.
    """
    p = np.ones(1)
    for _ in range(steps):
        q = np.zeros(len(p) + 1)
        q[:-1] += p
        q[1:] += p
        p = q * 0.5
        yield p


def _null_values(steps: int) -> np.ndarray:
    return np.abs(2 * np.arange(steps + 1) - steps) / steps


def sign_null_pmf(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Null distribution of one entry's sign stability: values ``|2k - T| / T`` with ``P = binom(T, k) / 2^T``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return _null_values(steps), deque(_half_binomial_pmfs(steps), maxlen=1)[0]


def _share_above(values: np.ndarray, probs: np.ndarray, threshold: float) -> float:
    return float(probs[values > threshold].sum())


def _binned(values: np.ndarray, probs: np.ndarray, bins: int) -> np.ndarray:
    return np.histogram(values, bins=histogram_edges(bins), weights=probs)[0]


def sign_null_share(steps: int, threshold: float) -> float:
    """Probability under the null that an entry's sign stability is strictly above ``threshold``."""
    return _share_above(*sign_null_pmf(steps), threshold)


def histogram_edges(bins: int) -> np.ndarray:
    """``bins`` equal bins on [0, 1] (the last one closed), shared by every histogram so that counts add up."""
    return np.linspace(0.0, 1.0, bins + 1)


def stability_histogram(stability: np.ndarray, bins: int) -> np.ndarray:
    """Counts of sign-stability values in :func:`histogram_edges` bins."""
    return np.histogram(np.asarray(stability, np.float64).ravel(), bins=histogram_edges(bins))[0]


def null_histogram(steps: int, bins: int) -> np.ndarray:
    """Probability of each :func:`histogram_edges` bin under the random-sign null (sums to 1)."""
    return _binned(*sign_null_pmf(steps), bins)


@dataclass(frozen=True)
class SignNull:
    """The random-sign null of one entry's sign stability for every count ``n = 0..steps`` of non-zero steps.

    Row ``n`` of ``mean`` / ``share[threshold]`` / ``hist`` is :func:`sign_null_mean`, :func:`sign_null_share` and
    :func:`null_histogram` for ``n`` (row 0, an entry never non-zero, is zero: such entries are left out).
    """

    mean: np.ndarray
    share: dict[float, np.ndarray]
    hist: np.ndarray

    def pooled(self, by_count: np.ndarray) -> tuple[float, dict[float, float], np.ndarray]:
        """The null of a set of entries, ``by_count[n]`` of which had n non-zero steps: the mean of their nulls.

        Returns (mean null stability, null share above each threshold, null histogram); NaN/zeros without entries.
        """
        w = np.asarray(by_count, np.float64)[1:]
        total = w.sum()
        if total == 0:
            return math.nan, {t: math.nan for t in self.share}, np.zeros(self.hist.shape[1])
        w = w / total
        return (float(w @ self.mean[1:]), {t: float(w @ s[1:]) for t, s in self.share.items()},
                w @ self.hist[1:])


@lru_cache(maxsize=8)
def sign_null_table(steps: int, bins: int) -> SignNull:
    """:class:`SignNull` for counts ``0..steps`` and ``bins`` histogram bins (computed once per ``(steps, bins)``)."""
    mean = np.zeros(steps + 1)
    share = {t: np.zeros(steps + 1) for t in STABLE_THRESHOLDS}
    hist = np.zeros((steps + 1, bins))
    for n, probs in enumerate(_half_binomial_pmfs(steps), start=1):
        values = _null_values(n)
        mean[n] = sign_null_mean(n)
        for t in STABLE_THRESHOLDS:
            share[t][n] = _share_above(values, probs, t)
        hist[n] = _binned(values, probs, bins)
    for a in (mean, hist, *share.values()):
        a.flags.writeable = False
    return SignNull(mean=mean, share=share, hist=hist)
