"""``compare``: the placement table. Base model, full-B LoRA, and sparse-B LoRA (A frozen, k entries of B trained)
with random and gradient-informed placements, under SFT and GRPO, over budgets and seeds, on any model and task.

The library behind ``gradlens compare`` (notebooks call :func:`compare` with a :class:`CompareConfig`). Per regime:

1. the base model's held-out accuracy;
2. a learning-rate sweep on ``sweep_seeds``, scored by the mean validation accuracy over those seeds on prompts held
   back from the task's train split (never the held-out ones): full-B LoRA over ``full_lrs``, each sparse method
   over ``sparse_lrs`` at each budget. A best rate at an edge of its grid extends the grid by a factor of 3 on that
   side (at most ``grid_extensions`` times), and the console and provenance say so;
3. per seed: a probe (``probe_steps`` recorded steps, statistics only) that scores every B entry, full-B LoRA, and
   each method at each budget with its swept learning rate; every run is evaluated on the task's eval split.

A run whose loss or weights become non-finite, or whose accuracy falls more than ``divergence_margin`` below the
base model's, is marked ``diverged``: the summary counts it and leaves it out of the means. Methods of one seed share
its probe, LoRA init and data order, so informed minus random is reported as a paired difference over seeds.

Each finished run is written at once (``placement.csv``, ``sweep.csv``), so a crash loses at most the run in
progress, and ``resume=True`` skips what is done.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradlens.compare.tables import (
    PLACEMENT,
    SWEEP,
    Table,
    findings,
    paired_differences,
    space_lines,
    space_table,
    summarize,
    where_rows,
    with_references,
)
from gradlens.config import INFORMED_METHODS, CompareConfig
from gradlens.errors import GradlensError
from gradlens.fsio import atomic_write, json_dump
from gradlens.provenance import package_versions

Masks = dict[str, dict[str, dict[str, np.ndarray]]]  # masks[budget][method]
GRID_FACTOR = 3.0


@dataclass
class CompareResult:
    """The raw rows (``placement``: held-out, ``sweep``: validation), the summary over seeds, where the informed
    entries sit, probe costs, accuracy curves, the printed finding and the output directory."""

    placement: pd.DataFrame
    sweep: pd.DataFrame
    summary: pd.DataFrame
    paired: pd.DataFrame
    where: pd.DataFrame
    probes: pd.DataFrame
    curves: pd.DataFrame
    findings: str
    out: Path
    files: list[Path] = field(default_factory=list)


def _informed(methods: list[str]) -> list[str]:
    return [m for m in methods if m in INFORMED_METHODS]


def _jobs(config: CompareConfig) -> int:
    """The number of runs ahead, for the progress bar (count-matched weight budgets come on top)."""
    per_regime = 1 + len(config.seeds) * (1 + len(config.methods) * len(config.budgets))
    n_sweep = len(config.sweep_seeds)
    if len(config.full_lrs or []) > 1:
        per_regime += len(config.full_lrs) * n_sweep
    if len(config.sparse_lrs) > 1:
        per_regime += len(config.methods) * len(config.budgets) * len(config.sparse_lrs) * n_sweep
    return len(config.space) * len(config.regimes) * per_regime


@contextlib.contextmanager
def _quiet_library_bars() -> Iterator[None]:
    """Hide the per-run dataset and weight-loading bars of datasets/transformers (compare has its own bar) and a
    deprecation warning that transformers raises from its own code on every run."""
    import datasets
    from transformers.utils import logging

    ds_off, tf_on = datasets.are_progress_bars_disabled(), logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():  # transformers 5.x warns about its own deprecated call on every run
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        if not ds_off:
            datasets.enable_progress_bars()
        if tf_on:
            logging.enable_progress_bar()


class Comparison:
    """One comparison in progress: the runner that trains, the two tables, and what each seed's probe produced."""

    def __init__(self, config: CompareConfig, out: Path) -> None:
        from tqdm.auto import tqdm

        from gradlens.budget import Budget
        from gradlens.compare.runs import CompareRuns

        self.config = config
        self.out = out
        self.placement = Table(out / PLACEMENT, config.resume)
        self.sweep = Table(out / SWEEP, config.resume)
        self.runner = CompareRuns(config, out)
        for space in config.space:  # fail before any training on a budget a space cannot hold
            for b in config.budgets:
                Budget.parse(b, config.scope).counts(self.runner.shapes[space])
        self.budgets = [str(Budget.parse(b, config.scope)) for b in config.budgets]
        self.matched = matched_budgets(self.budgets, config.scope, self.runner.shapes) if set(config.space) == {
            "lora_b", "weight"} else {}
        self.informed = _informed(config.methods)
        self.probe_rows: list[dict[str, Any]] = []
        self.where: list[pd.DataFrame] = []
        self.notes: list[str] = []
        self.chosen: list[dict[str, Any]] = []  # the placement rows of this configuration, in the order they ran
        self.bar = tqdm(total=_jobs(config), desc="gradlens compare", unit="run", disable=not config.progress)

    def space_budgets(self, space: str) -> list[str]:
        """The budgets a space trains: the given ones, and for ``weight`` beside ``lora_b`` also lora_b's counts."""
        return self.budgets + [b for b in self.matched if space == "weight"]

    def run_one(self, table: Table, split: str, regime: str, method: str, budget: str, seed: int, lr: float,
                mask: dict[str, np.ndarray] | None, extra: dict[str, Any] | None = None,
                space: str = "lora_b") -> dict[str, Any]:
        """Train (unless ``base``) and evaluate one configuration, or take its row from a resumed table."""
        key = {"space": space, "regime": regime, "method": method, "budget": budget, "seed": seed, "lr": lr}
        done = table.find(**key)
        if done is None:
            done = self._train_and_evaluate(table, split, key, mask, extra or {})
        if table is self.placement:
            self.chosen.append(done)
        self.bar.update(1)
        self.bar.set_postfix_str(f"{space} {regime} {method} {budget} seed {seed}".replace("  ", " "))
        return done

    def _train_and_evaluate(self, table: Table, split: str, key: dict[str, Any], mask: dict[str, np.ndarray] | None,
                            extra: dict[str, Any]) -> dict[str, Any]:
        c, runner = self.config, self.runner
        regime, method, seed, space = key["regime"], key["method"], key["seed"], key["space"]
        if method == "base":
            model, seconds, finite = runner.base.model, 0.0, True
        else:
            tags = key if split == "heldout" else None
            model, seconds, finite = runner.train_run(regime, seed, key["lr"], mask, tags, space)
        row = {**key, "steps": 0 if method == "base" else c.max_steps, "scope": c.scope,
               "k": int(sum(int(m.sum()) for m in mask.values())) if mask is not None else None,
               "entries": sum(d * n for d, n in runner.shapes[space].values()),
               **runner.evaluate(model, split, seed), "train_seconds": seconds, **extra}
        row["diverged"] = method != "base" and (
            not finite or row["accuracy"] < runner.base_accuracy(split) - c.divergence_margin)
        if row["diverged"]:
            why = "non-finite loss or weights" if not finite else (
                f"accuracy {row['accuracy']:.3f} below the base model's {runner.base_accuracy(split):.3f} "
                f"- margin {c.divergence_margin:g}")
            self.notes.append(f"{space} {regime} {method} {key['budget'] or 'full'} seed {seed} lr {key['lr']:g} "
                              f"diverged ({why}) on {split}")
        if c.export and mask is not None and split == "heldout" and space == "weight":
            slug = key["budget"].replace("%", "pct").replace("=", "")
            runner.export_delta(model, mask, self.out / "adapters" / "weight" / regime / f"{method}-{slug}-seed{seed}",
                                {"selector": method, "budget": key["budget"], "seed": seed, "lr": key["lr"],
                                 "regime": regime, "model": c.model})
        elif c.export and mask is not None and split == "heldout":
            from gradlens.lora import default_alpha
            from gradlens.sparse.export import export_adapter

            slug = key["budget"].replace("%", "pct").replace("=", "")
            export_adapter(model, self.out / "adapters" / regime / f"{method}-{slug}-seed{seed}", mask,
                           {"selector": method, "budget": key["budget"], "seed": seed, "lr": key["lr"],
                            "regime": regime, "model": c.model, "lora_r": c.lora_r,
                            "lora_alpha": default_alpha(c.lora_r, c.lora_alpha),
                            "lora_seed": seed})
        table.add(row)
        return row

    def _sweep_score(self, regime: str, method: str, budget: str, lr: float,
                     masks: dict[int, dict[str, np.ndarray] | None], space: str) -> float:
        """Mean validation accuracy of one rate over the sweep seeds; -inf if any of them diverged."""
        rows = [self.run_one(self.sweep, "val", regime, method, budget, seed, lr, masks.get(seed), space=space)
                for seed in self.config.sweep_seeds]
        if any(str(r.get("diverged")) == "True" for r in rows):
            return -np.inf
        return float(np.mean([r["accuracy"] for r in rows]))

    def best_lr(self, regime: str, method: str, budget: str, lrs: list[float],
                masks: dict[int, dict[str, np.ndarray] | None], space: str = "lora_b") -> float:
        """The swept rate of one method and budget (see :func:`sweep_rates`); no runs for a single rate."""
        if len(lrs) == 1:
            return float(lrs[0])

        def score(lr: float) -> float:
            if lr not in lrs:  # an extension of the grid: more runs than the bar planned
                self.bar.total += len(self.config.sweep_seeds)
            return self._sweep_score(regime, method, budget, lr, masks, space)

        best, notes = sweep_rates(lrs, score, self.config.grid_extensions)
        self.notes += [f"{space} {regime} {method} {budget or 'full'}: {n}" for n in notes]
        return best

    def seed_masks(self, regime: str, seed: int, probe_lr: float,
                   space: str = "lora_b") -> tuple[Masks, dict[str, Any]]:
        """``masks[budget][method]`` for one seed: informed ones from this seed's probe, the rest drawn with the
        seed (``random_matched`` copies the first informed mask's per-module counts)."""
        from gradlens.budget import Budget
        from gradlens.placement.selectors import select

        budgets = self.space_budgets(space)
        probed, info = self.runner.probe(regime, seed, probe_lr, self.informed, budgets, space) if self.informed else (
            {}, {})
        masks: Masks = {}
        for budget in budgets:
            b = Budget.parse(budget, self.config.scope)
            masks[budget] = {m: probed[(m, budget)] for m in self.informed}
            for m in self.config.methods:
                if m not in self.informed:
                    reference = masks[budget][self.informed[0]] if m == "random_matched" else None
                    masks[budget][m] = select(m, b, self.runner.shapes[space], seed=seed, reference=reference)
        return masks, info

    def regime(self, regime: str, space: str = "lora_b") -> None:
        """Base, the sweeps, then every seed's full and sparse runs of one regime in one space."""
        c = self.config
        budgets = self.space_budgets(space)
        self.run_one(self.placement, "heldout", regime, "base", "", 0, 0.0, None, space=space)
        full_lrs = c.full_lrs or [self.runner.default_lr(regime)]
        if len(full_lrs) > 1 or len(c.sparse_lrs) > 1:  # the sweep's yardstick, said where its verdicts are read
            self.notes.append(f"{regime}: the base model's accuracy on the validation prompts the rates are swept on "
                              f"is {self.runner.base_accuracy('val'):.3f}")
        lr_of = {("full", ""): self.best_lr(regime, "full", "", full_lrs, {}, space)}
        sweep_masks: dict[int, Masks] = {}
        if len(c.sparse_lrs) > 1:
            sweep_masks = {seed: self.seed_masks(regime, seed, lr_of[("full", "")], space)[0]
                           for seed in c.sweep_seeds}
        for budget in budgets:  # a sparser mask wants a larger rate: one sweep per method and budget
            for method in c.methods:
                masks = {seed: m[budget][method] for seed, m in sweep_masks.items()}
                lr_of[(method, budget)] = self.best_lr(regime, method, budget, c.sparse_lrs, masks, space)
        for seed in c.seeds:
            full = self.run_one(self.placement, "heldout", regime, "full", "", seed, lr_of[("full", "")], None,
                                {"lr_swept": len(full_lrs) > 1}, space)
            masks, info = self.seed_masks(regime, seed, lr_of[("full", "")], space)
            self.probe_rows.append({"space": space, "regime": regime, "seed": seed, **_probe_cost(info, full)})
            for budget in budgets:
                for method in c.methods:
                    mask = masks[budget][method]
                    self.run_one(self.placement, "heldout", regime, method, budget, seed, lr_of[(method, budget)],
                                 mask, {"lr_swept": len(c.sparse_lrs) > 1, "lora_b_budget": self.matched.get(budget,
                                                                                                       "")}, space)
                    if method in self.informed:
                        self.where.append(where_rows(mask, regime, method, budget, seed, space))


def matched_budgets(budgets: list[str], scope: str, shapes: dict[str, Any]) -> dict[str, str]:
    """``{weight budget: lora_b budget}``: for each share budget, the weight-space budget of the same count of
    trainable entries as lora_b holds at that share (a count budget is already the same count in both spaces)."""
    from gradlens.budget import Budget

    matched = {}
    for text in budgets:
        budget = Budget.parse(text, scope)
        if budget.fraction is None:
            continue
        counts = budget.counts(shapes["lora_b"])
        k = counts if isinstance(counts, int) else sum(counts.values())
        label = str(Budget(k=k, scope=scope))
        if label not in budgets:
            matched[label] = text
    return matched


def sweep_rates(lrs: list[float], score: Callable[[float], float], extensions: int) -> tuple[float, list[str]]:
    """(best rate, notes): the rate of ``lrs`` with the highest ``score`` (ties: the smaller). While the best sits at
    an edge of the grid and ``extensions`` remain, the grid grows on that side by a factor of 3 and is scored again;
    each extension, and a grid where every rate scored -inf (diverged), is noted."""
    grid, scores, notes = sorted(float(lr) for lr in lrs), {}, []
    for extension in range(extensions + 1):
        for lr in grid:
            if lr not in scores:
                scores[lr] = score(lr)
        best = max(grid, key=lambda lr: (scores[lr], -lr))
        edge = "top" if best == grid[-1] else "bottom" if best == grid[0] else None
        if edge is None or not np.isfinite(scores[best]) or extension == extensions:
            break
        new = float(f"{(best * GRID_FACTOR if edge == 'top' else best / GRID_FACTOR):.3g}")
        grid = [*grid, new] if edge == "top" else [new, *grid]
        notes.append(f"best rate {best:g} sat at the {edge} of the grid; extended it with {new:g}")
    if not np.isfinite(scores[best]):
        notes.append(f"every swept rate diverged; using the smallest, {best:g}")
    elif edge is not None and len(grid) > 1:
        notes.append(f"best rate {best:g} still sits at the {edge} of the grid {', '.join(f'{g:g}' for g in grid)}")
    return best, notes


def compare(config: CompareConfig) -> CompareResult:
    """Run the placement comparison described by ``config`` and write its tables, plot and provenance."""
    out = Path(config.out)
    if (out / PLACEMENT).exists() and not config.resume:
        raise GradlensError(f"{out} already holds a comparison; pass --resume to continue it or choose another --out")
    _check_trl_fields(config)
    with _quiet_library_bars():
        out.mkdir(parents=True, exist_ok=True)
        started = time.time()
        comparison = Comparison(config, out)
        try:
            for space in config.space:
                for regime in config.regimes:
                    comparison.regime(regime, space)
        finally:
            comparison.bar.close()
        # Only this configuration's runs: a resumed table can also hold runs at rates a grown grid no longer picks
        return write_results(config, out, pd.DataFrame(comparison.chosen), comparison.sweep.frame(), comparison.where,
                             comparison.probe_rows, comparison.runner.curves, time.time() - started,
                             comparison.runner.task.describe(), comparison.notes)


def _check_trl_fields(config: CompareConfig) -> None:
    """Refuse, before any model is loaded, TRL extras that no compared regime's config has, and values of the wrong
    type for a regime that has the field."""
    from gradlens.training.settings import check_overrides, config_fields

    known = set().union(*(config_fields(r) for r in config.regimes))
    unknown = sorted(set(config.trl) - known)
    if unknown:
        raise GradlensError(f"unknown TRL config field(s) for {'/'.join(config.regimes)}: {', '.join(unknown)}")
    for regime in config.regimes:
        check_overrides(regime, {k: v for k, v in config.trl.items() if k in config_fields(regime)})


def _probe_cost(info: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    """The probe's cost against the measured full-B LoRA run of the same seed (steps and seconds)."""
    from gradlens.placement.probe import probe_cost

    if not info:
        return {}
    cost = probe_cost(info["steps"], info["train_seconds"], int(full["steps"]), float(full["train_seconds"]))
    return {**cost, "scoring_seconds_max": max(info["scoring_seconds"].values(), default=0.0)}


def write_results(config: CompareConfig, out: Path, placement: pd.DataFrame, sweep: pd.DataFrame,
                  where: list[pd.DataFrame], probe_rows: list[dict[str, Any]], curves: list[dict[str, Any]],
                  seconds: float, task: dict[str, Any] | None = None, notes: list[str] | None = None
                  ) -> CompareResult:
    """Write a comparison's outputs from its rows: placement (with base and full-B references), summary, where,
    probe and curve tables, the plot, provenance (with the task) and the finding."""
    from gradlens.compare.plot import placement_plot

    placement = with_references(placement)
    spaces = space_table(placement) if len(placement) else pd.DataFrame()
    if len(placement):
        atomic_write(out / PLACEMENT, lambda tmp: placement.to_csv(tmp, index=False))
    summary = summarize(placement)
    paired = paired_differences(placement) if len(placement) else pd.DataFrame()
    where_df = pd.concat(where, ignore_index=True) if where else pd.DataFrame()
    probes, curve_df = pd.DataFrame(probe_rows), pd.DataFrame(curves)
    files = [f for f in (out / PLACEMENT, out / SWEEP) if f.is_file()]  # no sweep.csv when no rate was swept
    for name, df in (("summary", summary), ("paired", paired), ("spaces", spaces), ("where", where_df),
                     ("probes", probes), ("curves", curve_df)):
        if len(df):
            atomic_write(out / f"{name}.csv", lambda tmp, df=df: df.to_csv(tmp, index=False))
            files.append(out / f"{name}.csv")
    prov = {"tool": "gradlens compare", "config": asdict(config), "task": task, "notes": list(notes or []),
            "diverged_runs": int(placement["diverged"].fillna(False).astype(bool).sum())
            if "diverged" in placement else 0, "versions": package_versions()}
    files.append(placement_plot(summary, out / "placement.png", prov))
    text = "\n".join([findings(summary, probes, paired), *space_lines(spaces),
                      *(f"note: {n}" for n in notes or [])])
    json_dump({**prov, "seconds": seconds, "files": [f.name for f in files], "findings": text},
              out / "provenance.json")
    files.append(out / "provenance.json")
    return CompareResult(placement=placement, sweep=sweep, summary=summary, paired=paired, where=where_df,
                         probes=probes, curves=curve_df, findings=text, out=out, files=files)
