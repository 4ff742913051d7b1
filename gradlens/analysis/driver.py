"""The out-of-core driver: every statistic of :mod:`gradlens.stats.core` for one run, read shard by shard.

One pass over the shards when the run fits the memory budget, else a step pass and a Gram pass (:mod:`.passes`).
A module Gram is added into the whole-adapter, per-projection and per-layer Grams (sums of Grams: the Gram of the
concatenated vectors) and dropped once its statistics are taken, so peak memory is the budget, two shards, 4 bytes
per B entry (8 with a window) for the sign counts and those aggregate ``T x T`` matrices. Grams are float64
(:func:`gradlens.stats.core.gram_product`: float32 steps cast a cache-sized block at a time), so every statistic
taken from one is exact to float64 rounding, the small eigenvalues of a near-low-rank trajectory included.

A run recorded without raw shards is analysed from its accumulators instead (:mod:`.accumulated`).
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from gradlens.analysis.accumulated import analyze_accumulators
from gradlens.analysis.passes import (
    Mapper,
    ModuleSteps,
    StepSums,
    buffers,
    gram_pass,
    one_blas_thread,
    plan_groups,
    prefetch,
    read_ahead,
)
from gradlens.analysis.run_stats import (
    STEP_KEYS,
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

Submit = Callable[..., Future]  # ThreadPoolExecutor.submit
IN_FLIGHT = 8  # module scopes computed at once, each holding its T x T Gram


def _gram_row(gram: np.ndarray, sign: SignAgg, step: dict[str, np.ndarray], lags: int) -> dict[str, float]:
    row: dict[str, float] = {"steps": len(gram), "nonzero_steps": int((core.gram_norms(gram) > 0).sum())}
    for lag, mean in enumerate(core.lag_cosine_means(gram, lags), start=1):
        row[f"cos_lag{lag}_mean"] = float(mean)
    row["cos_to_mean_mean"] = core.nanmean(core.cosine_to_mean(gram))
    row.update(core.trajectory_stats(gram))
    for key in STEP_KEYS:
        row[f"{key}_step_mean"] = core.nanmean(step[key][: len(gram)])
    row.update(sign.row())
    return {k: row[k] for k in stat_columns(lags)}


def _gram_scope(scope: str, name: str, modules: list[str], gram: np.ndarray, sign: SignAgg, sign_w: SignAgg | None,
                step: dict[str, np.ndarray], lags: int, window: int | None) -> ScopeStats:
    series = {f"cos_lag{lag}": s for lag, s in enumerate(core.lag_cosines(gram, lags), start=1)}
    series["cos_to_mean"] = core.cosine_to_mean(gram)
    series["grad_norm"] = core.gram_norms(gram)
    series.update({f"{k}_step": step[k] for k in STEP_KEYS})
    window_row = None
    if window is not None and sign_w is not None:
        window_row = _gram_row(gram[:window, :window], sign_w, step, lags)
    return ScopeStats(scope=scope, name=name, modules=modules, row=_gram_row(gram, sign, step, lags),
                      window_row=window_row, series=series, hist=sign.hist, null_hist=sign.null()[2])


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    """Column means over the finite entries of each column (NaN where a column has none)."""
    finite = np.isfinite(x)
    n = finite.sum(axis=0)
    total = np.where(finite, x, 0.0).sum(axis=0)
    return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def _scopes(specs: Sequence[Any], T: int, steps: list[ModuleSteps], grams: Iterator[tuple[int, np.ndarray]],
            scale: np.ndarray | None, lags: int, window: int | None, submit: Submit) -> list[ScopeStats]:
    """Every module's scope as its Gram streams in, then the projection, layer and adapter scopes.

    Each scope's statistics (two ``T x T`` eigendecompositions: 35 ms at T=400, most of the analysis there) run on
    the workers (``submit``), at most :data:`IN_FLIGHT` module scopes at a time so that their Grams stay few.
    """
    pooled = [(scope, name, members, np.zeros((T, T))) for scope, name, members in scope_members(specs)]
    holding = [[k for k, (_, _, members, _) in enumerate(pooled) if i in members] for i in range(len(specs))]
    modules: dict[int, ScopeStats] = {}
    pending: deque[tuple[int, Future[ScopeStats]]] = deque()
    for i, gram in grams:
        if scale is not None:
            gram *= np.outer(scale, scale)
        for k in holding[i]:
            pooled[k][3][...] += gram
        ms = steps[i]
        pending.append((i, submit(_gram_scope, "module", specs[i].name, [specs[i].name], gram, ms.sign, ms.sign_w,
                                  ms.spectra, lags, window)))
        while len(pending) > IN_FLIGHT:
            j, done = pending.popleft()
            modules[j] = done.result()
    modules.update((j, done.result()) for j, done in pending)
    rest = []
    for scope, name, members, gram in pooled:
        sign = pooled_sign([steps[i].sign for i in members])
        sign_w = pooled_sign([steps[i].sign_w for i in members]) if window is not None else None
        with np.errstate(all="ignore"):
            step = {k: _nanmean_rows(np.stack([steps[i].spectra[k] for i in members])) for k in STEP_KEYS}
        rest.append(submit(_gram_scope, scope, name, [specs[i].name for i in members], gram, sign, sign_w, step,
                           lags, window))
    return [modules[i] for i in range(len(specs))] + [done.result() for done in rest]


def _progress(run: Any, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=len(run.meta["shards"]) - len(run.skipped), desc=f"analyze {Path(run.path).name}",
                unit="shard", leave=False)


def _all_grams(run: Any, usable: list[int], fused: dict[int, np.ndarray], budget: int, bar: Any,
               parallel: Mapper) -> Iterator[tuple[int, np.ndarray]]:
    """The Grams of a run read once (``fused``: every module's steps from the step pass), else of a Gram pass."""
    rest = [i for i in range(len(run.specs)) if i not in fused]
    groups = [([rest[k] for k in group], panel)
              for group, panel in plan_groups([run.specs[i].size for i in rest], len(usable), budget)]
    if bar is not None:  # the Gram pass reads every shard once per panel of each group
        bar.total += bar.total * sum(math.ceil(len(usable) / panel) for _, panel in groups)
        bar.refresh()
    yield from zip(fused, parallel(core.gram_product, [buf[:len(usable)] for buf in fused.values()]), strict=True)
    fused.clear()
    yield from gram_pass(run, {s: k for k, s in enumerate(usable)}, groups, bar, parallel)


def _workers() -> int:
    """Threads for the per-module work (numpy and BLAS release the GIL): one per usable CPU, at most 8."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return max(1, min(8, len(cpus)))


def _fused(sizes: list[int], steps: int, budget: int) -> dict[int, np.ndarray]:
    """Float32 ``(steps, size)`` buffers of every module when the whole run fits the budget (the step pass fills
    them: one read of the shards), else none: a Gram pass then reads the shards' pages without copying them whole,
    which costs less than copying the part that would fit (and touching that much fresh memory)."""
    groups = plan_groups(sizes, steps, budget)
    if len(groups) != 1 or groups[0][1] < steps:
        return {}
    return dict(enumerate(buffers(np.empty(steps * sum(sizes), np.float32), sizes, steps)))


def _analyze_raw(run: Any, *, lags: int, window: int | None, bins: int, budget: int, unclip: bool,
                 progress: bool) -> RunStats:
    flagged = {int(r["step"]) for r in run.step_records if r.get("nonfinite")}
    candidates = [s for s in run.steps if s not in flagged]
    fused = _fused([s.size for s in run.specs], len(candidates), budget)
    bar = _progress(run, progress)
    with one_blas_thread(), ThreadPoolExecutor(_workers(), thread_name_prefix="gradlens-analyze") as pool:
        try:
            sums = StepSums(run.specs, candidates, window, fused, pool.map)
            for steps, arrays in prefetch(read_ahead(run.iter_steps())):
                sums.add(steps, arrays)
                if bar is not None:
                    bar.update(1)
            usable = sums.usable
            bad = sorted((flagged & set(run.steps)) | set(sums.bad))
            check_usable(run.path, usable, bad)
            W = min(window, len(usable)) if window is not None else None
            steps, zero = sums.finish(W, bins), sums.zero
            del sums
            scale = unclip_scale(run.step_records, usable) if unclip else None
            grams = _all_grams(run, usable, fused, budget, bar, pool.map)
            scopes = _scopes(run.specs, len(usable), steps, grams, scale, lags, W, pool.submit)
        finally:
            if bar is not None:
                bar.close()
    return RunStats(path=Path(run.path), regime=run_regime(run.meta), seed=run.meta.get("seed"), steps=usable,
                    excluded=bad, lags=lags, window=W, bins=bins, scopes=scopes, specs=list(run.specs),
                    meta=run_meta(run.meta), skipped=list(run.skipped), zero_steps=zero)


def analyze_run(path: str | os.PathLike[str], *, lags: int = 10, window: int | None = None, bins: int = 20,
                memory_mb: float = 512, unclip: bool = False, progress: bool = False,
                skip_bad: bool = False) -> RunStats:
    """Compute every statistic of one run in one or two streaming passes over its shards (see the module docstring).

    Steps flagged non-finite in the manifest, or found to hold NaN/Inf while reading, are excluded and listed in
    ``RunStats.excluded``; steps whose whole-adapter gradient is exactly zero are listed in ``RunStats.zero_steps``.
    ``window``: also take every statistic over the first ``window`` usable steps. ``unclip``: divide each stored
    (clipped) step by its ``clip_coef`` first, i.e. analyse the pre-clip gradient. ``skip_bad``: leave out the steps
    of missing or corrupt shards (listed in ``RunStats.skipped``) instead of failing. A run without raw shards
    (``save_raw=False``) gets what its accumulators allow (:func:`.accumulated.analyze_accumulators`).
    Raises :class:`GradlensError` for a path that is not a run or one with fewer than 2 usable steps.
    """
    from gradlens.store import open_run

    run = open_run(path, skip_bad=skip_bad)
    if any(b <= a for a, b in zip(run.steps, run.steps[1:], strict=False)):
        raise GradlensError(f"{run.path}: recorded steps are not increasing")
    if not run.meta.get("save_raw", True):
        return analyze_accumulators(run, lags=lags, window=window, bins=bins, unclip=unclip)
    return _analyze_raw(run, lags=lags, window=window, bins=bins, budget=int(memory_mb * 2**20), unclip=unclip,
                        progress=progress)
