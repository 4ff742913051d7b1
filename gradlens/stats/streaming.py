"""Exact streaming statistics of recorded gradients: float64 per-entry sums and per-step norms, updated one step at a
time, so analyses that need only moments (selectors, sign stability, norms) never read the raw shards.

A leaf: numpy only. The store persists a :class:`StreamingStats` (``to_tensors``) and reads it back as
:class:`Accumulators`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gradlens.errors import GradlensError
from gradlens.modules import ModuleSpec

ACC_SUMS = ("sum", "sumsq", "sumabs", "sumsign")


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


class StreamingStats:
    """Running float64 sums per module, fed the float32 gradient before any cast to the storage dtype.

    ``to_tensors``/``from_tensors`` give the exact state as safetensors arrays, so a resumed run continues the sums
    bitwise where the committed ones stopped.
    """

    def __init__(self, specs: list[ModuleSpec]) -> None:
        self.specs = specs
        self.steps: list[int] = []
        self.sums = [{k: np.zeros(s.shape, np.float64) for k in ACC_SUMS} for s in specs]
        self.nonzero = [np.zeros(s.shape, np.int64) for s in specs]
        self.sqnorm: list[list[float]] = [[] for _ in specs]
        self.dot_prev: list[list[float]] = [[] for _ in specs]
        self.prev: list[np.ndarray | None] = [None for _ in specs]

    def add(self, step: int, grads: list[np.ndarray]) -> None:
        self.steps.append(step)
        for i, g in enumerate(grads):
            g64 = g.astype(np.float64)
            sums = self.sums[i]
            sums["sum"] += g64
            sums["sumsq"] += g64 * g64
            sums["sumabs"] += np.abs(g64)
            sums["sumsign"] += np.sign(g64)
            self.nonzero[i] += g64 != 0
            flat = g64.ravel()
            self.sqnorm[i].append(float(flat @ flat))
            prev = self.prev[i]
            self.dot_prev[i].append(math.nan if prev is None else float(flat @ prev.astype(np.float64).ravel()))
            self.prev[i] = g.copy()

    def to_tensors(self) -> dict[str, np.ndarray]:
        out = {"steps": np.asarray(self.steps, np.int64)}
        for i in range(len(self.specs)):
            out[f"m{i}.count"] = np.asarray(len(self.steps), np.int64)
            out.update({f"m{i}.{k}": v for k, v in self.sums[i].items()})
            out[f"m{i}.nonzero"] = self.nonzero[i]
            out[f"m{i}.sqnorm"] = np.asarray(self.sqnorm[i], np.float64)
            out[f"m{i}.dot_prev"] = np.asarray(self.dot_prev[i], np.float64)
            if self.prev[i] is not None:
                out[f"m{i}.prev"] = self.prev[i]
        return out

    @classmethod
    def from_tensors(cls, specs: list[ModuleSpec], t: dict[str, np.ndarray]) -> StreamingStats:
        state = cls(specs)
        state.steps = [int(s) for s in t["steps"]]
        for i in range(len(specs)):
            state.sums[i] = {k: t[f"m{i}.{k}"].copy() for k in ACC_SUMS}
            state.nonzero[i] = t[f"m{i}.nonzero"].copy()
            state.sqnorm[i] = t[f"m{i}.sqnorm"].tolist()
            state.dot_prev[i] = t[f"m{i}.dot_prev"].tolist()
            state.prev[i] = t[f"m{i}.prev"].copy() if f"m{i}.prev" in t else None
        return state

    def live_summary(self) -> dict[str, float]:
        """Whole-adapter diagnostics of the steps added so far, cheap enough to compute after every step.

        ``cos_prev``: cosine between the last two added steps; ``sign_stability``: mean over entries of
        ``|sum sign(g)| / count`` (1: every entry kept one sign, ~0: random signs); ``b_grad_norm``: the last norm.
        """
        acc = self
        if not acc.steps:
            return {}
        sq = sum(s[-1] for s in acc.sqnorm)
        out = {"step": float(acc.steps[-1]), "b_grad_norm": math.sqrt(sq), "cos_prev": math.nan}
        if len(acc.steps) >= 2:
            denom = math.sqrt(sq * sum(s[-2] for s in acc.sqnorm))
            out["cos_prev"] = sum(d[-1] for d in acc.dot_prev) / denom if denom > 0 else math.nan
        total = sum(spec.size for spec in self.specs) * len(acc.steps)
        out["sign_stability"] = float(sum(np.abs(s["sumsign"]).sum() for s in acc.sums) / total)
        return out
