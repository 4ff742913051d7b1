"""The out-of-core driver: every statistic of :mod:`gradlens.stats.core` for one run, read shard by shard.

Two passes over the shards, each with bounded memory whatever the run's size on disk:

1. The *step pass* reads every module of one shard at a time. Reading all of a step before using any of it finds
   the non-finite steps (flagged in the manifest or not) before they touch a statistic, so nothing is ever undone.
   It takes what needs one step at a time: per-entry counts of positive and negative signs (for the whole run and
   the leading window), the per-step spectra and which steps are exactly zero.
2. The *Gram pass* reads groups of modules: as many as fit the memory budget with all their usable steps (float64)
   plus their ``T x T`` Gram matrices. A module too large for the budget on its own is processed in panels of
   steps: pass ``a`` holds panel ``a`` and multiplies it with every later step as it streams past, which fills the
   Gram block by block (one extra read of that module per extra panel).

A module Gram is added into the whole-adapter, per-projection and per-layer Grams (sums of Grams: the Gram of the
concatenated vectors) and dropped once its statistics are taken, so peak memory is the budget plus those aggregate
``T x T`` matrices (or, in the step pass, one shard plus 8 bytes per B entry, 16 with a window).

A run recorded without raw shards is analysed from its accumulators instead (:mod:`.accumulated`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradlens.errors import GradlensError
from gradlens.stats import core
from gradlens.stats.accumulated import analyze_accumulators
from gradlens.stats.results import (
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


@dataclass
class _ModuleSteps:
    """One module's step-pass results over the usable steps: sign statistics (whole run, window) and spectra."""

    sign: SignAgg
    sign_w: SignAgg | None
    spectra: dict[str, np.ndarray]


class _StepSums:
    """The step pass: fed every module of one shard at a time (:meth:`add`), in step order."""

    def __init__(self, specs: Sequence[Any], candidates: Sequence[int], window: int | None) -> None:
        self.candidates = set(candidates)
        self.window = window
        self.usable: list[int] = []
        self.bad: list[int] = []
        self.zero: list[int] = []
        self.pos = [np.zeros(s.shape, np.int32) for s in specs]
        self.neg = [np.zeros(s.shape, np.int32) for s in specs]
        self.pos_w = [np.zeros(s.shape, np.int32) for s in specs] if window is not None else []
        self.neg_w = [np.zeros(s.shape, np.int32) for s in specs] if window is not None else []
        self.spectra: list[dict[str, list[np.ndarray]]] = [{k: [] for k in STEP_KEYS} for _ in specs]

    def add(self, steps: list[int], arrays: list[np.ndarray]) -> None:
        """One shard: ``arrays[i]`` is module i's float32 ``(len(steps), d_out, r)`` block."""
        rows = [k for k, s in enumerate(steps) if s in self.candidates]
        if not rows:
            return
        blocks = [a if len(rows) == len(steps) else a[rows] for a in arrays]
        finite = np.logical_and.reduce([np.isfinite(b).reshape(len(rows), -1).all(axis=1) for b in blocks])
        self.bad += [steps[rows[k]] for k in np.flatnonzero(~finite)]
        if not finite.any():
            return
        if not finite.all():
            blocks = [b[finite] for b in blocks]
        kept = [steps[rows[k]] for k in np.flatnonzero(finite)]
        in_window = None
        if self.window is not None:
            in_window = len(self.usable) + np.arange(len(kept)) < self.window
        self.usable += kept
        nonzero = np.zeros(len(kept), bool)
        for i, block in enumerate(blocks):
            self._add_module(i, block, in_window)
            nonzero |= (block.reshape(len(kept), -1) != 0).any(axis=1)
        self.zero += [s for s, nz in zip(kept, nonzero, strict=True) if not nz]

    def _add_module(self, i: int, block: np.ndarray, in_window: np.ndarray | None) -> None:
        positive, negative = block > 0, block < 0
        self.pos[i] += positive.sum(axis=0, dtype=np.int32)
        self.neg[i] += negative.sum(axis=0, dtype=np.int32)
        if in_window is not None and in_window.any():
            self.pos_w[i] += positive[in_window].sum(axis=0, dtype=np.int32)
            self.neg_w[i] += negative[in_window].sum(axis=0, dtype=np.int32)
        for key, values in core.step_spectrum_stats(block).items():
            self.spectra[i][key].append(values)

    def finish(self, window: int | None, bins: int) -> list[_ModuleSteps]:
        """Per module: sign statistics over the usable steps (and the first ``window``), spectra as arrays."""
        out = []
        for i in range(len(self.pos)):
            sign = SignAgg(len(self.usable), bins)
            sign.add(self.pos[i] - self.neg[i], self.pos[i] + self.neg[i])
            sign_w = None
            if window is not None:
                sign_w = SignAgg(window, bins)
                sign_w.add(self.pos_w[i] - self.neg_w[i], self.pos_w[i] + self.neg_w[i])
            spectra = {k: np.concatenate(v) if v else np.zeros(0) for k, v in self.spectra[i].items()}
            out.append(_ModuleSteps(sign, sign_w, spectra))
        return out


def _plan_groups(sizes: Sequence[int], steps: int, budget: int) -> list[tuple[list[int], int]]:
    """Pack modules (in order) into groups of ``(indices, panel_steps)`` that fit ``budget`` bytes.

    A module costs ``8 T D`` (its steps in float64) plus ``8 T^2`` (its Gram). One that alone exceeds the budget
    forms its own group with panels of as many steps as fit.
    """
    gram_bytes = 8 * steps * steps
    groups: list[tuple[list[int], int]] = []
    current: list[int] = []
    used = 0
    for i, size in enumerate(sizes):
        cost = 8 * steps * size + gram_bytes
        if current and (cost > budget or used + cost > budget):
            groups.append((current, steps))
            current, used = [], 0
        if cost > budget:
            avail = max(budget - gram_bytes, budget // 4)
            groups.append(([i], max(1, min(steps, avail // (8 * size)))))
            continue
        current.append(i)
        used += cost
    if current:
        groups.append((current, steps))
    return groups


def _fill_panel(run: Any, group: list[int], pos: dict[int, int], lo: int, hi: int,
                grams: dict[int, np.ndarray], bar: Any) -> None:
    """One read of the group's modules: rows ``lo:hi`` of their Grams, upper triangle (panel x panel and later)."""
    specs = run.specs
    buf = {i: np.empty((hi - lo, specs[i].size)) for i in group}
    for steps, arrays in run.iter_steps([specs[i].name for i in group]):
        if bar is not None:
            bar.update(1)
        rows = [k for k, s in enumerate(steps) if s in pos]
        if not rows:
            continue
        idx = np.array([pos[steps[k]] for k in rows])
        inside, after = (idx >= lo) & (idx < hi), idx >= hi
        for i, arr in zip(group, arrays, strict=True):
            flat = (arr if len(rows) == len(steps) else arr[rows]).reshape(len(rows), -1).astype(np.float64)
            buf[i][idx[inside] - lo] = flat[inside]
            if after.any():  # steps arrive in order, so the panel's rows are all in buf by now
                grams[i][lo:hi, idx[after]] = buf[i] @ flat[after].T
    for i in group:
        grams[i][lo:hi, lo:hi] = buf[i] @ buf[i].T


def _gram_pass(run: Any, usable: list[int], groups: list[tuple[list[int], int]], scale: np.ndarray | None,
               bar: Any) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(module index, its T x T Gram over the usable steps)`` for every module, in manifest order."""
    T = len(usable)
    pos = {s: i for i, s in enumerate(usable)}
    for group, panel in groups:
        grams = {i: np.zeros((T, T)) for i in group}
        for lo in range(0, T, panel):
            _fill_panel(run, group, pos, lo, min(T, lo + panel), grams, bar)
        for i in group:
            g = np.triu(grams.pop(i))
            g = g + np.triu(g, 1).T
            if scale is not None:
                g *= np.outer(scale, scale)
            yield i, g


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


def _scopes(run: Any, usable: list[int], steps: list[_ModuleSteps], grams: Iterator[tuple[int, np.ndarray]],
            lags: int, window: int | None) -> list[ScopeStats]:
    """Every module's scope as its Gram streams in, then the projection, layer and adapter scopes."""
    specs = run.specs
    T = len(usable)
    pooled = [(scope, name, members, np.zeros((T, T))) for scope, name, members in scope_members(specs)]
    holding = [[k for k, (_, _, members, _) in enumerate(pooled) if i in members] for i in range(len(specs))]
    modules: dict[int, ScopeStats] = {}
    for i, gram in grams:
        for k in holding[i]:
            pooled[k][3][...] += gram
        ms = steps[i]
        modules[i] = _gram_scope("module", specs[i].name, [specs[i].name], gram, ms.sign, ms.sign_w, ms.spectra,
                                 lags, window)
    out = [modules[i] for i in range(len(specs))]
    for scope, name, members, gram in pooled:
        sign = pooled_sign([steps[i].sign for i in members])
        sign_w = pooled_sign([steps[i].sign_w for i in members]) if window is not None else None
        with np.errstate(all="ignore"):
            step = {k: _nanmean_rows(np.stack([steps[i].spectra[k] for i in members])) for k in STEP_KEYS}
        out.append(_gram_scope(scope, name, [specs[i].name for i in members], gram, sign, sign_w, step, lags,
                               window))
    return out


def _progress(run: Any, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=len(run.meta["shards"]) - len(run.skipped), desc=f"analyze {Path(run.path).name}",
                unit="shard", leave=False)


def _analyze_raw(run: Any, *, lags: int, window: int | None, bins: int, budget: int, unclip: bool,
                 progress: bool) -> RunStats:
    flagged = {int(r["step"]) for r in run.step_records if r.get("nonfinite")}
    bar = _progress(run, progress)
    try:
        sums = _StepSums(run.specs, [s for s in run.steps if s not in flagged], window)
        for steps, arrays in run.iter_steps():
            sums.add(steps, arrays)
            if bar is not None:
                bar.update(1)
        usable = sums.usable
        bad = sorted((flagged & set(run.steps)) | set(sums.bad))
        check_usable(run.path, usable, bad)
        W = min(window, len(usable)) if window is not None else None
        steps, zero = sums.finish(W, bins), sums.zero
        del sums
        groups = _plan_groups([s.size for s in run.specs], len(usable), budget)
        if bar is not None:  # the Gram pass reads every shard once per panel of each group
            bar.total *= 1 + sum(math.ceil(len(usable) / panel) for _, panel in groups)
            bar.refresh()
        scale = unclip_scale(run.step_records, usable) if unclip else None
        scopes = _scopes(run, usable, steps, _gram_pass(run, usable, groups, scale, bar), lags, W)
    finally:
        if bar is not None:
            bar.close()
    return RunStats(path=Path(run.path), regime=run_regime(run.meta), seed=run.meta.get("seed"), steps=usable,
                    excluded=bad, lags=lags, window=W, bins=bins, scopes=scopes, specs=list(run.specs),
                    meta=run_meta(run.meta), skipped=list(run.skipped), zero_steps=zero)


def analyze_run(path: str | os.PathLike[str], *, lags: int = 10, window: int | None = None, bins: int = 20,
                memory_mb: float = 512, unclip: bool = False, progress: bool = False,
                skip_bad: bool = False) -> RunStats:
    """Compute every statistic of one run in two streaming passes over its shards (see the module docstring).

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
