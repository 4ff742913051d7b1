"""What the analysis of one run holds, shared by the raw-shard driver (:mod:`.driver`) and the accumulator path
(:mod:`.accumulated`): poolable sign-stability sums (:class:`SignAgg`), the statistics of one scope
(:class:`ScopeStats`) and of the run (:class:`RunStats`), and the table columns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradlens.errors import GradlensError
from gradlens.stats import core

STEP_KEYS = ("erank", "stable_rank", "energy90")
TRAJ_KEYS = ("erank_traj", "erank_traj_unit", "stable_rank_traj", "stable_rank_traj_unit", "energy90_traj",
             "energy90_traj_unit")
SIGN_KEYS = ("sign_entries", "sign_stability_mean", *(f"sign_stable_frac_{t}" for t in core.STABLE_THRESHOLDS),
             "sign_null_mean", *(f"sign_null_frac_{t}" for t in core.STABLE_THRESHOLDS))
# Statistic columns, in table order after "steps", "nonzero_steps" and the cos_lag{L}_mean columns (L = 1..lags).
STAT_KEYS = ("cos_to_mean_mean", *TRAJ_KEYS, *(f"{k}_step_mean" for k in STEP_KEYS), *SIGN_KEYS)
RAW_SOURCE = "raw shards"
ACC_SOURCE = "accumulators"


def stat_columns(lags: int) -> list[str]:
    """The statistic columns of every table, in order.

    ``steps``: usable steps; ``nonzero_steps``: those where the scope's gradient is not exactly zero; lag means; then
    :data:`STAT_KEYS`, where ``sign_entries`` counts the entries with at least one non-zero step (the entries the
    sign statistics average over).
    """
    return ["steps", "nonzero_steps", *(f"cos_lag{lag}_mean" for lag in range(1, lags + 1)), *STAT_KEYS]


@dataclass
class SignAgg:
    """Poolable sign-stability sums of a set of entries whose non-zero step counts are at most ``steps``.

    Each entry's stability is ``|sum sign| / n`` over its own ``n`` non-zero steps, and its null is that of ``n``
    random signs; ``by_count[n]`` counts the entries with ``n`` non-zero steps, so the pooled null is the mean of the
    entries' nulls. Entries never non-zero (``n = 0``) carry no sign and are left out of every sign statistic.
    """

    steps: int
    bins: int
    total: float = 0.0
    above: dict[float, int] = field(default_factory=dict)
    hist: np.ndarray = field(init=False)
    by_count: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.hist = np.zeros(self.bins, np.int64)
        self.by_count = np.zeros(self.steps + 1, np.int64)

    @property
    def entries(self) -> int:
        """Entries with at least one non-zero step."""
        return int(self.by_count[1:].sum())

    def add(self, sumsign: np.ndarray, nonzero: np.ndarray) -> None:
        """Add entries given their sums of signs and their counts of non-zero steps (arrays of one shape)."""
        counts = np.asarray(nonzero, np.int64).ravel()
        self.by_count += np.bincount(counts, minlength=self.steps + 1)[: self.steps + 1]
        live = counts > 0
        stab = core.sign_stability(np.asarray(sumsign).ravel()[live], counts[live])
        self.total += float(stab.sum())
        for t in core.STABLE_THRESHOLDS:
            self.above[t] = self.above.get(t, 0) + int((stab > t).sum())
        self.hist += core.stability_histogram(stab, self.bins)

    def merge(self, other: SignAgg) -> None:
        self.total += other.total
        for t, n in other.above.items():
            self.above[t] = self.above.get(t, 0) + n
        self.hist += other.hist
        self.by_count += other.by_count

    def null(self) -> tuple[float, dict[float, float], np.ndarray]:
        """(mean null stability, null shares above the thresholds, null histogram) of these entries."""
        return core.sign_null_table(self.steps, self.bins).pooled(self.by_count)

    def row(self) -> dict[str, float]:
        n = self.entries
        row: dict[str, float] = {"sign_entries": n, "sign_stability_mean": self.total / n if n else math.nan}
        for t in core.STABLE_THRESHOLDS:
            row[f"sign_stable_frac_{t}"] = self.above.get(t, 0) / n if n else math.nan
        mean, share, _ = self.null()
        row["sign_null_mean"] = mean
        for t in core.STABLE_THRESHOLDS:
            row[f"sign_null_frac_{t}"] = share[t]
        return row


def pooled_sign(signs: Sequence[SignAgg]) -> SignAgg:
    """One :class:`SignAgg` of the union of the entries of ``signs`` (all with the same ``steps`` and ``bins``)."""
    out = SignAgg(signs[0].steps, signs[0].bins)
    for s in signs:
        out.merge(s)
    return out


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
    """Everything :func:`gradlens.analysis.driver.analyze_run` computed for one run.

    ``excluded``: non-finite steps left out; ``zero_steps``: usable steps whose whole-adapter gradient is exactly
    zero (kept in ``steps``, skipped by the cosines and the sign statistics); ``source``: :data:`RAW_SOURCE` or
    :data:`ACC_SOURCE` (a run recorded with ``save_raw=False``), with ``unavailable`` (``window_unavailable``) the
    statistic columns of ``row`` (``window_row``) that are NaN because they need the raw shards.
    """

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
    zero_steps: list[int] = field(default_factory=list)
    source: str = RAW_SOURCE
    unavailable: list[str] = field(default_factory=list)
    window_unavailable: list[str] = field(default_factory=list)

    def scope(self, scope: str, name: str = "") -> ScopeStats:
        for s in self.scopes:
            if s.scope == scope and (s.name == name or scope == "adapter"):
                return s
        raise KeyError((scope, name))

    @property
    def adapter(self) -> ScopeStats:
        return self.scope("adapter")


def scope_members(specs: Sequence[Any]) -> list[tuple[str, str, list[int]]]:
    """``(scope, name, module indices)`` of every pooled scope: projection types, layers, then the whole adapter."""
    projs = list(dict.fromkeys(s.proj for s in specs))
    layers = list(dict.fromkeys(s.layer for s in specs if s.layer is not None))
    out = [("proj", p, [i for i, s in enumerate(specs) if s.proj == p]) for p in projs]
    out += [("layer", str(lay), [i for i, s in enumerate(specs) if s.layer == lay]) for lay in layers]
    return [*out, ("adapter", "adapter", list(range(len(specs))))]


def run_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """The manifest fields a :class:`RunStats` keeps."""
    return {k: meta.get(k) for k in ("seed", "created", "complete", "dtype", "versions", "config", "status",
                                     "planned_steps", "stop_reason", "writer")}


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


def check_usable(where: Any, usable: Sequence[int], bad: Sequence[int]) -> None:
    """Raise unless at least 2 usable steps remain (naming the non-finite ones left out)."""
    if len(usable) < 2:
        note = f" ({len(bad)} non-finite step(s) excluded: {list(bad)[:10]})" if bad else ""
        raise GradlensError(f"{where}: {len(usable)} usable recorded step(s){note}; the analysis needs at least 2")


def unclip_scale(step_records: Sequence[dict[str, Any]], usable: Sequence[int]) -> np.ndarray:
    """``1 / clip_coef`` of each usable step (1 where the coefficient is missing, not finite or not positive)."""
    coef = {int(r["step"]): r.get("clip_coef") for r in step_records}
    return np.array([1.0 / c if isinstance(c, (int, float)) and math.isfinite(c) and c > 0 else 1.0
                     for c in (coef[s] for s in usable)])
