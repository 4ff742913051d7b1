"""Statistics of a run recorded without raw shards (``save_raw=False``, e.g. by ``gradlens probe``), from its float64
accumulators alone.

The accumulators hold, per module, the per-entry sums of signs and counts of non-zero steps, the squared norm of
each accumulated step and its dot product with the previous one. That gives exactly, per module and pooled over
modules (sums of squared norms and of dot products are those of the concatenated vectors): sign stability and its
null, the non-zero step counts, the gradient norms and the lag-1 cosine. Everything that needs the gradients
themselves (:data:`RAW_ONLY`) is NaN, and ``RunStats.unavailable`` / ``window_unavailable`` list those columns.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradlens.analysis.run_stats import (
    ACC_SOURCE,
    SIGN_KEYS,
    STEP_KEYS,
    TRAJ_KEYS,
    RunStats,
    ScopeStats,
    SignAgg,
    check_usable,
    pooled_sign,
    run_meta,
    run_regime,
    scope_members,
    stat_columns,
    unclip_scale,
)
from gradlens.errors import GradlensError
from gradlens.stats import core

RAW_ONLY = "trajectory erank, lag>1 cosines, cosine to mean and per-step spectra"


def raw_only_columns(lags: int) -> list[str]:
    """The statistic columns that need the raw gradients (NaN for a run analysed from its accumulators)."""
    return [*(f"cos_lag{lag}_mean" for lag in range(2, lags + 1)), "cos_to_mean_mean", *TRAJ_KEYS,
            *(f"{k}_step_mean" for k in STEP_KEYS)]


def lag1_cosines(sqnorm: np.ndarray, dot_prev: np.ndarray) -> np.ndarray:
    """``cos(g_t, g_{t+1}) = dot_prev[t+1] / sqrt(sqnorm[t] sqnorm[t+1])`` for t = 0..T-2 (NaN at a zero step)."""
    denom = np.sqrt(sqnorm[:-1] * sqnorm[1:])
    with np.errstate(divide="ignore", invalid="ignore"):
        c = dot_prev[1:] / denom
    return np.clip(np.where(denom > 0, c, np.nan), -1.0, 1.0)


def _row(sqnorm: np.ndarray, dot_prev: np.ndarray, sign: SignAgg | None, lags: int) -> dict[str, float]:
    row: dict[str, float] = dict.fromkeys(stat_columns(lags), math.nan)
    row["steps"] = len(sqnorm)
    row["nonzero_steps"] = int((sqnorm > 0).sum())
    row["cos_lag1_mean"] = core.nanmean(lag1_cosines(sqnorm, dot_prev))
    if sign is not None:
        row.update(sign.row())
    return row


def _scope(scope: str, name: str, modules: list[str], sqnorm: np.ndarray, dot_prev: np.ndarray, sign: SignAgg,
           lags: int, window: int | None) -> ScopeStats:
    window_row = None if window is None else _row(sqnorm[:window], dot_prev[:window], None, lags)
    return ScopeStats(scope=scope, name=name, modules=modules, row=_row(sqnorm, dot_prev, sign, lags),
                      window_row=window_row,
                      series={"cos_lag1": lag1_cosines(sqnorm, dot_prev), "grad_norm": np.sqrt(sqnorm)},
                      hist=sign.hist, null_hist=sign.null()[2])


def _usable_steps(run: Any, acc: Any) -> tuple[list[int], list[int]]:
    """(usable steps, non-finite steps): the accumulators cover exactly the manifest's finite steps."""
    bad = sorted(int(r["step"]) for r in run.step_records if r.get("nonfinite"))
    usable = [int(s) for s in acc.steps]
    expected = [s for s in run.steps if s not in set(bad)]
    if usable != expected:
        raise GradlensError(f"{acc.path}: accumulators cover {len(usable)} step(s), but the manifest lists "
                            f"{len(expected)} finite step(s); the run is inconsistent")
    return usable, bad


def analyze_accumulators(run: Any, *, lags: int, window: int | None, bins: int, unclip: bool) -> RunStats:
    """Every statistic the accumulators of an opened run allow (the module docstring says which)."""
    acc = run.accumulators()
    usable, bad = _usable_steps(run, acc)
    check_usable(run.path, usable, bad)
    T = len(usable)
    W = min(window, T) if window is not None else None
    scale = unclip_scale(run.step_records, usable) if unclip else np.ones(T)
    sq, dot, signs = [], [], []
    for spec in run.specs:
        m = acc[spec.name]
        sq.append(np.asarray(m.sqnorm, np.float64) * scale**2)
        dot.append(np.asarray(m.dot_prev, np.float64) * scale * np.r_[math.nan, scale[:-1]])
        sign = SignAgg(T, bins)
        sign.add(m.sumsign, m.nonzero)
        signs.append(sign)
    scopes = [_scope("module", s.name, [s.name], sq[i], dot[i], signs[i], lags, W) for i, s in enumerate(run.specs)]
    for scope, name, members in scope_members(run.specs):
        scopes.append(_scope(scope, name, [run.specs[i].name for i in members], sum(sq[i] for i in members),
                             sum(dot[i] for i in members), pooled_sign([signs[i] for i in members]), lags, W))
    total = sum(sq)
    unavailable = raw_only_columns(lags)
    return RunStats(path=run.path, regime=run_regime(run.meta), seed=run.meta.get("seed"), steps=usable,
                    excluded=bad, lags=lags, window=W, bins=bins, scopes=scopes, specs=list(run.specs),
                    meta=run_meta(run.meta), zero_steps=[s for s, q in zip(usable, total, strict=True) if q == 0],
                    source=ACC_SOURCE, unavailable=unavailable,
                    window_unavailable=[*unavailable, *SIGN_KEYS] if W is not None else [])
