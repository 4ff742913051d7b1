"""Tests for gradlens.stats: every statistic against an independent plain-numpy computation, on known inputs.

The reference (:func:`reference_row`) stacks the gradients into the dense ``T x D`` matrix and uses a dense SVD and
explicit loops; the code under test works from ``T x T`` Gram matrices accumulated shard by shard.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from gradlens.analysis.driver import analyze_run
from gradlens.errors import GradlensError
from gradlens.stats import core as stats
from gradlens.store import ModuleSpec, RunWriter
from tests.helpers.stats import (
    LAGS,
    SPECS,
    assert_row,
    nanmean,
    random_grads,
    ref_cos,
    ref_erank,
    ref_spectrum,
    reference_row,
    scope_members,
    stacked,
    write,
)

EPS64 = float(np.finfo(np.float64).eps)


# --------------------------------------------------------------------------------------------------------------------
# Independent reference


# --------------------------------------------------------------------------------------------------------------------
# Synthetic runs


# --------------------------------------------------------------------------------------------------------------------
# Pure functions


def test_sign_null_mean_is_exact():
    for T in range(1, 13):  # enumerate every sign sequence
        walks = [abs(sum(seq)) / T for seq in itertools.product((-1, 1), repeat=T)]
        assert stats.sign_null_mean(T) == pytest.approx(sum(walks) / len(walks), rel=1e-12)
        for thr in (0.5, 0.8):
            want = sum(w > thr for w in walks) / len(walks)
            assert stats.sign_null_share(T, thr) == pytest.approx(want, rel=1e-12, abs=1e-15)
        values, probs = stats.sign_null_pmf(T)
        assert probs.sum() == pytest.approx(1.0) and stats.null_histogram(T, 10).sum() == pytest.approx(1.0)
    for T in (1000, 100_000):
        assert stats.sign_null_mean(T) == pytest.approx(math.sqrt(2 / (math.pi * T)), rel=1e-3)


def test_erank_stable_rank_energy_of_known_spectra():
    assert stats.erank(np.array([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert stats.erank(np.ones(5)) == pytest.approx(5.0)
    assert math.isnan(stats.erank(np.zeros(3)))
    s = np.array([4.0, 2.0, 1.0, 0.5])
    p = s / s.sum()
    assert stats.erank(s) == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)))
    assert stats.stable_rank(s) == pytest.approx((16 + 4 + 1 + 0.25) / 16)
    assert stats.energy_count(s) == 2  # 20/21.25 = 0.94 >= 0.9, 16/21.25 = 0.75 < 0.9
    assert stats.energy_count(np.ones(10)) == 9


@pytest.mark.parametrize("rank", [None, 3, 1])
def test_gram_spectrum_equals_dense_svd(rank):
    rng = np.random.default_rng(1)
    T, D = 12, 200
    x = rng.standard_normal((T, D)) * rng.uniform(0.1, 3, (T, 1))
    if rank is not None:
        x = rng.standard_normal((T, rank)) @ rng.standard_normal((rank, D))
    x[4] = 0.0  # a zero step: excluded from the unit-row matrix
    gram = x @ x.T
    got = stats.trajectory_stats(gram)
    norms = np.linalg.norm(x, axis=1)
    for suffix, m in (("", x), ("_unit", x[norms > 0] / norms[norms > 0, None])):
        e, sr, k = ref_spectrum(m)
        assert got[f"erank_traj{suffix}"] == pytest.approx(e, rel=1e-7)
        assert got[f"stable_rank_traj{suffix}"] == pytest.approx(sr, rel=1e-9)
        assert got[f"energy90_traj{suffix}"] == k
    if rank == 1:
        assert got["erank_traj"] == pytest.approx(1.0, abs=1e-12)


def _gamma64(n: int) -> float:
    """``gamma_n = n eps / (1 - n eps)``: the relative error bound of a float64 sum of n terms (Higham, eq. 3.5)."""
    return n * EPS64 / (1 - n * EPS64)


def _erank_rtol(m: np.ndarray) -> float:
    """How far float64 rounding may move the erank of the rows of ``m`` (float32 data) when taken from their Gram.

    Every Gram entry is within ``gamma_D ||x_t|| ||x_s||`` (float32 products are exact in float64) and eigvalsh is
    backward stable (``~T eps ||G||``), so each eigenvalue moves by at most ``delta = (gamma_D + T eps) trace``
    (Weyl), each singular value by at most ``Delta_i = sqrt(lambda_i + delta) - sqrt(max(lambda_i - delta, 0))``
    and ``H = -sum p_i log p_i`` by at most ``sum_i Delta_i (|log p_i| + H) / S`` (``dH = -sum d_i (log p_i + H) /
    S``, first order; ``p_i`` floored at ``Delta_i / S``, the size of a noise value): 2x that for the higher orders.
    """
    s = np.linalg.svd(m.astype(np.float64), compute_uv=False)
    lam, total = s**2, float(s.sum())
    delta = (_gamma64(m.shape[1]) + len(m) * EPS64) * lam.sum()
    width = np.sqrt(lam + delta) - np.sqrt(np.clip(lam - delta, 0.0, None))
    p = np.maximum(s, width) / total
    h = -(p * np.log(p)).sum()
    return float(2 * (width * (np.abs(np.log(p)) + h)).sum() / total)


def test_gram_product_is_float64_exact():
    """``gram_product`` of float32 rows is the float64 Gram: within ``gamma_D sum_k |x_tk x_sk|`` (float64) of the
    exact one (longdouble), on rows of mixed scales; and exactly ``1 + 2^-14`` for a row of 1 then 2^20 entries of
    2^-17, where each float32 block of 512 columns would already lose its ``511 * 2^-34`` next to the 1."""
    rng = np.random.default_rng(21)
    T, D = 7, 3 * stats.GRAM_BLOCK + 77
    x = (rng.standard_normal((T, D)) * rng.uniform(1e-3, 1e3, (T, 1)) * rng.uniform(0.5, 2, D)).astype(np.float32)
    for a, b in ((x, None), (x, x[::-1].copy()), (x.astype(np.float64), None)):
        a128, b128 = a.astype(np.longdouble), (a if b is None else b).astype(np.longdouble)
        want, scale = a128 @ b128.T, np.abs(a128) @ np.abs(b128).T
        got = stats.gram_product(a, b)
        assert got.dtype == np.float64
        assert (np.abs(got - want) <= 2 * _gamma64(D) * scale).all()  # 2x: the longdouble reference rounds too
    big = np.full((2, 1 + 2**20), 2.0**-17, np.float32)
    big[:, 0] = 1.0
    assert (stats.gram_product(big) == 1 + 2.0**-14).all()


def _near_rank_one(T: int, d: int, r: int, noise: float, seed: int) -> np.ndarray:
    """Float32 steps ``(1 + 0.01 t) u + noise z_t``: one direction and a small isotropic rest, the low-rank case."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((d, r))
    return np.stack([(1 + 0.01 * t) * u + noise * rng.standard_normal((d, r)) for t in range(T)]).astype(np.float32)


def test_near_rank_one_trajectory_erank_is_exact(tmp_path):
    """The small eigenvalues of a near-rank-1 trajectory carry its erank (each ``sqrt(lambda)`` counts); a float32
    Gram moves them by up to ``2^-24 B trace`` and its erank by percents (1.11-1.14 for 1.23 in tests/test_rivals.py).
    Through ``analyze_run`` every trajectory erank must match numpy's float64 SVD of the stored float32 steps within
    what float64 rounding allows (:func:`_erank_rtol`, 1e-9 to 3e-7 here, a worst case)."""
    T = 40
    grads = [_near_rank_one(T, 64, 8, 0.01, seed=31), _near_rank_one(T, 96, 8, 0.003, seed=32)]
    names = ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj"]
    specs = [ModuleSpec.from_name(n, g.shape[1:]) for n, g in zip(names, grads, strict=True)]
    with RunWriter(tmp_path / "run", specs) as w:
        for t in range(T):
            w.add_step(t, [g[t] for g in grads], {"loss": 1.0})
    rs = analyze_run(tmp_path / "run", lags=1)
    for sc, mats in ((rs.scopes[0], grads[:1]), (rs.scopes[1], grads[1:]), (rs.adapter, grads)):
        v = np.concatenate([g.reshape(T, -1).astype(np.float64) for g in mats], axis=1)
        unit = v / np.linalg.norm(v, axis=1, keepdims=True)
        for key, m in (("erank_traj", v), ("erank_traj_unit", unit)):
            want, rtol = ref_erank(np.linalg.svd(m, compute_uv=False)), _erank_rtol(m)
            assert 1e-12 < rtol < 1e-5, rtol  # float64 rounding (a float32 Gram: delta 2^29 times larger)
            assert sc.row[key] == pytest.approx(want, rel=rtol), (sc.name, key, sc.row[key], want, rtol)
        assert sc.row["erank_traj"] < 1.6  # near rank 1 indeed


def test_rank_deficient_trajectory_through_the_gram():
    """A rank-2 float32 trajectory: the float64 Gram's eigenvalue floor (``10 T eps lambda_max``) drops its rounding
    noise, and what is left of it moves erank no more than float64 rounding allows (:func:`_erank_rtol`)."""
    rng = np.random.default_rng(22)
    T, D = 12, 4000
    x = (rng.standard_normal((T, 2)) @ rng.standard_normal((2, D))).astype(np.float32)
    got = stats.trajectory_stats(stats.gram_product(x))
    e, sr, k = ref_spectrum(x.astype(np.float64))
    assert got["erank_traj"] == pytest.approx(e, rel=_erank_rtol(x)) and got["energy90_traj"] == k
    assert got["stable_rank_traj"] == pytest.approx(sr, rel=1e-12)


def test_cosines_from_gram_equal_loops():
    rng = np.random.default_rng(2)
    T = 9
    x = rng.standard_normal((T, 30)) + 0.5
    x[3] = 0.0
    gram = x @ x.T
    series = stats.lag_cosines(gram, 10)
    for lag in range(1, 11):
        want = [ref_cos(x[t], x[t + lag]) for t in range(T - lag)]
        np.testing.assert_allclose(series[lag - 1], want, rtol=1e-12)
    means = stats.lag_cosine_means(gram, 10)
    assert means[0] == pytest.approx(nanmean([ref_cos(x[t], x[t + 1]) for t in range(T - 1)]))
    assert np.isnan(means[T - 1:]).all()  # no pair at lag >= T
    np.testing.assert_allclose(stats.cosine_to_mean(gram), [ref_cos(x[t], x.mean(0)) for t in range(T)], rtol=1e-12)


def test_step_spectrum_equals_per_matrix_svd():
    rng = np.random.default_rng(3)
    g = rng.standard_normal((5, 16, 4))
    g[1] = np.outer(rng.standard_normal(16), rng.standard_normal(4))  # rank 1
    g[2] = 0.0
    got = stats.step_spectrum_stats(g)
    for t in range(5):
        want = ref_spectrum(g[t])
        for j, key in enumerate(("erank", "stable_rank", "energy90")):
            assert got[key][t] == pytest.approx(want[j], rel=1e-9, nan_ok=True)
    assert got["erank"][1] == pytest.approx(1.0, abs=1e-9)


# --------------------------------------------------------------------------------------------------------------------
# The driver on synthetic runs with known answers


def test_identical_steps_give_cosine_one_and_erank_one(tmp_path):
    rng = np.random.default_rng(4)
    base = [rng.standard_normal(s.shape).astype(np.float32) for s in SPECS]
    rs = analyze_run(write(tmp_path / "run", list(range(8)), [base] * 8), lags=LAGS)
    for sc in rs.scopes:
        for lag in range(1, LAGS + 1):
            assert sc.row[f"cos_lag{lag}_mean"] == pytest.approx(1.0, abs=1e-9)
        assert sc.row["cos_to_mean_mean"] == pytest.approx(1.0, abs=1e-9)
        for key in ("erank_traj", "erank_traj_unit", "stable_rank_traj", "energy90_traj"):
            assert sc.row[key] == pytest.approx(1.0, abs=1e-9), (sc.name, key)
        assert sc.row["sign_stability_mean"] == pytest.approx(1.0)  # constant signs, no zeros
        assert sc.row["sign_stable_frac_0.8"] == 1.0
    assert rs.adapter.row["sign_null_mean"] == pytest.approx(stats.sign_null_mean(8))


def test_orthogonal_steps_give_cosine_zero_and_erank_T(tmp_path):
    T = 6
    spec = [ModuleSpec.from_name("model.layers.0.mlp.up_proj", (8, 2))]
    q, _ = np.linalg.qr(np.random.default_rng(5).standard_normal((16, T)))
    norms = np.array([1.0, 2.0, 3.0, 1.0, 2.0, 3.0])
    grads = [[(q[:, t] * norms[t]).reshape(8, 2).astype(np.float32)] for t in range(T)]
    rs = analyze_run(write(tmp_path / "run", list(range(T)), grads, specs=spec), lags=3)
    row = rs.adapter.row
    for lag in (1, 2, 3):
        assert abs(row[f"cos_lag{lag}_mean"]) < 1e-6
    assert row["erank_traj_unit"] == pytest.approx(T, rel=1e-6)
    p = norms / norms.sum()
    assert row["erank_traj"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-6)  # the norms alone
    assert row["erank_traj"] < T
    assert row["stable_rank_traj_unit"] == pytest.approx(T, rel=1e-6)


def test_random_signs_near_null_constant_signs_one(tmp_path):
    T = 16
    spec = [ModuleSpec.from_name("model.layers.0.mlp.down_proj", (256, 8))]
    rng = np.random.default_rng(6)
    noise = [[rng.standard_normal((256, 8)).astype(np.float32)] for _ in range(T)]
    row = analyze_run(write(tmp_path / "noise", list(range(T)), noise, specs=spec), lags=2).adapter.row
    assert row["sign_null_mean"] == pytest.approx(stats.sign_null_mean(T))
    assert abs(row["sign_stability_mean"] - row["sign_null_mean"]) < 0.01
    assert abs(row["sign_stable_frac_0.5"] - row["sign_null_frac_0.5"]) < 0.02
    pattern = np.sign(rng.standard_normal((256, 8)))
    const = [[(pattern * rng.uniform(0.1, 2, (256, 8))).astype(np.float32)] for _ in range(T)]
    row = analyze_run(write(tmp_path / "const", list(range(T)), const, specs=spec), lags=2).adapter.row
    assert row["sign_stability_mean"] == 1.0 and row["sign_stable_frac_0.8"] == 1.0


# One pass (everything fits the budget); a step pass and a Gram pass of three groups; panels of 3 steps for the
# large modules (4 bytes x 11 steps x 48 entries plus their 11 x 11 Gram exceed 0.0015 MB).
@pytest.mark.parametrize("memory_mb", [64, 0.005, 0.0015])
def test_every_scope_matches_reference(tmp_path, memory_mb):
    T = 11
    grads = random_grads(T)
    rs = analyze_run(write(tmp_path / "run", [2 * s + 1 for s in range(T)], grads), lags=LAGS, memory_mb=memory_mb)
    assert rs.steps == [2 * s + 1 for s in range(T)] and rs.excluded == [] and rs.regime == "sft" and rs.seed == 7
    assert {(sc.scope, sc.name) for sc in rs.scopes} == {
        *(("module", s.name) for s in SPECS), ("proj", "q"), ("proj", "down"), ("proj", "v"), ("layer", "0"),
        ("layer", "1"), ("adapter", "adapter")}
    for sc in rs.scopes:
        members = scope_members(sc.scope, sc.name)
        assert sc.modules == [SPECS[i].name for i in members]
        assert_row(sc.row, reference_row([stacked(grads, i) for i in members]))
        assert sc.window_row is None
        assert sc.hist.sum() == sum(SPECS[i].size for i in members)
    adapter = rs.adapter
    v = np.concatenate([stacked(grads, i).reshape(T, -1) for i in range(len(SPECS))], axis=1)
    np.testing.assert_allclose(adapter.series["cos_lag2"], [ref_cos(v[t], v[t + 2]) for t in range(T - 2)],
                               rtol=1e-10)
    np.testing.assert_allclose(adapter.series["grad_norm"], np.linalg.norm(v, axis=1), rtol=1e-10)


def test_a_run_within_the_budget_is_read_once(tmp_path, monkeypatch):
    """Within the memory budget the step pass also fills the Gram buffers: every shard is read exactly once. Over
    it, a Gram pass reads the modules that did not fit again, with the same statistics."""
    from gradlens.store import reader

    reads: list[str] = []
    read = reader.read_shard_tensors

    def counted(run_dir, shard, specs, indices, dtype):
        reads.append(shard.file)
        return read(run_dir, shard, specs, indices, dtype)

    monkeypatch.setattr(reader, "read_shard_tensors", counted)
    T = 9
    path = write(tmp_path / "run", list(range(T)), random_grads(T, seed=23))
    shards = [s["file"] for s in json.loads((path / "manifest.json").read_text())["shards"]]
    once = analyze_run(path, lags=LAGS, memory_mb=64)
    assert sorted(reads) == sorted(shards) and len(shards) == 3
    reads.clear()
    twice = analyze_run(path, lags=LAGS, memory_mb=0.005)
    assert len(reads) > len(shards)
    for a, b in zip(once.scopes, twice.scopes, strict=True):
        assert_row(a.row, b.row, rtol=1e-12)


def test_prefetch_reads_one_item_ahead_and_raises_the_readers_error():
    from gradlens.analysis.passes import prefetch

    produced: list[int] = []

    def items():
        for k in range(6):
            produced.append(k)
            yield k

    for k in prefetch(items()):
        time.sleep(0.02)  # time for the producer to run ahead, as far as it may
        assert len(produced) <= k + 2  # the item in use and at most one more: bounded memory
    assert produced == list(range(6))

    def failing():
        yield 1
        raise GradlensError("shards/shard-000001.safetensors: cannot read shard")

    with pytest.raises(GradlensError, match="cannot read shard"):
        list(prefetch(failing()))
    early = prefetch(iter(range(100)))
    assert next(early) == 0
    early.close()  # the consumer stops: so does the producer
    assert not [t for t in threading.enumerate() if t.name == "gradlens-prefetch"]


def test_the_analysis_needs_no_scipy(tmp_path):
    """The sign null comes from Pascal's rule, not scipy.stats (1-2 s of imports of every ``gradlens analyze``)."""
    path = write(tmp_path / "run", list(range(4)), random_grads(4, seed=24))
    code = f"import sys; from gradlens.analysis.driver import analyze_run; analyze_run({str(path)!r}); print(sorted(" \
           "m for m in sys.modules if m.split('.')[0] == 'scipy'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_window_equals_truncated_run(tmp_path):
    T, W = 10, 5
    grads = random_grads(T, seed=8)
    full = analyze_run(write(tmp_path / "full", list(range(T)), grads), lags=LAGS, window=W, memory_mb=0.003)
    short = analyze_run(write(tmp_path / "short", list(range(W)), grads[:W]), lags=LAGS)
    assert full.window == W
    for a, b in zip(full.scopes, short.scopes, strict=True):
        assert (a.scope, a.name) == (b.scope, b.name)
        assert_row(a.window_row, b.row, rtol=1e-10)
        assert a.row["steps"] == T
    # A window longer than the run is the whole run.
    longer = analyze_run(tmp_path / "short", lags=LAGS, window=50)
    assert longer.window == W and longer.adapter.window_row == longer.adapter.row


def test_nonfinite_steps_are_excluded_and_reported(tmp_path):
    T = 9
    grads = random_grads(T, seed=9)
    bad = [list(g) for g in grads]
    bad[2][1] = bad[2][1].copy()
    bad[2][1][0, 0] = np.nan
    bad[6][3] = bad[6][3].copy()
    bad[6][3][1, 1] = np.inf
    rs = analyze_run(write(tmp_path / "bad", list(range(T)), bad), lags=LAGS)
    keep = [t for t in range(T) if t not in (2, 6)]
    assert rs.excluded == [2, 6] and rs.steps == keep
    clean = [grads[t] for t in keep]
    for sc in rs.scopes:
        members = scope_members(sc.scope, sc.name)
        assert_row(sc.row, reference_row([stacked(clean, i) for i in members]))
        assert all(np.isfinite(v).all() for v in sc.series.values()), sc.name  # nothing non-finite leaks
    # A non-finite step the manifest does not flag is found while reading and excluded all the same.
    manifest = tmp_path / "bad" / "manifest.json"
    data = json.loads(manifest.read_text())
    for rec in data["steps"]:
        rec["nonfinite"] = False
    manifest.write_text(json.dumps(data))
    again = analyze_run(tmp_path / "bad", lags=LAGS, memory_mb=0.003)
    assert again.excluded == [2, 6]
    assert_row(again.adapter.row, rs.adapter.row, rtol=1e-12)


def test_bad_inputs_are_clear_errors(tmp_path):
    grads = random_grads(3, seed=10)
    with pytest.raises(GradlensError, match="0 usable recorded step"):
        analyze_run(write(tmp_path / "zero", [], []))
    with pytest.raises(GradlensError, match="1 usable recorded step"):
        analyze_run(write(tmp_path / "one", [0], grads[:1]))
    nan = [list(g) for g in grads[:2]]
    nan[1][0] = np.full(SPECS[0].shape, np.nan, np.float32)
    with pytest.raises(GradlensError, match=r"1 usable recorded step.*non-finite step\(s\) excluded: \[1\]"):
        analyze_run(write(tmp_path / "nan", [0, 1], nan))
    with pytest.raises(GradlensError, match="does not exist"):
        analyze_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GradlensError, match="not a gradlens run"):
        analyze_run(tmp_path / "empty")
    with pytest.raises(GradlensError, match="1 usable recorded step"):  # the same without raw shards
        analyze_run(write(tmp_path / "noraw", [0], grads[:1], save_raw=False))


def test_unclip_divides_each_step_by_its_clip_coef(tmp_path):
    T = 7
    grads = random_grads(T, seed=11)
    clip = [1.0, 0.5, 0.25, 1.0, 0.2, 1.0, 0.8]
    rs = analyze_run(write(tmp_path / "run", list(range(T)), grads, clip=clip), lags=LAGS, unclip=True)
    raw = [[g / c for g in step] for step, c in zip(grads, clip, strict=True)]
    assert_row(rs.adapter.row, reference_row([stacked(raw, i) for i in range(len(SPECS))]))
    clipped = analyze_run(tmp_path / "run", lags=LAGS).adapter.row
    assert clipped["erank_traj"] != pytest.approx(rs.adapter.row["erank_traj"], rel=1e-3)
    assert clipped["erank_traj_unit"] == pytest.approx(rs.adapter.row["erank_traj_unit"], rel=1e-9)

