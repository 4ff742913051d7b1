"""The out-of-core driver: every statistic of :mod:`gradlens.stats.core` for one run, read shard by shard.

One pass over the shards when the run fits the memory budget, else one plus a Gram pass over what did not fit:

1. The *step pass* reads every module of one shard at a time. Reading all of a step before using any of it finds
   the non-finite steps (flagged in the manifest or not) before they touch a statistic, so nothing is ever undone.
   It takes what needs one step at a time (per-entry counts of positive and negative signs for the whole run and
   the leading window, the per-step spectra, which steps are exactly zero), and it copies the usable steps of the
   first group of modules that fits the budget into a float32 buffer: their Grams need no second read.
2. The *Gram pass* reads the other modules in groups: as many as fit the budget with all their usable steps
   (float32) plus their ``T x T`` Gram matrices. A module too large for the budget on its own is processed in
   panels of steps: pass ``a`` holds panel ``a`` and multiplies it with every later step as it streams past, which
   fills the Gram block by block (one extra read of that module per extra panel).

Shards are read on a thread one shard ahead of the computation (:func:`_prefetch`). Grams are float32 products
accumulated in float64 (:func:`.core.gram_product`; error bound :func:`.core.gram_error_bound`). A module Gram is
added into the whole-adapter, per-projection and per-layer Grams (sums of Grams: the Gram of the concatenated
vectors) and dropped once its statistics are taken, so peak memory is the budget, two shards, 4 bytes per B entry
(8 with a window) for the sign counts and those aggregate ``T x T`` matrices.

A run recorded without raw shards is analysed from its accumulators instead (:mod:`.accumulated`).
"""

from __future__ import annotations

import math
import os
import queue
import threading
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

PAGE = 4096
_DONE = object()


class _Raised:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _prefetch(items: Iterator[Any], ahead: int = 1) -> Iterator[Any]:
    """Yield ``items``, produced on a thread at most ``ahead`` items beyond the one in use (bounded memory).

    An error of the producer is raised here; closing the generator stops the producer after its current item.
    """
    slots, out, stop = threading.Semaphore(ahead), queue.SimpleQueue(), threading.Event()

    def produce() -> None:
        try:
            while slots.acquire() and not stop.is_set():
                item = next(items, _DONE)
                out.put(item)
                if item is _DONE:
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            out.put(_Raised(e))

    thread = threading.Thread(target=produce, name="gradlens-prefetch", daemon=True)
    thread.start()
    try:
        while (item := out.get()) is not _DONE:
            if isinstance(item, _Raised):
                raise item.error
            slots.release()
            yield item
    finally:
        stop.set()
        slots.release()
        thread.join()


def _read_ahead(chunks: Iterator[tuple[list[int], list[np.ndarray]]], tag: Any = None) -> Iterator[Any]:
    """Fault in every page of each array on the calling (prefetch) thread: the reader's float32 arrays may be lazy
    views of the shard file, whose first touch is the actual read."""
    for steps, arrays in chunks:
        for a in arrays:
            flat = a.reshape(-1).view(np.uint8)
            if flat.size:
                flat[::PAGE].max()
        yield (steps, arrays) if tag is None else (tag, steps, arrays)


@dataclass
class _ModuleSteps:
    """One module's step-pass results over the usable steps: sign statistics (whole run, window) and spectra."""

    sign: SignAgg
    sign_w: SignAgg | None
    spectra: dict[str, np.ndarray]


def _count_signs(pos: np.ndarray, neg: np.ndarray, block: np.ndarray) -> None:
    """Add the per-entry counts of positive and negative values over the steps of ``block`` (at most 255 at a time,
    summed in uint8: a quarter of the memory traffic of int32 sums)."""
    for lo in range(0, len(block), 255):
        part = block[lo:lo + 255]
        np.add(pos, np.add.reduce((part > 0).view(np.uint8), axis=0, dtype=np.uint8), out=pos)
        np.add(neg, np.add.reduce((part < 0).view(np.uint8), axis=0, dtype=np.uint8), out=neg)


class _StepSums:
    """The step pass: fed every module of one shard at a time (:meth:`add`), in step order.

    ``fused``: module index -> float32 ``(candidate steps, size)`` buffer receiving that module's usable steps.
    """

    def __init__(self, specs: Sequence[Any], candidates: Sequence[int], window: int | None,
                 fused: dict[int, np.ndarray]) -> None:
        self.candidates = set(candidates)
        self.window = window
        self.fused = fused
        self.usable: list[int] = []
        self.bad: list[int] = []
        self.zero: list[int] = []
        dtype = np.uint16 if len(candidates) < 2**16 else np.uint32
        self.pos = [np.zeros(s.shape, dtype) for s in specs]
        self.neg = [np.zeros(s.shape, dtype) for s in specs]
        self.pos_w = [np.zeros(s.shape, dtype) for s in specs] if window is not None else []
        self.neg_w = [np.zeros(s.shape, dtype) for s in specs] if window is not None else []
        self.spectra: list[dict[str, list[np.ndarray]]] = [{k: [] for k in STEP_KEYS} for _ in specs]

    def add(self, steps: list[int], arrays: list[np.ndarray]) -> None:
        """One shard: ``arrays[i]`` is module i's float32 ``(len(steps), d_out, r)`` block."""
        rows = [k for k, s in enumerate(steps) if s in self.candidates]
        if not rows:
            return
        blocks = [a if len(rows) == len(steps) else a[rows] for a in arrays]
        grams = [core.step_grams(b) for b in blocks]
        norms = np.stack([np.trace(g, axis1=1, axis2=2) for g in grams])  # (modules, rows): ||G_t||^2
        finite = np.isfinite(norms).all(axis=0)
        self.bad += [steps[rows[k]] for k in np.flatnonzero(~finite)]
        if not finite.any():
            return
        kept = [steps[rows[k]] for k in np.flatnonzero(finite)]
        start = len(self.usable)
        in_window = None
        if self.window is not None:
            in_window = start + np.arange(len(kept)) < self.window
        self.usable += kept
        for i, (block, gram) in enumerate(zip(blocks, grams, strict=True)):
            if not finite.all():
                block, gram = block[finite], gram[finite]
            self._add_module(i, block, gram, in_window)
            if i in self.fused:
                self.fused[i][start:start + len(kept)] = block.reshape(len(kept), -1)
        nonzero = (norms[:, finite] > 0).any(axis=0)
        self.zero += [s for s, nz in zip(kept, nonzero, strict=True) if not nz]

    def _add_module(self, i: int, block: np.ndarray, gram: np.ndarray, in_window: np.ndarray | None) -> None:
        _count_signs(self.pos[i], self.neg[i], block)
        if in_window is not None and in_window.any():
            _count_signs(self.pos_w[i], self.neg_w[i], block[in_window])
        for key, values in core.step_spectrum_stats(block, gram).items():
            self.spectra[i][key].append(values)

    def finish(self, window: int | None, bins: int) -> list[_ModuleSteps]:
        """Per module: sign statistics over the usable steps (and the first ``window``), spectra as arrays."""
        out = []
        for i in range(len(self.pos)):
            pos, neg = self.pos[i].astype(np.int32), self.neg[i].astype(np.int32)
            sign = SignAgg(len(self.usable), bins)
            sign.add(pos - neg, pos + neg)
            sign_w = None
            if window is not None:
                pos, neg = self.pos_w[i].astype(np.int32), self.neg_w[i].astype(np.int32)
                sign_w = SignAgg(window, bins)
                sign_w.add(pos - neg, pos + neg)
            spectra = {k: np.concatenate(v) if v else np.zeros(0) for k, v in self.spectra[i].items()}
            out.append(_ModuleSteps(sign, sign_w, spectra))
        return out


def _plan_groups(sizes: Sequence[int], steps: int, budget: int) -> list[tuple[list[int], int]]:
    """Pack modules (positions in ``sizes``, in order) into groups of ``(positions, panel_steps)`` within ``budget``.

    A module costs ``4 T D`` (its steps in float32) plus ``8 T^2`` (its Gram). One that alone exceeds the budget
    forms its own group with panels of as many steps as fit.
    """
    gram_bytes = 8 * steps * steps
    groups: list[tuple[list[int], int]] = []
    current: list[int] = []
    used = 0
    for i, size in enumerate(sizes):
        cost = 4 * steps * size + gram_bytes
        if current and (cost > budget or used + cost > budget):
            groups.append((current, steps))
            current, used = [], 0
        if cost > budget:
            avail = max(budget - gram_bytes, budget // 4)
            groups.append(([i], max(1, min(steps, avail // (4 * size)))))
            continue
        current.append(i)
        used += cost
    if current:
        groups.append((current, steps))
    return groups


def _buffers(arena: np.ndarray, sizes: Sequence[int], rows: int) -> list[np.ndarray]:
    """Views ``(rows, size)`` of the one float32 allocation that every group reuses (no fresh pages per group)."""
    out, offset = [], 0
    for size in sizes:
        out.append(arena[offset:offset + rows * size].reshape(rows, size))
        offset += rows * size
    return out


def _gram_pass(run: Any, pos: dict[int, int], groups: list[tuple[list[int], int]], arena: np.ndarray,
               bar: Any) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(module index, its T x T Gram over the usable steps)`` for every module of ``groups``.

    Every group reads its modules from every shard once per panel of ``panel`` steps, one shard ahead on a thread.
    """
    T, specs = len(pos), run.specs
    passes = [(g, lo, min(T, lo + panel)) for g, (_, panel) in enumerate(groups) for lo in range(0, T, panel)]
    chunks = _prefetch(item for k, (g, _, _) in enumerate(passes)
                       for item in _read_ahead(run.iter_steps([specs[i].name for i in groups[g][0]]), k))
    grams: dict[int, np.ndarray] = {}
    current, buf = -1, []
    for k, steps, arrays in chunks:
        if k != current:
            if current >= 0:
                yield from _close_panel(groups, passes[current], buf, grams, T)
            current, (g, lo, hi) = k, passes[k]
            buf = _buffers(arena, [specs[i].size for i in groups[g][0]], hi - lo)
            if lo == 0:
                grams.update({i: np.zeros((T, T)) for i in groups[g][0]})
        if bar is not None:
            bar.update(1)
        _fill_panel(steps, arrays, pos, lo, hi, buf, [grams[i] for i in groups[g][0]])
    if current >= 0:
        yield from _close_panel(groups, passes[current], buf, grams, T)


def _fill_panel(steps: list[int], arrays: list[np.ndarray], pos: dict[int, int], lo: int, hi: int,
                buf: list[np.ndarray], grams: list[np.ndarray]) -> None:
    """One shard of a panel pass: copy the steps of rows ``lo:hi`` into ``buf`` and multiply later steps with them."""
    rows = [k for k, s in enumerate(steps) if pos.get(s, -1) >= lo]
    if not rows:
        return
    idx = np.array([pos[steps[k]] for k in rows])
    inside, after = idx < hi, idx >= hi
    for b, gram, arr in zip(buf, grams, arrays, strict=True):
        flat = arr.reshape(len(steps), -1)
        if inside.any():  # usable steps of one shard have consecutive positions
            first = int(idx[inside][0]) - lo
            np.take(flat, np.asarray(rows)[inside], axis=0, out=b[first:first + int(inside.sum())])
        if after.any():  # steps arrive in order, so the panel's rows are all in buf by now
            gram[lo:hi, idx[after]] += core.gram_product(b, flat[np.asarray(rows)[after]])


def _close_panel(groups: list[tuple[list[int], int]], panel: tuple[int, int, int], buf: list[np.ndarray],
                 grams: dict[int, np.ndarray], T: int) -> Iterator[tuple[int, np.ndarray]]:
    """Add the panel's own block to its modules' Grams; yield those complete after their last panel."""
    g, lo, hi = panel
    for i, b in zip(groups[g][0], buf, strict=True):
        grams[i][lo:hi, lo:hi] += core.gram_product(b)
        if hi == T:
            gram = grams.pop(i)
            yield i, (gram if groups[g][1] >= T else np.triu(gram) + np.triu(gram, 1).T)


def _gram_row(gram: np.ndarray, sign: SignAgg, step: dict[str, np.ndarray], lags: int,
              rel_error: float) -> dict[str, float]:
    row: dict[str, float] = {"steps": len(gram), "nonzero_steps": int((core.gram_norms(gram) > 0).sum())}
    for lag, mean in enumerate(core.lag_cosine_means(gram, lags), start=1):
        row[f"cos_lag{lag}_mean"] = float(mean)
    row["cos_to_mean_mean"] = core.nanmean(core.cosine_to_mean(gram))
    row.update(core.trajectory_stats(gram, rel_error))
    for key in STEP_KEYS:
        row[f"{key}_step_mean"] = core.nanmean(step[key][: len(gram)])
    row.update(sign.row())
    return {k: row[k] for k in stat_columns(lags)}


def _gram_scope(scope: str, name: str, modules: list[str], gram: np.ndarray, sign: SignAgg, sign_w: SignAgg | None,
                step: dict[str, np.ndarray], lags: int, window: int | None, rel_error: float) -> ScopeStats:
    series = {f"cos_lag{lag}": s for lag, s in enumerate(core.lag_cosines(gram, lags), start=1)}
    series["cos_to_mean"] = core.cosine_to_mean(gram)
    series["grad_norm"] = core.gram_norms(gram)
    series.update({f"{k}_step": step[k] for k in STEP_KEYS})
    window_row = None
    if window is not None and sign_w is not None:
        window_row = _gram_row(gram[:window, :window], sign_w, step, lags, rel_error)
    return ScopeStats(scope=scope, name=name, modules=modules, row=_gram_row(gram, sign, step, lags, rel_error),
                      window_row=window_row, series=series, hist=sign.hist, null_hist=sign.null()[2])


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    """Column means over the finite entries of each column (NaN where a column has none)."""
    finite = np.isfinite(x)
    n = finite.sum(axis=0)
    total = np.where(finite, x, 0.0).sum(axis=0)
    return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def _rel_error(specs: Sequence[Any], members: Sequence[int]) -> float:
    """The Gram error bound of a scope: float32 blocks of at most GRAM_BLOCK columns of one module each."""
    return core.gram_error_bound(min(core.GRAM_BLOCK, max(specs[i].size for i in members)))


def _scopes(specs: Sequence[Any], T: int, steps: list[_ModuleSteps], grams: Iterator[tuple[int, np.ndarray]],
            scale: np.ndarray | None, lags: int, window: int | None) -> list[ScopeStats]:
    """Every module's scope as its Gram streams in, then the projection, layer and adapter scopes."""
    pooled = [(scope, name, members, np.zeros((T, T))) for scope, name, members in scope_members(specs)]
    holding = [[k for k, (_, _, members, _) in enumerate(pooled) if i in members] for i in range(len(specs))]
    modules: dict[int, ScopeStats] = {}
    for i, gram in grams:
        if scale is not None:
            gram *= np.outer(scale, scale)
        for k in holding[i]:
            pooled[k][3][...] += gram
        ms = steps[i]
        modules[i] = _gram_scope("module", specs[i].name, [specs[i].name], gram, ms.sign, ms.sign_w, ms.spectra,
                                 lags, window, _rel_error(specs, [i]))
    out = [modules[i] for i in range(len(specs))]
    for scope, name, members, gram in pooled:
        sign = pooled_sign([steps[i].sign for i in members])
        sign_w = pooled_sign([steps[i].sign_w for i in members]) if window is not None else None
        with np.errstate(all="ignore"):
            step = {k: _nanmean_rows(np.stack([steps[i].spectra[k] for i in members])) for k in STEP_KEYS}
        out.append(_gram_scope(scope, name, [specs[i].name for i in members], gram, sign, sign_w, step, lags,
                               window, _rel_error(specs, members)))
    return out


def _progress(run: Any, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=len(run.meta["shards"]) - len(run.skipped), desc=f"analyze {Path(run.path).name}",
                unit="shard", leave=False)


def _all_grams(run: Any, usable: list[int], fused: dict[int, np.ndarray], arena: np.ndarray, budget: int,
               bar: Any) -> Iterator[tuple[int, np.ndarray]]:
    """The Grams of the modules fused into the step pass, then those of a Gram pass over all others."""
    rest = [i for i in range(len(run.specs)) if i not in fused]
    groups = [([rest[k] for k in group], panel)
              for group, panel in _plan_groups([run.specs[i].size for i in rest], len(usable), budget)]
    if bar is not None:  # the Gram pass reads every shard once per panel of each group
        bar.total += bar.total * sum(math.ceil(len(usable) / panel) for _, panel in groups)
        bar.refresh()
    for i, buf in fused.items():
        yield i, core.gram_product(buf[:len(usable)])
    fused.clear()
    yield from _gram_pass(run, {s: k for k, s in enumerate(usable)}, groups, arena, bar)


def _analyze_raw(run: Any, *, lags: int, window: int | None, bins: int, budget: int, unclip: bool,
                 progress: bool) -> RunStats:
    flagged = {int(r["step"]) for r in run.step_records if r.get("nonfinite")}
    candidates = [s for s in run.steps if s not in flagged]
    sizes = [s.size for s in run.specs]
    groups = _plan_groups(sizes, len(candidates), budget)
    first = groups[0][0] if groups and groups[0][1] >= len(candidates) else []
    # Every group of either pass fits the budget, and a panel holds at least one step; pages are touched as filled.
    arena = np.empty(max(min(budget // 4, len(candidates) * sum(sizes)), max(sizes, default=0)), np.float32)
    fused = dict(zip(first, _buffers(arena, [sizes[i] for i in first], len(candidates)), strict=True))
    bar = _progress(run, progress)
    try:
        sums = _StepSums(run.specs, candidates, window, fused)
        for steps, arrays in _prefetch(_read_ahead(run.iter_steps())):
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
        grams = _all_grams(run, usable, fused, arena, budget, bar)
        scopes = _scopes(run.specs, len(usable), steps, grams, scale, lags, W)
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
