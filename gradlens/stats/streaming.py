"""Exact streaming statistics of recorded gradients: float64 per-entry sums and per-step norms, so analyses that need
only moments (selectors, sign stability, norms) never read the raw shards.

A leaf: numpy only (the per-step update runs in torch, on the gradients' device: :mod:`.device`). The store
persists :class:`StreamingStats` as tensors (``to_tensors``): one partial per commit of a few steps, merged
in commit order (:meth:`StreamingStats.merge`), and reads the merged result back as :class:`Accumulators`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gradlens.errors import GradlensError
from gradlens.modules import ModuleSpec

ACC_SUMS = ("sum", "sumsq", "sumabs", "sumsign")
FLOAT_SUMS = ("sum", "sumsq", "sumabs")  # float64 in every file; sumsign and nonzero are integers stored compactly


@dataclass
class ModuleAccumulator:
    """Float64 moments of one module's gradients over the ``count`` finite steps recorded so far.

    ``sqnorm[t]`` is the squared norm of accumulated step t and ``dot_prev[t]`` its dot product with the previous
    accumulated step (NaN for the first): the raw material for gradient-noise and autocorrelation estimates.
    """

    count: int
    sum: np.ndarray
    sumsq: np.ndarray
    sumabs: np.ndarray
    sumsign: np.ndarray
    nonzero: np.ndarray
    sqnorm: np.ndarray
    dot_prev: np.ndarray


@dataclass
class Accumulators:
    """All modules' accumulators; ``steps`` are the accumulated (finite) steps the per-step series refer to."""

    path: Path
    steps: np.ndarray
    modules: dict[str, ModuleAccumulator]

    def __getitem__(self, name: str) -> ModuleAccumulator:
        if name not in self.modules:
            raise GradlensError(f"{self.path}: no module named {name!r}")
        return self.modules[name]


def count_dtype(n: int) -> type[np.signedinteger]:
    """The smallest signed integer type holding -n..n: sign sums and non-zero counts of n steps in it are exact."""
    return next(t for t in (np.int8, np.int16, np.int32) if n <= np.iinfo(t).max) if n < 2**31 else np.int64


class StreamingStats:
    """Float64 sums per module of the float32 gradients (before any cast to the storage dtype), as host arrays.

    ``to_tensors``/``from_tensors`` give the exact state as safetensors arrays. A run's statistics are defined as the
    in-order :meth:`merge` of one partial per commit (each summed from zero over its steps), so merging the committed
    partials again (a reader, a resumed writer) gives the writer's in-memory state bitwise.
    """

    def __init__(self, specs: list[ModuleSpec], zeros: bool = True) -> None:
        """Empty statistics of ``specs``; ``zeros=False`` leaves the per-entry sums for the caller to set."""
        self.specs = specs
        self.steps: list[int] = []
        self.sums = [{k: np.zeros(s.shape, np.float64) for k in ACC_SUMS} for s in specs] if zeros else []
        self.nonzero = [np.zeros(s.shape, np.int64) for s in specs] if zeros else []
        self.sqnorm: list[list[float]] = [[] for _ in specs]
        self.dot_prev: list[list[float]] = [[] for _ in specs]
        self.prev: list[np.ndarray | None] = [None for _ in specs]

    def merge(self, part: StreamingStats) -> None:
        """Fold in a partial of the steps that follow (:meth:`DeviceStats.host`, or read back from its tensors)."""
        self.steps += part.steps
        for i in range(len(self.specs)):
            for key in ACC_SUMS:
                self.sums[i][key] += part.sums[i][key]
            self.nonzero[i] += part.nonzero[i]
            self.sqnorm[i] += part.sqnorm[i]
            self.dot_prev[i] += part.dot_prev[i]
        if part.steps:
            self.prev = list(part.prev)

    def to_tensors(self) -> dict[str, np.ndarray]:
        """The state as arrays; sign sums and non-zero counts in the smallest integer type that holds them exactly."""
        out = {"steps": np.asarray(self.steps, np.int64)}
        ints = count_dtype(len(self.steps))
        for i in range(len(self.specs)):
            out[f"m{i}.count"] = np.asarray(len(self.steps), np.int64)
            out.update({f"m{i}.{k}": self.sums[i][k] for k in FLOAT_SUMS})
            out[f"m{i}.sumsign"] = self.sums[i]["sumsign"].astype(ints)
            out[f"m{i}.nonzero"] = self.nonzero[i].astype(ints)
            out[f"m{i}.sqnorm"] = np.asarray(self.sqnorm[i], np.float64)
            out[f"m{i}.dot_prev"] = np.asarray(self.dot_prev[i], np.float64)
            if self.prev[i] is not None:
                out[f"m{i}.prev"] = self.prev[i]
        return out

    @classmethod
    def from_tensors(cls, specs: list[ModuleSpec], t: dict[str, np.ndarray]) -> StreamingStats:
        """The inverse of :meth:`to_tensors` (also of format-1 files, whose sign sums are float64)."""
        state = cls(specs)
        state.steps = [int(s) for s in t["steps"]]
        for i in range(len(specs)):
            state.sums[i] = {k: t[f"m{i}.{k}"].astype(np.float64) for k in ACC_SUMS}
            state.nonzero[i] = t[f"m{i}.nonzero"].astype(np.int64)
            state.sqnorm[i] = t[f"m{i}.sqnorm"].tolist()
            state.dot_prev[i] = t[f"m{i}.dot_prev"].tolist()
            state.prev[i] = t[f"m{i}.prev"].copy() if f"m{i}.prev" in t else None
        return state

    def accumulators(self, path: Path) -> Accumulators:
        """The state as the reader's :class:`Accumulators` (arrays shared, not copied)."""
        modules = {
            spec.name: ModuleAccumulator(
                count=len(self.steps), sum=self.sums[i]["sum"], sumsq=self.sums[i]["sumsq"],
                sumabs=self.sums[i]["sumabs"], sumsign=self.sums[i]["sumsign"], nonzero=self.nonzero[i],
                sqnorm=np.asarray(self.sqnorm[i], np.float64), dot_prev=np.asarray(self.dot_prev[i], np.float64))
            for i, spec in enumerate(self.specs)
        }
        return Accumulators(path=path, steps=np.asarray(self.steps, np.int64), modules=modules)

    def live_summary(self, pending: StreamingStats | None = None, signs: bool = True) -> dict[str, float]:
        """Whole-adapter diagnostics of the steps added so far; with ``pending``, of this state followed by that
        uncommitted partial (without merging them).

        ``cos_prev``: cosine between the last two added steps; ``b_grad_norm``: the last norm (both cost a few
        operations per module); with ``signs``, also ``sign_stability`` (a pass over every entry): the mean over
        entries of ``|sum sign(g)| / n`` over each entry's n non-zero steps (1: every entry kept one sign, ~0: random
        signs; entries never non-zero left out).
        """
        parts = [self] if pending is None else [self, pending]
        count = sum(len(p.steps) for p in parts)
        if not count:
            return {}
        modules = range(len(self.specs))
        sq = [_tail([p.sqnorm[i] for p in parts], 2) for i in modules]
        last = sum(s[-1] for s in sq)
        out = {"step": float(_tail([p.steps for p in parts], 1)[0]), "b_grad_norm": math.sqrt(last),
               "cos_prev": math.nan}
        if count >= 2:
            denom = math.sqrt(last * sum(s[-2] for s in sq))
            dots = sum(_tail([p.dot_prev[i] for p in parts], 1)[0] for i in modules)
            out["cos_prev"] = dots / denom if denom > 0 else math.nan
        if signs:
            total, live = 0.0, 0  # each entry over its own non-zero steps: all-zero steps neither dilute nor count
            for i in modules:
                n = sum(p.nonzero[i] for p in parts)
                seen = n > 0
                total += float((np.abs(sum(p.sums[i]["sumsign"] for p in parts))[seen] / n[seen]).sum())
                live += int(seen.sum())
            out["sign_stability"] = total / live if live else math.nan
        return out


def _tail(series: list[list], k: int) -> list:
    """The last ``k`` values of the concatenated ``series``, without concatenating them."""
    out: list = []
    for values in series:
        out = (out + values[-k:])[-k:]
    return out
