"""The placement claim against its rivals, measured: where informed placement beats random (the phase diagram), what
``gradlens diagnose`` predicts for the same cells, and the statistics the rival explanations turn on.

- **Phase diagram** (:func:`run_phase`): per cell (model x run length x space), one :func:`gradlens.compare.compare`
  of random against an informed selector over budgets, both regimes; the worlds are the models (``toy:small``,
  ``toy:wide`` on addition, ``toy:math`` on its word problems, each on its own task), the space is ``lora_b`` (B of
  LoRA-FA) or ``weight`` (the base weights W); the gap is informed minus random as a share of
  the same seed's full-LoRA gain, paired per seed (:func:`gap_table`), next to ``diagnose``'s prediction from each
  seed's probe (:func:`prediction_table`) and their rank correlation across cells (:func:`agreement`).
- **Rank** (:func:`rank_table`): per-step effective rank of each G_t (the measure of arXiv 2606.29238) and the
  trajectory rank (the seed paper's), each next to its value for Gaussian gradients of the same shapes and steps.
- **Update sparsity** (:func:`update_sparsity`): the share of a trained full-B adapter's entries that moved by more
  than a tolerance (as in Mukherjee et al. 2025; B starts at zero, so a move is ``|B|``).
- **Persistence** (:func:`persistence`): whether a probe's top-k is the top-k of the whole run (Jaccard and share).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradlens.budget import Budget
from gradlens.compare.tables import gain_shares, t_interval
from gradlens.config import CompareConfig
from gradlens.errors import GradlensError
from gradlens.fsio import atomic_write, json_dump

PHASE_BUDGETS = ["0.03%", "0.1%", "0.3%", "1%", "3%", "10%"]
GAP_AXIS = (-1.0, 1.5)
WRONG_AT = 0.5  # a prediction is wrong when it puts random on the other side of half of informed's gain


@dataclass
class PhaseConfig:
    """The phase diagram: every width at ``steps[0]``, and ``widths[0]`` also at the other run lengths, in every
    space. ``task`` None: each model's own task (addition for toy:small and toy:wide, word problems for toy:math)."""

    out: str
    widths: list[str] = field(default_factory=lambda: ["toy:small", "toy:wide"])
    task: str | None = None
    spaces: list[str] = field(default_factory=lambda: ["lora_b"])
    steps: list[int] = field(default_factory=lambda: [60, 240])
    regimes: list[str] = field(default_factory=lambda: ["sft", "grpo"])
    budgets: list[str] = field(default_factory=lambda: list(PHASE_BUDGETS))
    method: str = "sign"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    probe_steps: int = 16
    full_lrs: list[float] | None = field(default_factory=lambda: [1e-3, 3e-3, 1e-2])
    sparse_lrs: list[float] = field(default_factory=lambda: [1e-2, 3e-2, 1e-1, 3e-1])
    sweep_seeds: list[int] = field(default_factory=lambda: [1000, 1001])
    grid_extensions: int = 2
    n_val: int = 200
    n_eval: int = 400
    eval_samples: int = 0
    trl: dict[str, Any] = field(default_factory=dict)
    resume: bool = False
    progress: bool = True

    def cells(self) -> list[tuple[str, int]]:
        return [(self.widths[0], s) for s in self.steps] + [(w, self.steps[0]) for w in self.widths[1:]]

    def compare_config(self, model: str, steps: int, regime: str, out: Path, space: str = "lora_b") -> CompareConfig:
        """One cell's comparison: one regime, so regimes can run as separate processes into one ``out``; TRL extras
        that the regime's config lacks (``num_generations`` for SFT) are left out."""
        from gradlens.training.settings import config_fields

        trl = {k: v for k, v in self.trl.items() if k in config_fields(regime)}
        return CompareConfig(out=str(out), model=model, task=self.task, max_steps=steps, regimes=[regime],
                             space=[space], methods=["random", self.method], budgets=list(self.budgets),
                             seeds=list(self.seeds),
                             probe_steps=self.probe_steps, full_lrs=self.full_lrs, sparse_lrs=list(self.sparse_lrs),
                             sweep_seeds=list(self.sweep_seeds), grid_extensions=self.grid_extensions,
                             n_val=self.n_val, n_eval=self.n_eval, eval_samples=self.eval_samples, export=False,
                             resume=self.resume and (out / "placement.csv").is_file(), progress=self.progress,
                             trl=trl)


def cell_name(model: str, steps: int, space: str = "lora_b") -> str:
    """``toy-small-60steps``; a weight-space cell ends in ``-weight`` (lora_b cells keep the names they had)."""
    return f"{model.replace(':', '-').replace('/', '-')}-{steps}steps" + ("" if space == "lora_b" else f"-{space}")


def cell_dir(out: Path, model: str, steps: int, regime: str, space: str = "lora_b") -> Path:
    return out / f"{cell_name(model, steps, space)}-{regime}"


def budget_share(budget: str, entries: int) -> float:
    """A budget as a share of all entries of the space (a count divided by ``entries``)."""
    b = Budget.parse(str(budget))
    return b.fraction if b.fraction is not None else b.k / entries


def gap_table(placement: pd.DataFrame, method: str = "sign", baseline: str = "random") -> pd.DataFrame:
    """Per regime and budget: the per-seed gap ``share(method) - share(baseline)``, each share the run's part of the
    same seed's full-LoRA gain over the base model; mean and 95% t-interval over seeds where neither run (nor the
    seed's full-LoRA run) diverged, and each method's mean share."""
    share = gain_shares(placement)
    diverged = placement["diverged"].fillna(False).astype(bool) if "diverged" in placement else False
    df = placement.assign(share=share.where(~diverged))
    rows = []
    for (regime, budget), g in df[df["method"].isin([method, baseline])].groupby(["regime", "budget"], sort=False):
        wide = g.drop_duplicates(["seed", "method"]).set_index(["seed", "method"])["share"].unstack()
        wide = wide.reindex(columns=[method, baseline])  # a seed with a NaN share (diverged) stays, to be counted
        pairs = wide.dropna()
        mean, lo, hi = t_interval(pairs[method] - pairs[baseline])
        inf_share, rnd_share = float(pairs[method].mean()), float(pairs[baseline].mean())
        rows.append({"regime": regime, "budget": budget, "n_pairs": len(pairs),
                     "n_excluded": len(wide) - len(pairs), "gap": mean, "gap_lo": lo, "gap_hi": hi,
                     f"share_{method}": inf_share, f"share_{baseline}": rnd_share,
                     "measured_recovery": rnd_share / inf_share if inf_share > 0 else math.nan,
                     "k": int(g["k"].dropna().iloc[0]) if g["k"].notna().any() else None})
    return pd.DataFrame(rows)


def prediction_table(probes: dict[tuple[str, int], Path], budgets: Sequence[str], method: str,
                     train_steps: int) -> pd.DataFrame:
    """``gradlens diagnose`` of each (regime, seed) probe directory: per regime and budget the mean over seeds of
    ``recovery`` (random's predicted share of ``method``'s gain), ``recovery_run`` (over ``train_steps``) and the
    drifts behind them."""
    from gradlens.placement.diagnose import diagnose

    rows = []
    for (regime, seed), path in probes.items():
        result = diagnose(path, list(budgets), methods=[method], train_steps=train_steps)
        for r in result.rows:
            rows.append({"regime": regime, "seed": seed, "budget": r["budget"], "entries": r["entries"],
                         **{k: r[k] for k in ("recovery", "recovery_run", "drift_top", "drift_random",
                                              "drift_null")}})
    df = pd.DataFrame(rows)
    return df.groupby(["regime", "budget"], sort=False).agg(
        entries=("entries", "first"), n_probes=("seed", "size"), predicted_recovery=("recovery", "mean"),
        predicted_recovery_run=("recovery_run", "mean"), drift_top=("drift_top", "mean"),
        drift_random=("drift_random", "mean"), drift_null=("drift_null", "mean")).reset_index()


def agreement(cells: pd.DataFrame) -> dict[str, Any]:
    """Spearman rank correlation, across cells, of the predicted and measured recovery (random's share of informed's
    gain), for both readings of the prediction; and the cells the prediction gets wrong: those where it and the
    measurement fall on opposite sides of :data:`WRONG_AT`."""
    from scipy.stats import spearmanr

    out: dict[str, Any] = {"cells": len(cells), "wrong_at": WRONG_AT}
    ok = cells.dropna(subset=["measured_recovery", "predicted_recovery"])
    for column in ("predicted_recovery", "predicted_recovery_run"):
        sub = ok.dropna(subset=[column])
        if len(sub) >= 3 and sub[column].nunique() > 1 and sub["measured_recovery"].nunique() > 1:
            rho, p = spearmanr(sub[column], sub["measured_recovery"])
            out[f"spearman_{column}"] = {"rho": float(rho), "p": float(p), "n": len(sub)}
        else:
            out[f"spearman_{column}"] = {"rho": math.nan, "p": math.nan, "n": len(sub)}
    wrong = ok[(ok["predicted_recovery"] < WRONG_AT) != (ok["measured_recovery"] < WRONG_AT)]
    out["wrong"] = wrong[["cell", "regime", "budget", "predicted_recovery", "measured_recovery", "gap", "gap_lo",
                          "gap_hi"]].to_dict("records")
    return out


def cell_tables(out: Path, model: str, steps: int, budgets: Sequence[str], method: str,
                space: str = "lora_b") -> pd.DataFrame:
    """The measured gap and the prediction of one finished cell, merged (one row per regime and budget)."""
    placement = pd.read_csv(out / "placement.csv", dtype={"budget": str})
    placement["budget"] = placement["budget"].fillna("")
    from gradlens.compare.tables import with_references

    gaps = gap_table(with_references(placement), method)
    probes = {(p.name.rsplit("-seed", 1)[0].split("-")[-1], int(p.name.rsplit("-seed", 1)[1])): p
              for p in sorted((out / "probes").glob("*-seed*")) if (p / "probe.json").is_file()
              and int(p.name.rsplit("-seed", 1)[1]) in set(placement["seed"])}
    pred = prediction_table(probes, [str(Budget.parse(b)) for b in budgets], method, steps)
    df = gaps.merge(pred, on=["regime", "budget"], how="left")
    df.insert(0, "space", space)
    df.insert(0, "steps", steps)
    df.insert(0, "model", model)
    df.insert(0, "cell", cell_name(model, steps, space))
    df["budget_share"] = [budget_share(b, int(n)) for b, n in zip(df["budget"], df["entries"], strict=True)]
    return df


def run_phase(config: PhaseConfig, train: bool = True) -> dict[str, Any]:
    """Every cell's comparison (finished ones reused with ``resume``), then the tables, agreement and figure in
    ``config.out``: ``phase.csv``, ``phase.json``, ``phase.png``. ``train=False`` trains nothing: the tables of the
    cells already in ``out`` (each with its own seeds), e.g. after cells ran as separate processes."""
    from gradlens.compare import compare

    out = Path(config.out)
    if train and out.exists() and any(out.glob("*/placement.csv")) and not config.resume:
        raise GradlensError(f"{out} already holds phase-diagram cells; pass --resume to continue or choose another "
                            "--out")
    configs = [(m, s, sp, config.compare_config(m, s, r, cell_dir(out, m, s, r, sp), sp))
               for m, s in config.cells() for sp in config.spaces for r in config.regimes]
    if not train:
        configs = [c for c in configs if (Path(c[3].out) / "placement.csv").is_file()]
        if not configs:
            raise GradlensError(f"{out}: no finished cells to tabulate")
    frames = []
    for model, steps, space, cc in configs:
        if train:
            compare(cc)
        frames.append(cell_tables(Path(cc.out), model, steps, config.budgets, config.method, space))
        table = pd.concat(frames, ignore_index=True)
        result = {"config": asdict(config), "agreement": agreement(table), "rows": table.to_dict("records")}
        atomic_write(out / "phase.csv", lambda tmp, t=table: t.to_csv(tmp, index=False))
        phase_plot(table, result["agreement"], out / "phase.png")
        json_dump(result, out / "phase.json")
    return result


def phase_plot(table: pd.DataFrame, agree: dict[str, Any], path: Path) -> Path:
    """Left: the gap (informed minus random, share of the full-LoRA gain, paired per seed) against the budget on a
    log axis, one line per regime and cell, 95% intervals shaded (clipped by the axis at :data:`GAP_AXIS`; the table
    keeps them whole). Right: diagnose's predicted recovery against the
    measured one, one point per cell, with the rank correlation."""
    from gradlens.analysis.figures import new_figure

    fig, axes = new_figure(1, 2, width=5.4, height=3.8)
    ax, bx = axes[0]
    styles = ["-", "--", ":", "-."]
    for (ci, cell), (ri, regime) in ((c, r) for c in enumerate(dict.fromkeys(table["cell"]))
                                     for r in enumerate(dict.fromkeys(table["regime"]))):
        g = table[(table["cell"] == cell) & (table["regime"] == regime)].sort_values("budget_share")
        if not len(g):
            continue
        x = g["budget_share"].to_numpy(float) * 100
        ax.plot(x, g["gap"], styles[ci % 4], marker="o", color=f"C{ri}", label=f"{regime.upper()} {cell}")
        ax.fill_between(x, g["gap_lo"].to_numpy(float), g["gap_hi"].to_numpy(float), color=f"C{ri}", alpha=0.15)
        bx.scatter(g["predicted_recovery"], g["measured_recovery"], color=f"C{ri}", marker="os^D"[ci % 4],
                   label=f"{regime.upper()} {cell}")
    ax.axhline(0, color="0.4", lw=1)
    ax.set_xscale("log")
    ticks = sorted(set(table["budget_share"].dropna() * 100))
    ax.set_xticks(ticks, [f"{t:g}%" for t in ticks])
    ax.minorticks_off()
    ax.set_ylim(*GAP_AXIS)
    ax.set_xlabel("budget (% of the space's entries trained: B, or W for -weight cells)")
    ax.set_ylabel("gap: informed - random (share of full-LoRA gain)")
    ax.set_title("Placement gap against budget")
    ax.legend(fontsize=7)
    lim = [-0.1, 1.3]
    bx.plot(lim, lim, color="0.6", lw=1)
    rho = agree.get("spearman_predicted_recovery", {}).get("rho", math.nan)
    bx.set_xlabel("predicted recovery (diagnose)")
    bx.set_ylabel("measured recovery (random / informed gain)")
    bx.set_title(f"diagnose vs measured, Spearman {rho:.2f}")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


# --------------------------------------------------------------------------------------------------------------------
# Rank: measured against Gaussian gradients of the same shapes


def gaussian_step_erank(shape: tuple[int, int], draws: int, rng: np.random.Generator) -> float:
    """Mean entropy effective rank of ``draws`` i.i.d. standard Gaussian ``d x r`` matrices (what a per-step
    gradient with no structure would show), by :func:`gradlens.stats.core.step_spectrum_stats`."""
    from gradlens.stats.core import step_spectrum_stats

    return float(np.mean(step_spectrum_stats(rng.standard_normal((draws, *shape)))["erank"]))


def gaussian_traj_erank(norms: np.ndarray, dim: int, draws: int, rng: np.random.Generator) -> dict[str, float]:
    """Mean trajectory effective rank of ``len(norms)`` i.i.d. Gaussian steps in ``dim`` dimensions, rows scaled to
    ``norms`` (``erank_traj``: the raw reference, so a decaying gradient norm is not mistaken for structure) and to
    unit norm (``erank_traj_unit``); from the Gram as :func:`gradlens.stats.core.trajectory_stats` does."""
    from gradlens.stats.core import trajectory_stats

    norms = np.asarray(norms, np.float64)
    norms = norms[norms > 0]
    raw, unit = [], []
    for _ in range(draws):
        x = rng.standard_normal((len(norms), dim))
        x *= (norms / np.linalg.norm(x, axis=1))[:, None]
        stats = trajectory_stats(x @ x.T)
        raw.append(stats["erank_traj"])
        unit.append(stats["erank_traj_unit"])
    return {"erank_traj": float(np.mean(raw)), "erank_traj_unit": float(np.mean(unit))}


def rank_table(stats: Any, scopes: Sequence[str] = ("adapter", "proj"), draws: int = 8,
               seed: int = 0) -> pd.DataFrame:
    """Per scope of one analysed run (:class:`gradlens.analysis.driver.RunStats`): the mean per-step erank of each G_t
    (mean over the scope's modules, as ``analyze`` pools it), the trajectory erank raw and with unit rows, each next
    to the Gaussian reference of the same module shapes, steps and (raw) per-step norms, and the ratio; and the mean
    lag-1 step cosine next to the spread of that of independent Gaussian steps (mean 0, sd ``1/sqrt(dim)``)."""
    rng = np.random.default_rng(seed)
    shapes = {s.name: tuple(s.shape) for s in stats.specs}
    step_ref = {shape: gaussian_step_erank(shape, draws, rng) for shape in dict.fromkeys(shapes.values())}
    rows = []
    for sc in stats.scopes:
        if sc.scope not in scopes:
            continue
        dim = sum(int(np.prod(shapes[m])) for m in sc.modules)
        traj = gaussian_traj_erank(sc.series["grad_norm"], dim, draws, rng)
        row = {"regime": stats.regime, "seed": stats.seed, "scope": sc.scope, "name": sc.name,
               "steps": int(sc.row["steps"]), "steps_with_gradient": int(np.count_nonzero(sc.series["grad_norm"])),
               "rank_cap": int(min(min(shapes[m]) for m in sc.modules)),
               "erank_step": sc.row["erank_step_mean"],
               "erank_step_gaussian": float(np.mean([step_ref[shapes[m]] for m in sc.modules])),
               "erank_traj": sc.row["erank_traj"], "erank_traj_gaussian": traj["erank_traj"],
               "erank_traj_unit": sc.row["erank_traj_unit"], "erank_traj_unit_gaussian": traj["erank_traj_unit"],
               "cos_lag1": sc.row["cos_lag1_mean"], "cos_lag1_gaussian_sd": 1 / math.sqrt(dim)}
        for key in ("erank_step", "erank_traj", "erank_traj_unit"):
            row[f"{key}_ratio"] = row[key] / row[f"{key}_gaussian"]
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------------------------
# Update sparsity of a trained full-B adapter

ABS_TOLERANCES = (1e-5,)
ENERGY_SHARE = 0.9


def adapter_b(adapter_dir: str | Path) -> dict[str, np.ndarray]:
    """The ``lora_B`` weights of a saved PEFT adapter (``adapter_model.safetensors``), by module name."""
    from safetensors.numpy import load_file

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise GradlensError(f"{path} does not exist: not a saved adapter (gradlens record writes RUN_DIR/adapter)")
    tensors = load_file(str(path))
    found = {k.split(".lora_B")[0].removeprefix("base_model.model."): v.astype(np.float64)
             for k, v in tensors.items() if ".lora_B" in k}
    if not found:
        raise GradlensError(f"{path}: no lora_B weights in the adapter")
    return found


def energy_count_share(values: np.ndarray, fraction: float = ENERGY_SHARE) -> float:
    """The smallest share of entries holding ``fraction`` of ``sum values^2`` (scale-free; NaN if all are 0)."""
    e = np.sort(np.asarray(values, np.float64).ravel() ** 2)[::-1]
    if e.size == 0 or e.sum() <= 0:
        return math.nan
    return float((np.searchsorted(np.cumsum(e), fraction * e.sum() * (1 - 1e-12)) + 1) / e.size)


def update_sparsity(adapter_dir: str | Path, tolerances: Sequence[float] = ABS_TOLERANCES) -> pd.DataFrame:
    """Per projection type and for the whole adapter: the share of B entries that moved by more than each absolute
    tolerance (B starts at zero, so the move is ``|B|``), and the share of entries holding :data:`ENERGY_SHARE` of the
    update's squared norm, next to that share for a Gaussian update of the same size (about 0.45 for large sizes)."""
    from gradlens.modules import proj_label

    b = adapter_b(adapter_dir)
    groups: dict[str, list[np.ndarray]] = {"adapter": []}
    for name, w in b.items():
        groups.setdefault(proj_label(name), []).append(w.ravel())
        groups["adapter"].append(w.ravel())
    rng = np.random.default_rng(0)
    rows = []
    for group, parts in groups.items():
        x = np.concatenate(parts)
        row = {"group": group, "entries": x.size, "max_abs": float(np.abs(x).max())}
        for tol in tolerances:
            row[f"moved_{tol:g}"] = float((np.abs(x) > tol).mean())
        row["energy90_share"] = energy_count_share(x)
        row["energy90_share_gaussian"] = energy_count_share(rng.standard_normal(x.size))
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------------------------
# Persistence: is the probe's top-k the whole run's top-k?


def persistence(probe_acc: Any, run_acc: Any, shapes: dict[str, tuple[int, int]], budgets: Sequence[str],
                method: str = "sign") -> pd.DataFrame:
    """Per budget: the ``method`` top-k of the probe's accumulators against that of the whole run's, as the Jaccard
    overlap ``|P & R| / |P | R|`` and the share ``|P & R| / k``, next to their expectation for two independent
    random masks of the same sizes (share ``k / N``)."""
    from gradlens.placement.selectors import select

    n = sum(d * r for d, r in shapes.values())
    rows = []
    for text in budgets:
        budget = Budget.parse(str(text))
        p, r = (np.concatenate([m[name].ravel() for name in shapes]) for m in
                (select(method, budget, shapes, accumulators=acc) for acc in (probe_acc, run_acc)))
        k, inter = int(p.sum()), int((p & r).sum())
        chance = k * k / n
        rows.append({"budget": str(budget), "k": k, "entries": n, "method": method, "shared": inter,
                     "share": inter / k, "jaccard": inter / (2 * k - inter), "share_chance": k / n,
                     "jaccard_chance": chance / (2 * k - chance)})
    return pd.DataFrame(rows)


def record_like_probe(probe_dir: str | Path, out: str | Path, save_raw: bool = True) -> Path:
    """Record the training run a probe was for: the probe's own settings (model, task, seed, rate, data, TRL
    extras) run for its ``train_steps``; its accumulators give the whole run's top-k, its adapter the update."""
    from dataclasses import fields as dc_fields

    from gradlens.config import RecordConfig
    from gradlens.placement.probe import read_probe
    from gradlens.training import record

    config = read_probe(probe_dir).get("config") or {}
    if not config.get("train_steps"):
        raise GradlensError(f"{probe_dir}: the probe names no train_steps, so there is no run to record")
    names = {f.name for f in dc_fields(RecordConfig)}
    kept = {k: v for k, v in config.items() if k in names}
    record(RecordConfig(**{**kept, "out": str(out), "max_steps": int(config["train_steps"]), "save_raw": save_raw,
                           "resume": False}), progress=False)
    return Path(out)
