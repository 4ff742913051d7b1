"""The out-of-core driver: every statistic of :mod:`gradlens.stats.core` for one run, read shard by shard.

Each module's gradients are read exactly once (``Run.iter_steps`` restricted to a group of modules, so a pass over
the shards reads only that group's tensors). A group is as many modules as fit the memory budget with all their
usable steps (float64) plus their ``T x T`` Gram matrices; from those come the module Grams, the per-step spectra and
the sign sums (for the whole run and, separately, the leading window). A module too large for the budget on its own
is processed in panels of steps: pass ``a`` holds panel ``a`` and multiplies it with every later step as it streams
past, which fills the Gram block by block (one extra read of that module per extra panel).

A module Gram is added into the whole-adapter, per-projection and per-layer Grams (sums of Grams: the Gram of the
concatenated vectors) and dropped once its statistics are taken, so peak memory is the budget plus those aggregate
``T x T`` matrices, whatever the run's size on disk.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradlens.errors import GradlensError
from gradlens.stats import core

STEP_KEYS = ("erank", "stable_rank", "energy90")
# Statistic columns, in table order (cos_lag{L}_mean columns are inserted first, for L = 1..lags).
STAT_KEYS = (
    "cos_to_mean_mean",
    "erank_traj", "erank_traj_unit", "stable_rank_traj", "stable_rank_traj_unit", "energy90_traj",
    "energy90_traj_unit",
    "erank_step_mean", "stable_rank_step_mean", "energy90_step_mean",
    "sign_stability_mean", *(f"sign_stable_frac_{t}" for t in core.STABLE_THRESHOLDS),
    "sign_null_mean", *(f"sign_null_frac_{t}" for t in core.STABLE_THRESHOLDS),
)


def stat_columns(lags: int) -> list[str]:
    """The statistic columns of every table, in order: ``steps``, lag means, then :data:`STAT_KEYS`."""
    return ["steps", *(f"cos_lag{lag}_mean" for lag in range(1, lags + 1)), *STAT_KEYS]


class _UnflaggedNonfinite(Exception):
    def __init__(self, steps: set[int]) -> None:
        super().__init__(f"non-finite steps not flagged in the manifest: {sorted(steps)}")
        self.steps = steps


@dataclass
class SignAgg:
    """Poolable sign-stability sums of a set of entries over T steps: total, counts above thresholds, histogram."""

    steps: int
    bins: int
    entries: int = 0
    total: float = 0.0
    above: dict[float, int] = field(default_factory=dict)
    hist: np.ndarray | None = None

    def add_sumsign(self, sumsign: np.ndarray) -> None:
        stab = core.sign_stability(sumsign, self.steps).ravel()
        self.entries += stab.size
        self.total += float(stab.sum())
        for t in core.STABLE_THRESHOLDS:
            self.above[t] = self.above.get(t, 0) + int((stab > t).sum())
        h = core.stability_histogram(stab, self.bins)
        self.hist = h if self.hist is None else self.hist + h

    def merge(self, other: SignAgg) -> None:
        self.entries += other.entries
        self.total += other.total
        for t, n in other.above.items():
            self.above[t] = self.above.get(t, 0) + n
        self.hist = other.hist.copy() if self.hist is None else self.hist + other.hist

    def row(self) -> dict[str, float]:
        row = {"sign_stability_mean": self.total / self.entries if self.entries else math.nan}
        for t in core.STABLE_THRESHOLDS:
            row[f"sign_stable_frac_{t}"] = self.above.get(t, 0) / self.entries if self.entries else math.nan
        row["sign_null_mean"] = core.sign_null_mean(self.steps)
        for t in core.STABLE_THRESHOLDS:
            row[f"sign_null_frac_{t}"] = core.sign_null_share(self.steps, t)
        return row


@dataclass
class ScopeStats:
    """Statistics of one module, projection type, layer or the whole adapter (``scope`` names which)."""

    scope: str
    name: str
    modules: list[str]
    row: dict[str, float]
    window_row: dict[str, float] | None
    series: dict[str, np.ndarray]
    hist: np.ndarray
    null_hist: np.ndarray


@dataclass
class RunStats:
    """Everything :func:`analyze_run` computed for one run."""

    path: Path
    regime: str
    seed: Any
    steps: list[int]
    excluded: list[int]
    lags: int
    window: int | None
    bins: int
    scopes: list[ScopeStats]
    specs: list[Any]
    meta: dict[str, Any]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (shard file, why) left out under skip_bad

    def scope(self, scope: str, name: str = "") -> ScopeStats:
        for s in self.scopes:
            if s.scope == scope and (s.name == name or scope == "adapter"):
                return s
        raise KeyError((scope, name))

    @property
    def adapter(self) -> ScopeStats:
        return self.scope("adapter")


def run_regime(meta: dict[str, Any]) -> str:
    """``sft``/``grpo`` from a run's manifest: the ``gradlens record`` config, else the trainer class, else unknown."""
    config = meta.get("config") or {}
    if not isinstance(config, dict):
        return "unknown"
    record = config.get("record")
    if isinstance(record, dict) and record.get("regime"):
        return str(record["regime"])
    if config.get("regime"):
        return str(config["regime"])
    trainer = str(config.get("trainer_class") or "")
    for key in ("GRPO", "SFT"):
        if key in trainer:
            return key.lower()
    return "unknown"


def _scope_row(gram: np.ndarray, sign: SignAgg, step: dict[str, np.ndarray], lags: int) -> dict[str, float]:
    row: dict[str, float] = {"steps": len(gram)}
    for lag, mean in enumerate(core.lag_cosine_means(gram, lags), start=1):
        row[f"cos_lag{lag}_mean"] = float(mean)
    row["cos_to_mean_mean"] = core.nanmean(core.cosine_to_mean(gram))
    row.update(core.trajectory_stats(gram))
    for key in STEP_KEYS:
        row[f"{key}_step_mean"] = core.nanmean(step[key][: len(gram)])
    row.update(sign.row())
    return {k: row[k] for k in stat_columns(lags)}


def _scope(scope: str, name: str, modules: list[str], gram: np.ndarray, sign: SignAgg, sign_w: SignAgg | None,
           step: dict[str, np.ndarray], lags: int, window: int | None, bins: int) -> ScopeStats:
    series = {f"cos_lag{lag}": s for lag, s in enumerate(core.lag_cosines(gram, lags), start=1)}
    series["cos_to_mean"] = core.cosine_to_mean(gram)
    series["grad_norm"] = core.gram_norms(gram)
    series.update({f"{k}_step": step[k] for k in STEP_KEYS})
    window_row = None
    if window is not None:
        window_row = _scope_row(gram[:window, :window], sign_w, step, lags)
    return ScopeStats(scope=scope, name=name, modules=modules, row=_scope_row(gram, sign, step, lags),
                      window_row=window_row, series=series, hist=sign.hist,
                      null_hist=core.null_histogram(sign.steps, bins))


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
        if cost > budget:
            if current:
                groups.append((current, steps))
                current, used = [], 0
            avail = max(budget - gram_bytes, budget // 4)
            groups.append(([i], max(1, min(steps, avail // (8 * size)))))
            continue
        if current and used + cost > budget:
            groups.append((current, steps))
            current, used = [], 0
        current.append(i)
        used += cost
    if current:
        groups.append((current, steps))
    return groups


def analyze_run(path: str | os.PathLike[str], *, lags: int = 10, window: int | None = None, bins: int = 20,
                memory_mb: float = 512, unclip: bool = False, progress: bool = False,
                skip_bad: bool = False) -> RunStats:
    """Compute every statistic of one run in a streaming pass over its shards (see the module docstring).

    Steps flagged non-finite in the manifest, or found to hold NaN/Inf while reading, are excluded and listed in
    ``RunStats.excluded``. ``window``: also take every statistic over the first ``window`` usable steps. ``unclip``:
    divide each stored (clipped) step by its ``clip_coef`` first, i.e. analyse the pre-clip gradient. ``skip_bad``:
    leave out the steps of missing or corrupt shards (listed in ``RunStats.skipped``) instead of failing.
    Raises :class:`GradlensError` for a path that is not a run, a run without raw shards, or fewer than 2 usable steps.
    """
    from gradlens.store import open_run

    run = open_run(path, skip_bad=skip_bad)
    flagged = {int(r["step"]) for r in run.step_records if r.get("nonfinite")}
    found: set[int] = set()
    while True:  # a non-finite step the manifest did not flag restarts the pass with that step excluded
        try:
            return _analyze(run, flagged | found, lags=lags, window=window, bins=bins,
                            budget=int(memory_mb * 2**20), unclip=unclip, progress=progress)
        except _UnflaggedNonfinite as e:
            found |= e.steps


def _analyze(run: Any, excluded: set[int], *, lags: int, window: int | None, bins: int, budget: int, unclip: bool,
             progress: bool) -> RunStats:
    where = run.path
    if not run.meta.get("save_raw", True):
        raise GradlensError(f"{where}: raw shards were not saved (save_raw=False); analysis needs the raw gradients")
    usable = [s for s in run.steps if s not in excluded]
    bad = sorted(s for s in excluded if s in set(run.steps))
    T = len(usable)
    if T < 2:
        note = f" ({len(bad)} non-finite step(s) excluded: {bad[:10]})" if bad else ""
        raise GradlensError(f"{where}: {T} usable recorded step(s){note}; the analysis needs at least 2")
    if any(b <= a for a, b in zip(run.steps, run.steps[1:], strict=False)):
        raise GradlensError(f"{where}: recorded steps are not increasing")
    W = min(window, T) if window is not None else None
    pos = {s: i for i, s in enumerate(usable)}
    specs = run.specs
    scale = None
    if unclip:
        coef = {int(r["step"]): r.get("clip_coef") for r in run.step_records}
        scale = np.array([1.0 / c if isinstance(c, (int, float)) and math.isfinite(c) and c > 0 else 1.0
                          for c in (coef[s] for s in usable)])

    groups = _plan_groups([s.size for s in specs], T, budget)
    n_shards = len(run.meta["shards"]) - len(run.skipped)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = sum(math.ceil(T / panel) for _, panel in groups) * n_shards
        bar = tqdm(total=total, desc=f"analyze {Path(where).name}", unit="shard", leave=False)

    projs = list(dict.fromkeys(s.proj for s in specs))
    layers = list(dict.fromkeys(s.layer for s in specs if s.layer is not None))
    adapter_gram = np.zeros((T, T))
    proj_gram = {p: np.zeros((T, T)) for p in projs}
    layer_gram = {lay: np.zeros((T, T)) for lay in layers}
    module_scopes: dict[int, ScopeStats] = {}
    signs: dict[int, tuple[SignAgg, SignAgg | None]] = {}
    step_stats: dict[int, dict[str, np.ndarray]] = {}

    try:
        for group, panel in groups:
            names = [specs[i].name for i in group]
            grams = {i: np.zeros((T, T)) for i in group}
            sumsign = {i: np.zeros(specs[i].shape) for i in group}
            sumsign_w = {i: np.zeros(specs[i].shape) for i in group}
            per_step = {i: {k: np.full(T, np.nan) for k in STEP_KEYS} for i in group}
            for lo in range(0, T, panel):
                hi = min(T, lo + panel)
                first = lo == 0
                buf = {i: np.empty((hi - lo, specs[i].size)) for i in group}
                nonfinite: set[int] = set()
                for steps, arrays in run.iter_steps(names):
                    rows = [k for k, s in enumerate(steps) if s in pos]
                    if bar is not None:
                        bar.update(1)
                    if not rows:
                        continue
                    idx = np.array([pos[steps[k]] for k in rows])
                    inside = (idx >= lo) & (idx < hi)
                    after = idx >= hi
                    for i, arr in zip(group, arrays, strict=True):
                        stored = arr if len(rows) == len(steps) else arr[rows]  # float32
                        x = stored.astype(np.float64)
                        if first:
                            finite = np.isfinite(x).reshape(len(rows), -1).all(axis=1)
                            if not finite.all():
                                nonfinite.update(int(usable[t]) for t in idx[~finite])
                                continue
                            for key, values in core.step_spectrum_stats(x).items():
                                per_step[i][key][idx] = values
                            sg = np.sign(stored)  # the same signs as x's, at half the memory traffic (10x faster)
                            sumsign[i] += sg.sum(axis=0, dtype=np.float64)
                            if W is not None:
                                sumsign_w[i] += sg[idx < W].sum(axis=0, dtype=np.float64)
                        flat = x.reshape(len(rows), -1)
                        buf[i][idx[inside] - lo] = flat[inside]
                        if after.any():
                            grams[i][lo:hi, idx[after]] = buf[i] @ flat[after].T
                if nonfinite:
                    raise _UnflaggedNonfinite(nonfinite)
                for i in group:
                    grams[i][lo:hi, lo:hi] = buf[i] @ buf[i].T
                del buf
            for i in group:
                spec = specs[i]
                g = np.triu(grams.pop(i))
                g = g + np.triu(g, 1).T
                if scale is not None:
                    g *= np.outer(scale, scale)
                adapter_gram += g
                proj_gram[spec.proj] += g
                if spec.layer is not None:
                    layer_gram[spec.layer] += g
                sign = SignAgg(T, bins)
                sign.add_sumsign(sumsign.pop(i))
                sign_w = None
                if W is not None:
                    sign_w = SignAgg(W, bins)
                    sign_w.add_sumsign(sumsign_w.pop(i))
                signs[i] = (sign, sign_w)
                step_stats[i] = per_step[i]
                module_scopes[i] = _scope("module", spec.name, [spec.name], g, sign, sign_w, per_step[i], lags, W,
                                          bins)
                del g
    finally:
        if bar is not None:
            bar.close()

    def pooled(members: list[int], gram: np.ndarray, scope: str, name: str) -> ScopeStats:
        sign, sign_w = SignAgg(T, bins), (SignAgg(W, bins) if W is not None else None)
        for i in members:
            sign.merge(signs[i][0])
            if sign_w is not None:
                sign_w.merge(signs[i][1])
        with np.errstate(all="ignore"):
            step = {k: _nanmean_rows(np.stack([step_stats[i][k] for i in members])) for k in STEP_KEYS}
        return _scope(scope, name, [specs[i].name for i in members], gram, sign, sign_w, step, lags, W, bins)

    scopes = [module_scopes[i] for i in range(len(specs))]
    for p in projs:
        scopes.append(pooled([i for i, s in enumerate(specs) if s.proj == p], proj_gram.pop(p), "proj", p))
    for lay in layers:
        scopes.append(pooled([i for i, s in enumerate(specs) if s.layer == lay], layer_gram.pop(lay), "layer",
                             str(lay)))
    scopes.append(pooled(list(range(len(specs))), adapter_gram, "adapter", "adapter"))
    meta = {k: run.meta.get(k) for k in ("seed", "created", "complete", "dtype", "versions", "config")}
    return RunStats(path=Path(where), regime=run_regime(run.meta), seed=run.meta.get("seed"), steps=usable,
                    excluded=bad, lags=lags, window=W, bins=bins, scopes=scopes, specs=list(specs), meta=meta,
                    skipped=list(run.skipped))


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    """Column means over the finite entries of each column (NaN where a column has none)."""
    finite = np.isfinite(x)
    n = finite.sum(axis=0)
    total = np.where(finite, x, 0.0).sum(axis=0)
    return np.where(n > 0, total / np.maximum(n, 1), np.nan)
