"""``compare``: the placement table. Base model, full-B LoRA, and sparse-B LoRA (A frozen, k entries of B trained)
with random and gradient-informed placements, under SFT and GRPO, over budgets and seeds.

The library behind ``gradlens compare`` (notebooks call :func:`compare` with a :class:`CompareConfig`). Per regime:

1. the base model's held-out accuracy;
2. a learning-rate sweep on ``sweep_seed`` (validation prompts held back from the training split, never the held-out
   ones): full-B LoRA over ``full_lrs``, each sparse method over ``sparse_lrs`` at each budget;
3. per seed: a probe (``probe_steps`` recorded steps, statistics only) that scores every B entry, full-B LoRA, and
   each method at each budget with its swept learning rate; every run is evaluated on the held-out prompts.

Each finished run is written at once (``placement.csv``, ``sweep.csv``), so a crash loses at most the run in
progress, and ``resume=True`` skips what is done.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradlens.config import INFORMED_METHODS, TOY_PREFIX, CompareConfig, ProbeConfig, RecordConfig
from gradlens.errors import GradlensError
from gradlens.provenance import package_versions
from gradlens.store import _atomic_write, _json_dump

PLACEMENT = "placement.csv"
SWEEP = "sweep.csv"
KEY = ("regime", "method", "budget", "seed", "lr")
CURVE_PROMPTS = 100


@dataclass
class CompareResult:
    """The raw rows (``placement``: held-out, ``sweep``: validation), the summary over seeds, where the informed
    entries sit, probe costs, accuracy curves, the printed finding and the output directory."""

    placement: pd.DataFrame
    sweep: pd.DataFrame
    summary: pd.DataFrame
    where: pd.DataFrame
    probes: pd.DataFrame
    curves: pd.DataFrame
    findings: str
    out: Path
    files: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class _Data:
    train: Any
    val: Any
    heldout: Any
    reward: Any


def _toy_data(config: CompareConfig) -> _Data:
    """The toy task's fixed split: training pairs minus ``n_val`` validation pairs, and the held-out pairs."""
    from gradlens.toy.presets import get_preset
    from gradlens.toy.task import AdditionTask, exact_match_reward

    task = AdditionTask(digits=get_preset(config.model[len(TOY_PREFIX) :]).digits)
    train = task.dataset("train")
    if config.n_val >= len(train) // 2:
        raise GradlensError(f"n_val={config.n_val} leaves too little training data ({len(train)} pairs)")
    if config.n_eval > task.n_heldout:
        raise GradlensError(f"n_eval must be <= {task.n_heldout} (the held-out split's size), got {config.n_eval}")
    n = len(train) - config.n_val
    return _Data(train=train.select(range(n)), val=train.select(range(n, len(train))),
                 heldout=task.dataset("heldout", config.n_eval), reward=exact_match_reward)


class _Table:
    """Rows of one CSV, rewritten atomically after every finished run; loaded back on resume."""

    def __init__(self, path: Path, resume: bool) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if resume and path.is_file():
            try:
                df = pd.read_csv(path, dtype={"budget": str})
                self.rows = df.assign(budget=df["budget"].fillna("")).to_dict("records")
            except (OSError, ValueError) as e:
                raise GradlensError(f"{path}: cannot read it to resume ({e})".splitlines()[0]) from e

    def find(self, **key: Any) -> dict[str, Any] | None:
        want = {k: str(v) for k, v in key.items()}
        return next((r for r in self.rows if all(str(r.get(k)) == v for k, v in want.items())), None)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        _atomic_write(self.path, lambda tmp: pd.DataFrame(self.rows).to_csv(tmp, index=False))

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)


def _accuracy_curve(model, tokenizer, data: _Data, every: int, sink: list[dict[str, Any]], tags: dict[str, Any]):
    """A TrainerCallback that appends greedy accuracy on the first held-out prompts every ``every`` steps."""
    from transformers import TrainerCallback

    from gradlens.evaluate import accuracy

    prompts = data.heldout["prompt"][:CURVE_PROMPTS]
    answers = data.heldout["answer"][:CURVE_PROMPTS]

    class AccuracyCurve(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % every == 0:
                acc = accuracy(kwargs["model"], tokenizer, prompts, answers, k=0)
                sink.append({**tags, "step": state.global_step, "accuracy": acc.greedy})

    return AccuracyCurve()


class _Runner:
    """Trains and evaluates one configuration at a time on a shared in-memory base model."""

    def __init__(self, config: CompareConfig, out: Path) -> None:
        from gradlens.record import load_model

        self.config = config
        self.out = out
        self.data = _toy_data(config)
        self.base, self.tokenizer = load_model(config.model, 0)
        self.curves: list[dict[str, Any]] = []
        self.shapes: dict[str, tuple[int, int]] = {}

    def record_config(self, regime: str, seed: int, lr: float | None, out: Path) -> RecordConfig:
        """The run as ``gradlens record`` would describe it; TRL extras that the regime's config lacks are dropped
        (``num_generations`` means nothing to SFT)."""
        from gradlens.regimes import config_fields

        c = self.config
        trl = {k: v for k, v in c.trl.items() if k in config_fields(regime)}
        return RecordConfig(regime=regime, out=str(out), model=c.model, max_steps=c.max_steps, seed=seed,
                            learning_rate=lr, n_train=len(self.data.train), lora_r=c.lora_r, trl=trl)

    def default_lr(self, regime: str) -> float:
        return float(self.record_config(regime, 0, None, self.out).trl_overrides()["learning_rate"])

    def evaluate(self, model, split: str, seed: int) -> dict[str, float]:
        from gradlens.evaluate import accuracy

        data = self.data.heldout if split == "heldout" else self.data.val
        k = self.config.eval_samples if split == "heldout" else 0
        acc = accuracy(model, self.tokenizer, data["prompt"], data["answer"], k=k, seed=seed)
        return {"accuracy": acc.greedy, "sampled_accuracy": acc.sampled, "pass_at_k": acc.pass_at_k,
                "n_prompts": acc.n}

    def train(self, regime: str, seed: int, lr: float, mask: dict[str, np.ndarray] | None,
              tags: dict[str, Any] | None = None):
        """(trained PeftModel, measured train seconds): full-B LoRA-FA, or sparse-B when ``mask`` is given."""
        from transformers import PrinterCallback, set_seed

        from gradlens.adapters import attach_lora
        from gradlens.placement.probe import train_runtime
        from gradlens.placement.sparse import SparseBCallback
        from gradlens.regimes import build_grpo_trainer, build_sft_trainer

        c = self.config
        overrides = {**self.record_config(regime, seed, lr, self.out).trl_overrides(), "disable_tqdm": True,
                     "logging_steps": c.max_steps}
        set_seed(seed)
        model = attach_lora(copy.deepcopy(self.base), r=c.lora_r, seed=seed)
        callbacks = [SparseBCallback(mask)] if mask is not None else []
        if tags is not None and c.curve_every:
            callbacks.append(_accuracy_curve(model, self.tokenizer, self.data, c.curve_every, self.curves, tags))
        with tempfile.TemporaryDirectory(prefix="gradlens-compare-") as tmp:
            if regime == "sft":
                trainer = build_sft_trainer(model, self.tokenizer, self.data.train, output_dir=tmp,
                                            overrides=overrides, callbacks=callbacks)
            else:
                trainer = build_grpo_trainer(model, self.tokenizer, self.data.train, self.data.reward,
                                             output_dir=tmp, overrides=overrides, callbacks=callbacks)
            trainer.remove_callback(PrinterCallback)
            trainer.train()
        return trainer.model, train_runtime(trainer)

    def probe(self, regime: str, seed: int, lr: float, methods: list[str]):
        """Masks of the informed ``methods`` for every budget from a probe of this seed (reused on resume)."""
        from gradlens.placement.masks import load_mask
        from gradlens.placement.probe import PROBE_FILE, probe

        c = self.config
        out = self.out / "probes" / f"{regime}-seed{seed}"
        if not (out / PROBE_FILE).is_file():
            if out.exists():  # an interrupted probe: its run is incomplete, start it again
                import shutil

                shutil.rmtree(out)
            rc = self.record_config(regime, seed, lr, out)
            fields = {k: v for k, v in asdict(rc).items() if k != "max_steps"}
            probe(ProbeConfig(**fields, max_steps=c.probe_steps, methods=methods, budgets=list(c.budgets),
                              scope=c.scope, train_steps=c.max_steps), progress=False)
        info = json.loads((out / PROBE_FILE).read_text())
        masks = {tuple(key.split("/", 1)): load_mask(path)[0] for key, path in info["masks"].items()}
        return masks, info


def _informed(methods: list[str]) -> list[str]:
    return [m for m in methods if m in INFORMED_METHODS]


def _jobs(config: CompareConfig) -> Iterator[tuple[str, str, int]]:
    """(regime, phase, count) of the work ahead, for the progress bar."""
    for regime in config.regimes:
        yield regime, "base", 1
        yield regime, "sweep", (len(config.full_lrs or []) if len(config.full_lrs or []) > 1 else 0) + (
            len(config.methods) * len(config.budgets) * len(config.sparse_lrs) if len(config.sparse_lrs) > 1 else 0)
        yield regime, "seeds", len(config.seeds) * (1 + len(config.methods) * len(config.budgets))


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


def compare(config: CompareConfig) -> CompareResult:
    """Run the placement comparison described by ``config`` and write its tables, plot and provenance."""
    with _quiet_library_bars():
        return _compare(config)


def _compare(config: CompareConfig) -> CompareResult:
    from tqdm.auto import tqdm

    from gradlens.placement.masks import Budget
    from gradlens.placement.selectors import select

    if not config.out:
        raise GradlensError("an output directory is required (--out OUT_DIR)")
    out = Path(config.out)
    if (out / PLACEMENT).exists() and not config.resume:
        raise GradlensError(f"{out} already holds a comparison; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    placement, sweep = _Table(out / PLACEMENT, config.resume), _Table(out / SWEEP, config.resume)
    _check_trl_fields(config)
    runner = _Runner(config, out)
    runner.shapes = _shapes(runner)
    for b in config.budgets:  # fail before any training on a budget the adapter cannot hold
        Budget.parse(b, config.scope).counts(runner.shapes)
    bar = tqdm(total=sum(n for *_, n in _jobs(config)), desc="gradlens compare", disable=not config.progress)
    budgets = [str(Budget.parse(b, config.scope)) for b in config.budgets]
    informed = _informed(config.methods)
    probe_rows: list[dict[str, Any]] = []
    where_rows: list[pd.DataFrame] = []

    def run_one(table: _Table, split: str, regime: str, method: str, budget: str, seed: int, lr: float,
                mask: dict[str, np.ndarray] | None, extra: dict[str, Any]) -> dict[str, Any]:
        key = {"regime": regime, "method": method, "budget": budget, "seed": seed, "lr": lr}
        done = table.find(**key)
        if done is None:
            tags = key if split == "heldout" else None
            if method == "base":
                model, seconds = runner.base, 0.0
            else:
                model, seconds = runner.train(regime, seed, lr, mask, tags)
            row = {**key, "steps": 0 if method == "base" else config.max_steps, "scope": config.scope,
                   "k": int(sum(int(m.sum()) for m in mask.values())) if mask is not None else None,
                   **runner.evaluate(model, split, seed), "train_seconds": seconds, **extra}
            if config.export and mask is not None and split == "heldout":
                from gradlens.placement.sparse import export_adapter

                export_adapter(model, out / "adapters" / regime / f"{method}-{_slug(budget)}-seed{seed}", mask,
                               {"selector": method, "budget": budget, "seed": seed, "lr": lr, "regime": regime})
            table.add(row)
            done = row
        bar.update(1)
        return done

    for regime in config.regimes:
        run_one(placement, "heldout", regime, "base", "", 0, 0.0, None, {})
        # Learning rates: swept on a separate seed and the validation prompts.
        full_lrs = config.full_lrs or [runner.default_lr(regime)]
        lr_of = {("full", ""): _best_lr(sweep, "val", regime, "full", "", config.sweep_seed, full_lrs, run_one,
                                        None)}
        sweep_masks: dict[str, dict[str, dict[str, np.ndarray]]] = {}
        if len(config.sparse_lrs) > 1:
            sweep_masks, _ = _seed_masks(runner, regime, config.sweep_seed, lr_of[("full", "")], config, budgets,
                                         select)
        for budget in budgets:  # a sparser mask wants a larger rate: one sweep per method and budget
            for method in config.methods:
                lr_of[(method, budget)] = _best_lr(sweep, "val", regime, method, budget, config.sweep_seed,
                                                   config.sparse_lrs, run_one, sweep_masks.get(budget, {}).get(method))
        for seed in config.seeds:
            full = run_one(placement, "heldout", regime, "full", "", seed, lr_of[("full", "")], None,
                           {"lr_swept": len(full_lrs) > 1})
            masks_by_budget, info = _seed_masks(runner, regime, seed, lr_of[("full", "")], config, budgets, select)
            cost = _probe_cost(info, full)
            probe_rows.append({"regime": regime, "seed": seed, **cost})
            for budget in budgets:
                for method in config.methods:
                    mask = masks_by_budget[budget][method]
                    run_one(placement, "heldout", regime, method, budget, seed, lr_of[(method, budget)], mask,
                            {"lr_swept": len(config.sparse_lrs) > 1})
                    if method in informed:
                        where_rows.append(_where(mask, regime, method, budget, seed))
    bar.close()
    result = _finish(config, out, placement.frame(), sweep.frame(), where_rows, probe_rows, runner.curves, started)
    return result


def _check_trl_fields(config: CompareConfig) -> None:
    from gradlens.regimes import config_fields

    known = set().union(*(config_fields(r) for r in config.regimes))
    unknown = sorted(set(config.trl) - known)
    if unknown:
        raise GradlensError(f"unknown TRL config field(s) for {'/'.join(config.regimes)}: {', '.join(unknown)}")


def _slug(budget: str) -> str:
    return budget.replace("%", "pct").replace("=", "")


def _best_lr(table: _Table, split: str, regime: str, method: str, budget: str, seed: int, lrs: list[float],
             run_one, mask) -> float:
    """The learning rate with the best validation accuracy (ties: the smaller rate); no runs for a single rate."""
    if len(lrs) == 1:
        return float(lrs[0])
    scores = [(run_one(table, split, regime, method, budget, seed, lr, mask, {})["accuracy"], -lr) for lr in lrs]
    return float(-max(scores)[1])


def _seed_masks(runner: _Runner, regime: str, seed: int, probe_lr: float, config: CompareConfig,
                budgets: list[str], select) -> tuple[dict[str, dict[str, dict[str, np.ndarray]]], dict[str, Any]]:
    """``masks[budget][method]`` for one seed: informed ones from this seed's probe, the rest drawn with the seed."""
    from gradlens.placement.masks import Budget

    informed = _informed(config.methods)
    probed, info = runner.probe(regime, seed, probe_lr, informed) if informed else ({}, {})
    masks: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for budget in budgets:
        b = Budget.parse(budget, config.scope)
        masks[budget] = {m: probed[(m, budget)] for m in informed}
        for m in config.methods:
            if m in informed:
                continue
            reference = masks[budget][informed[0]] if m == "random_matched" else None
            masks[budget][m] = select(m, b, runner.shapes, seed=seed, reference=reference)
    return masks, info


def _shapes(runner: _Runner) -> dict[str, tuple[int, int]]:
    """LoRA-B shapes of the compared adapter, from a throwaway attachment to a copy of the base model."""
    from gradlens.adapters import attach_lora, lora_b_parameters

    model = attach_lora(copy.deepcopy(runner.base), r=runner.config.lora_r)
    return {name: tuple(p.shape) for name, p in lora_b_parameters(model)}


def _probe_cost(info: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    """The probe's cost against the measured full-B LoRA run of the same seed (steps and seconds)."""
    from gradlens.placement.probe import probe_cost

    if not info:
        return {}
    cost = probe_cost(info["steps"], info["train_seconds"], int(full["steps"]), float(full["train_seconds"]))
    slowest = max(info["scoring_seconds"].values(), default=0.0)
    return {**cost, "scoring_seconds_max": slowest}


def _where(mask: dict[str, np.ndarray], regime: str, method: str, budget: str, seed: int) -> pd.DataFrame:
    from gradlens.placement.masks import where_table
    from gradlens.store import ModuleSpec

    specs = [ModuleSpec.from_name(name, m.shape) for name, m in mask.items()]
    df = where_table(mask, specs)
    df.insert(0, "seed", seed)
    df.insert(0, "budget", budget)
    df.insert(0, "method", method)
    df.insert(0, "regime", regime)
    return df


def summarize(placement: pd.DataFrame) -> pd.DataFrame:
    """Mean held-out accuracy per (regime, method, budget) with a 95% t-interval over seeds, and the share of the
    full-LoRA gain over the base model that the method recovers."""
    from scipy import stats

    rows = []
    for (regime, method, budget), g in placement.groupby(["regime", "method", "budget"], sort=False):
        n = len(g)
        mean, sd = g["accuracy"].mean(), g["accuracy"].std(ddof=1) if n > 1 else float("nan")
        half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")
        full = placement[(placement.regime == regime) & (placement.method == "full")]["accuracy"].mean()
        base = placement[(placement.regime == regime) & (placement.method == "base")]["accuracy"].mean()
        gain = full - base
        rows.append({"regime": regime, "method": method, "budget": budget, "n_seeds": n, "accuracy_mean": mean,
                     "ci95_lo": mean - half, "ci95_hi": mean + half,
                     "sampled_accuracy_mean": g["sampled_accuracy"].mean(), "lr": g["lr"].iloc[0],
                     "steps": int(g["steps"].iloc[0]), "k": g["k"].iloc[0],
                     "gain_recovered": (mean - base) / gain if abs(gain) > 1e-12 else float("nan")})
    return pd.DataFrame(rows)


def findings(summary: pd.DataFrame, probes: pd.DataFrame) -> str:
    """The comparison in a few sentences: per regime and budget, random against the best informed method."""
    lines = []
    for regime, g in summary.groupby("regime", sort=False):
        base = g[g.method == "base"].accuracy_mean.iloc[0]
        full = g[g.method == "full"]
        lines.append(f"{regime.upper()}: base {base:.3f}, full-B LoRA {_ci(full.iloc[0])}")
        for budget, gb in g[~g.method.isin(["base", "full"])].groupby("budget", sort=False):
            parts = [f"{r.method} {_ci(r)} ({_pct(r.gain_recovered)} of the gain)" for r in gb.itertuples()]
            lines.append(f"  {budget}: " + "; ".join(parts))
            informed = gb[gb.method.isin(INFORMED_METHODS)]
            rand = gb[gb.method == "random"]
            if len(informed) and len(rand):
                best = informed.loc[informed.accuracy_mean.idxmax()]
                r = rand.iloc[0]
                overlap = not (best.ci95_lo > r.ci95_hi or r.ci95_lo > best.ci95_hi)
                verdict = "intervals overlap" if overlap else "intervals do not overlap"
                diff = best.accuracy_mean - r.accuracy_mean
                lines.append(f"    best informed ({best.method}) - random = {diff:+.3f} ({verdict})")
    if len(probes) and "fraction_steps" in probes:
        for regime, p in probes.groupby("regime", sort=False):
            lines.append(f"{regime.upper()} probe: {p.probe_steps.iloc[0]} steps, {p.probe_seconds.mean():.1f} s "
                         f"= {100 * p.fraction_steps.mean():.1f}% of the run in steps, "
                         f"{100 * p.fraction_seconds.mean():.1f}% in measured seconds")
    return "\n".join(lines)


def _ci(r: Any) -> str:
    lo, hi = (r["ci95_lo"], r["ci95_hi"]) if isinstance(r, pd.Series) else (r.ci95_lo, r.ci95_hi)
    mean = r["accuracy_mean"] if isinstance(r, pd.Series) else r.accuracy_mean
    return f"{mean:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else "")


def _pct(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{100 * x:.0f}%"


def _finish(config: CompareConfig, out: Path, placement: pd.DataFrame, sweep: pd.DataFrame,
            where_rows: list[pd.DataFrame], probe_rows: list[dict[str, Any]], curves: list[dict[str, Any]],
            started: float) -> CompareResult:
    """Summary, where/probe/curve tables, the plot, provenance and the finding."""
    from gradlens.figures import placement_plot

    placement = placement.copy()
    placement["k"] = placement["k"].astype("Int64")
    full_of = placement[placement["method"] == "full"].set_index(["regime", "seed"])["accuracy"]
    base_of = placement[placement["method"] == "base"].set_index("regime")["accuracy"]
    placement["base_accuracy"] = placement["regime"].map(base_of)
    placement["full_lora_accuracy"] = [full_of.get((r, s), float("nan"))
                                       for r, s in zip(placement["regime"], placement["seed"], strict=True)]
    if len(placement):
        _atomic_write(out / PLACEMENT, lambda tmp: placement.to_csv(tmp, index=False))
    summary = summarize(placement)
    where = pd.concat(where_rows, ignore_index=True) if where_rows else pd.DataFrame()
    probes = pd.DataFrame(probe_rows)
    curve_df = pd.DataFrame(curves)
    files = [out / PLACEMENT, out / SWEEP]
    for name, df in (("summary", summary), ("where", where), ("probes", probes), ("curves", curve_df)):
        if len(df):
            _atomic_write(out / f"{name}.csv", lambda tmp, df=df: df.to_csv(tmp, index=False))
            files.append(out / f"{name}.csv")
    prov = {"tool": "gradlens compare", "config": asdict(config), "versions": package_versions()}
    files.append(placement_plot(summary, out / "placement.png", prov))
    text = findings(summary, probes)
    _json_dump({**prov, "seconds": time.time() - started, "files": [f.name for f in files], "findings": text},
               out / "provenance.json")
    files.append(out / "provenance.json")
    return CompareResult(placement=placement, sweep=sweep, summary=summary, where=where, probes=probes,
                         curves=curve_df, findings=text, out=out, files=files)
