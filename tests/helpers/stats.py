"""The independent reference of every statistic (dense SVD and explicit loops over the stacked ``T x D`` matrix) and
synthetic runs to check the analysis against it."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from gradlens.analysis.run_stats import stat_columns
from gradlens.store import ModuleSpec, RunWriter

LAGS = 4
NAMES_SHAPES = [("model.layers.0.self_attn.q_proj", (12, 4)), ("model.layers.0.mlp.down_proj", (9, 4)),
                ("model.layers.1.self_attn.q_proj", (12, 4)), ("model.layers.1.self_attn.v_proj", (5, 2))]
SPECS = [ModuleSpec.from_name(n, s) for n, s in NAMES_SHAPES]


def ref_erank(s: np.ndarray) -> float:
    s = s[s > 1e-9 * s.max()] if s.size and s.max() > 0 else np.zeros(0)
    if s.size == 0:
        return math.nan
    total = 0.0
    for v in s:
        p = v / s.sum()
        total -= p * math.log(p)
    return math.exp(total)


def ref_spectrum(m: np.ndarray) -> tuple[float, float, float]:
    """(erank, stable rank, 90%-energy count) of a dense matrix by numpy's SVD."""
    s = np.linalg.svd(m, compute_uv=False)
    if s.max() == 0:
        return math.nan, math.nan, math.nan
    energy = s**2
    k, acc = 0, 0.0
    while acc < 0.9 * energy.sum() * (1 - 1e-12):
        acc += energy[k]
        k += 1
    return ref_erank(s), float(energy.sum() / energy.max()), float(k)


def ref_cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = math.sqrt(float(a @ a)), math.sqrt(float(b @ b))
    return math.nan if na == 0 or nb == 0 else float(a @ b) / (na * nb)


def nanmean(values) -> float:
    values = [v for v in np.ravel(values) if np.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def ref_null(n: int, thr: float | None = None) -> float:
    """E|S_n|/n (``thr`` None) or P(|S_n|/n > thr) for n random signs, by summing the binomial terms."""
    terms = [(math.comb(n, k) / 2**n, abs(2 * k - n) / n) for k in range(n + 1)]
    return sum(p * x for p, x in terms) if thr is None else sum(p for p, x in terms if x > thr)


def reference_sign_row(grads: list[np.ndarray]) -> dict[str, float]:
    """Sign statistics of the concatenated entries: each entry over its own steps with a non-zero gradient."""
    sums = np.concatenate([np.sign(g.astype(np.float64)).sum(axis=0).ravel() for g in grads])
    counts = np.concatenate([(g != 0).sum(axis=0).ravel() for g in grads])
    live = counts > 0
    stab = np.abs(sums[live]) / counts[live]
    row = {"sign_entries": int(live.sum()), "sign_stability_mean": float(stab.mean()) if stab.size else math.nan}
    for thr in (0.5, 0.8):
        row[f"sign_stable_frac_{thr}"] = float((stab > thr).mean()) if stab.size else math.nan
    per_n = {int(n): int((counts[live] == n).sum()) for n in np.unique(counts[live])}
    null = {thr: sum(c * ref_null(n, thr) for n, c in per_n.items()) / max(live.sum(), 1) for thr in (None, 0.5, 0.8)}
    row["sign_null_mean"] = null[None] if stab.size else math.nan
    for thr in (0.5, 0.8):
        row[f"sign_null_frac_{thr}"] = null[thr] if stab.size else math.nan
    return row


def reference_row(grads: list[np.ndarray], lags: int = LAGS) -> dict[str, float]:
    """All statistics of the concatenation of ``grads`` (a list of float ``(T, d_out, r)`` arrays, one per module)."""
    T = len(grads[0])
    v = np.concatenate([g.reshape(T, -1).astype(np.float64) for g in grads], axis=1)
    row: dict[str, float] = {"steps": T, "nonzero_steps": int((np.abs(v).sum(axis=1) > 0).sum())}
    for lag in range(1, lags + 1):
        row[f"cos_lag{lag}_mean"] = nanmean([ref_cos(v[t], v[t + lag]) for t in range(T - lag)])
    mean = v.mean(axis=0)
    row["cos_to_mean_mean"] = nanmean([ref_cos(v[t], mean) for t in range(T)])
    norms = np.linalg.norm(v, axis=1)
    unit = v[norms > 0] / norms[norms > 0, None]
    for suffix, m in (("", v), ("_unit", unit)):
        e, sr, k = ref_spectrum(m)
        row[f"erank_traj{suffix}"], row[f"stable_rank_traj{suffix}"], row[f"energy90_traj{suffix}"] = e, sr, k
    per_step = np.array([[ref_spectrum(g[t].astype(np.float64)) for t in range(T)] for g in grads])  # (M, T, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        step_means = np.nanmean(per_step, axis=0)  # mean over modules, per step
    for j, key in enumerate(("erank", "stable_rank", "energy90")):
        row[f"{key}_step_mean"] = nanmean(step_means[:, j])
    row.update(reference_sign_row(grads))
    return row


def assert_row(actual: dict[str, float], expected: dict[str, float], rtol: float = 1e-8, atol: float = 1e-10) -> None:
    assert list(actual) == stat_columns(len([k for k in expected if k.startswith("cos_lag")]))
    assert set(expected) == set(actual)
    for key, want in expected.items():
        got = actual[key]
        if isinstance(want, float) and math.isnan(want):
            assert math.isnan(got), (key, got)
        else:
            assert got == pytest.approx(want, rel=rtol, abs=atol), (key, got, want)


def write(path: Path, steps: list[int], grads: list[list[np.ndarray]], specs=SPECS, clip=None, regime="sft",
          **kw) -> Path:
    """Write ``grads[t]`` (one array per module) at ``steps[t]`` with RunWriter (``clip[t]``: its clip_coef)."""
    kw.setdefault("steps_per_shard", 3)
    clip = clip if clip is not None else [1.0] * len(steps)
    with RunWriter(path, specs, config={"record": {"regime": regime}}, seed=7, **kw) as w:
        for step, g, c in zip(steps, grads, clip, strict=True):
            w.add_step(step, g, {"loss": 0.0, "clip_coef": c})
    return path


def random_grads(T: int, specs=SPECS, seed: int = 0) -> list[list[np.ndarray]]:
    """Random gradients with a shared drift (so cosines are neither 0 nor 1), varying norms and some exact zeros."""
    rng = np.random.default_rng(seed)
    drift = [rng.standard_normal(s.shape) for s in specs]
    out = []
    for t in range(T):
        step = []
        for s, d in zip(specs, drift, strict=True):
            g = (0.7 * d + rng.standard_normal(s.shape)) * (1 + t % 3)
            g[rng.random(s.shape) < 0.1] = 0.0
            step.append(g.astype(np.float32))
        out.append(step)
    return out


def stacked(grads: list[list[np.ndarray]], i: int) -> np.ndarray:
    return np.stack([g[i] for g in grads]).astype(np.float64)


def scope_members(scope: str, name: str) -> list[int]:
    if scope == "module":
        return [i for i, s in enumerate(SPECS) if s.name == name]
    if scope == "proj":
        return [i for i, s in enumerate(SPECS) if s.proj == name]
    if scope == "layer":
        return [i for i, s in enumerate(SPECS) if str(s.layer) == name]
    return list(range(len(SPECS)))
