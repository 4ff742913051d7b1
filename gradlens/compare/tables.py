"""The placement tables: the CSV rows a comparison writes as it goes, the summary over seeds, where the informed
entries sit, and the finding in words. pandas only (no torch), so the report can read a comparison cheaply."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradlens.errors import GradlensError
from gradlens.fsio import atomic_write

PLACEMENT = "placement.csv"
SWEEP = "sweep.csv"
DEFAULT_SPACE = "lora_b"


def with_space(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with a ``space`` column: rows written before compare had spaces are all ``lora_b``."""
    return df if "space" in df else df.assign(space=DEFAULT_SPACE)


class Table:
    """Rows of one CSV, rewritten atomically after every finished run; loaded back on resume."""

    def __init__(self, path: Path, resume: bool) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if resume and path.is_file():
            try:
                df = with_space(pd.read_csv(path, dtype={"budget": str, "lora_b_budget": str}))
                self.rows = df.assign(budget=df["budget"].fillna("")).to_dict("records")
            except (OSError, ValueError) as e:
                raise GradlensError(f"{path}: cannot read it to resume ({e})".splitlines()[0]) from e

    def find(self, **key: Any) -> dict[str, Any] | None:
        want = {k: str(v) for k, v in key.items()}
        return next((r for r in self.rows if all(str(r.get(k)) == v for k, v in want.items())), None)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        atomic_write(self.path, lambda tmp: pd.DataFrame(self.rows).to_csv(tmp, index=False))

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)


def with_references(placement: pd.DataFrame) -> pd.DataFrame:
    """``placement`` with each row's base-model and same-seed full-B LoRA accuracy added as columns."""
    placement = with_space(placement).copy()
    placement["k"] = placement["k"].astype("Int64")
    full_of = placement[placement["method"] == "full"].set_index(["space", "regime", "seed"])["accuracy"]
    base_of = placement[placement["method"] == "base"].groupby(["space", "regime"])["accuracy"].first()
    keys = list(zip(placement["space"], placement["regime"], strict=True))
    placement["base_accuracy"] = [base_of.get(key, float("nan")) for key in keys]
    placement["full_lora_accuracy"] = [full_of.get((*key, s), float("nan"))
                                       for key, s in zip(keys, placement["seed"], strict=True)]
    return placement


def t_interval(values: Any) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of ``values`` and its two-sided 95% Student-t interval (NaN bounds below 2 values)."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def _kept(placement: pd.DataFrame) -> pd.DataFrame:
    """The rows that count: diverged runs are counted, never averaged in."""
    if "diverged" not in placement:
        return placement
    return placement[~placement["diverged"].fillna(False).astype(bool)]


def gain_shares(placement: pd.DataFrame) -> pd.Series:
    """Per row, the share of the same-seed full-B LoRA gain over the base model that the run recovers:
    ``(acc - base) / (full_seed - base)`` (NaN where full LoRA gained nothing, or diverged)."""
    placement = with_space(placement)
    kept = _kept(placement)
    full = kept[kept["method"] == "full"].set_index(["space", "regime", "seed"])["accuracy"]
    base = placement[placement["method"] == "base"].groupby(["space", "regime"])["accuracy"].first()
    out = []
    for row in placement.itertuples():
        f, b = full.get((row.space, row.regime, row.seed), math.nan), base.get((row.space, row.regime), math.nan)
        out.append((row.accuracy - b) / (f - b) if abs(f - b) > 1e-12 else math.nan)
    return pd.Series(out, index=placement.index, dtype=float)


def summarize(placement: pd.DataFrame) -> pd.DataFrame:
    """Per (regime, method, budget): mean held-out accuracy over the seeds that did not diverge, its 95% t-interval,
    how many runs diverged, and the share of the same-seed full-LoRA gain recovered, with its t-interval."""
    placement = with_space(placement)
    share = gain_shares(placement)
    base = placement[placement["method"] == "base"].groupby(["space", "regime"])["accuracy"].mean()
    rows = []
    for (space, regime, method, budget), g in placement.groupby(["space", "regime", "method", "budget"],
                                                                sort=False):
        kept = _kept(g)
        mean, lo, hi = t_interval(kept["accuracy"])
        # full LoRA is all of its own gain, but only if it gained: full = base gives no share to speak of
        gained = abs(mean - base.get((space, regime), math.nan)) > 1e-12
        gain, gain_lo, gain_hi = t_interval(share[kept.index]) if method not in ("base", "full") else (
            (1.0 if gained else math.nan, math.nan, math.nan) if method == "full" else (0.0, math.nan, math.nan))
        rows.append({"space": space, "regime": regime, "method": method, "budget": budget, "n_seeds": len(kept),
                     "n_diverged": len(g) - len(kept), "accuracy_mean": mean, "ci95_lo": lo, "ci95_hi": hi,
                     "sampled_accuracy_mean": kept["sampled_accuracy"].mean(), "lr": g["lr"].iloc[0],
                     "steps": int(g["steps"].iloc[0]), "k": g["k"].iloc[0], "gain_recovered": gain,
                     "gain_recovered_lo": gain_lo, "gain_recovered_hi": gain_hi})
    return pd.DataFrame(rows)


def paired_differences(placement: pd.DataFrame, baseline: str = "random") -> pd.DataFrame:
    """Per regime, budget and placement method other than ``baseline`` (the informed selectors, and the controls
    ``random_matched`` and ``modules``): the per-seed difference method minus ``baseline`` (the same seed shares the
    probe, the LoRA init and the data order), its mean and 95% t-interval; seeds where either run diverged are left
    out and counted."""
    rows = []
    placement = with_space(placement)
    sparse = placement[placement["budget"].fillna("") != ""]  # not base or full, which have no budget
    for (space, regime, budget), g in sparse.groupby(["space", "regime", "budget"], sort=False):
        base = g[g["method"] == baseline].set_index("seed")
        for method in [m for m in dict.fromkeys(g["method"]) if m != baseline]:
            placed = g[g["method"] == method].set_index("seed")
            seeds = sorted(set(placed.index) & set(base.index))
            ok = [s for s in seeds if not _flag(placed, s) and not _flag(base, s)]
            diffs = [float(placed.at[s, "accuracy"] - base.at[s, "accuracy"]) for s in ok]
            mean, lo, hi = t_interval(diffs)
            rows.append({"space": space, "regime": regime, "budget": budget, "method": method, "baseline": baseline,
                         "n_pairs": len(ok), "n_excluded": len(seeds) - len(ok), "diff_mean": mean,
                         "ci95_lo": lo, "ci95_hi": hi})
    return pd.DataFrame(rows)


def _flag(rows: pd.DataFrame, seed: Any) -> bool:
    return bool(rows.at[seed, "diverged"]) if "diverged" in rows and pd.notna(rows.at[seed, "diverged"]) else False


def format_ci(r: Any) -> str:
    """``mean [lo, hi]`` of a summary row (a Series or an itertuples row); the interval left out when undefined."""
    get = r.__getitem__ if isinstance(r, pd.Series) else lambda key: getattr(r, key)
    lo, hi, mean = get("ci95_lo"), get("ci95_hi"), get("accuracy_mean")
    return f"{mean:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else "")


def format_pct(x: float) -> str:
    """A share as a whole percentage, ``n/a`` when undefined."""
    return "n/a" if not np.isfinite(x) else f"{100 * x:.0f}%"


def _budget_lines(gb: pd.DataFrame, budget: str, paired: pd.DataFrame) -> list[str]:
    parts = [f"{r.method} {format_ci(r)} ({format_pct(r.gain_recovered)} of the gain"
             + (f", {r.n_diverged} diverged" if getattr(r, "n_diverged", 0) else "") + ")" for r in gb.itertuples()]
    lines = [f"  {budget}: " + "; ".join(parts)]
    for r in paired.itertuples():
        verdict = ("interval excludes 0" if np.isfinite(r.ci95_lo) and (r.ci95_lo > 0 or r.ci95_hi < 0)
                   else "interval includes 0" if np.isfinite(r.ci95_lo) else "one pair: no interval")
        interval = f" [{r.ci95_lo:+.3f}, {r.ci95_hi:+.3f}]" if np.isfinite(r.ci95_lo) else ""
        lines.append(f"    {r.method} - {r.baseline}, paired over {r.n_pairs} seeds: {r.diff_mean:+.3f}{interval} "
                     f"({verdict})")
    return lines


def findings(summary: pd.DataFrame, probes: pd.DataFrame, paired: pd.DataFrame | None = None) -> str:
    """The comparison in a few sentences: per regime and budget, each method's accuracy and share of the full-LoRA
    gain, and each informed method against random as a paired difference over seeds."""
    paired = pd.DataFrame(columns=["space", "regime", "budget"]) if paired is None or not len(paired) else paired
    summary, paired = with_space(summary), with_space(paired)
    lines = []
    for (space, regime), g in summary.groupby(["space", "regime"], sort=False):
        base = g[g.method == "base"].accuracy_mean.iloc[0]
        full = g[g.method == "full"]
        head = (f"{regime.upper()}: base {base:.3f}, full-B LoRA {format_ci(full.iloc[0])}" if space == DEFAULT_SPACE
                else f"{regime.upper()} [space {space}]: base {base:.3f}, full W {format_ci(full.iloc[0])}")
        lines.append(head)
        for budget, gb in g[~g.method.isin(["base", "full"])].groupby("budget", sort=False):
            lines += _budget_lines(gb, budget, paired[(paired["space"] == space) & (paired["regime"] == regime)
                                                      & (paired["budget"] == budget)])
    if len(probes) and "fraction_steps" in probes:
        for regime, p in probes.groupby("regime", sort=False):
            lines.append(f"{regime.upper()} probe: {p.probe_steps.iloc[0]} steps, {p.probe_seconds.mean():.1f} s "
                         f"= {100 * p.fraction_steps.mean():.1f}% of the run in steps, "
                         f"{100 * p.fraction_seconds.mean():.1f}% in measured seconds")
    return "\n".join(lines)


def where_rows(mask: dict[str, np.ndarray], regime: str, method: str, budget: str, seed: int,
               space: str = DEFAULT_SPACE) -> pd.DataFrame:
    """Where one mask's entries sit (:func:`~gradlens.sparse.masks.where_table`), tagged with its run."""
    from gradlens.sparse.masks import where_table

    df = where_table(mask)
    for column, value in (("seed", seed), ("budget", budget), ("method", method), ("regime", regime),
                          ("space", space)):
        df.insert(0, column, value)
    return df


SPACE_BASES = {"share": "the same share of each space", "count": "the same count of trainable entries",
               "full": "every entry of each space"}


def space_table(placement: pd.DataFrame) -> pd.DataFrame:
    """lora_b (the default space) against weight, per regime, method and given budget, at the same share of each
    space and, where compare ran lora_b's counts in weight (``lora_b_budget``), at the same count of trainable
    entries; full LoRA-B against full W. ``diff`` is weight minus lora_b accuracy, paired over the seeds both ran
    without diverging (a seed shares data order and probe seed across spaces). Empty unless both spaces ran."""
    placement = with_space(placement)
    kept = _kept(placement)
    lora, weight = kept[kept["space"] == DEFAULT_SPACE], kept[kept["space"] == "weight"]
    if not len(lora) or not len(weight):
        return pd.DataFrame()
    matched = weight["lora_b_budget"].fillna("").astype(str) if "lora_b_budget" in weight else pd.Series(
        "", index=weight.index)
    rows = []
    for (regime, method, budget), a in lora[lora["method"] != "base"].groupby(["regime", "method", "budget"],
                                                                             sort=False):
        same = (weight["regime"] == regime) & (weight["method"] == method)
        bases = [("full", weight[same])] if method == "full" else [
            ("share", weight[same & (weight["budget"] == budget) & (matched == "")]),
            ("count", weight[same & (matched == budget)])]
        for basis, b in bases:
            if not len(b):
                continue
            x, y = a.set_index("seed")["accuracy"], b.set_index("seed")["accuracy"]
            seeds = sorted(set(x.index) & set(y.index))
            mean, lo, hi = t_interval([float(y[s] - x[s]) for s in seeds])
            k_a, k_b = a["k"].iloc[0], b["k"].iloc[0]
            rows.append({"regime": regime, "method": method, "budget": budget, "basis": basis,
                         "weight_budget": b["budget"].iloc[0], "k_lora_b": k_a, "k_weight": k_b,
                         "share_lora_b": k_a / a["entries"].iloc[0] if pd.notna(k_a) else 1.0,
                         "share_weight": k_b / b["entries"].iloc[0] if pd.notna(k_b) else 1.0,
                         "accuracy_lora_b": t_interval(x)[0], "accuracy_weight": t_interval(y)[0],
                         "n_pairs": len(seeds), "diff_mean": mean, "ci95_lo": lo, "ci95_hi": hi,
                         "default_space": DEFAULT_SPACE})
    return pd.DataFrame(rows)


def space_lines(spaces: pd.DataFrame) -> list[str]:
    """The space table in words: weight minus lora_b (the default space), paired over seeds."""
    if not len(spaces):
        return []
    lines = ["SPACES: weight minus lora_b (the default space) accuracy, paired over seeds"]
    for r in spaces.itertuples():
        interval = f" [{r.ci95_lo:+.3f}, {r.ci95_hi:+.3f}]" if np.isfinite(r.ci95_lo) else ""
        what = "full" if r.basis == "full" else f"{r.method} {r.budget}"
        lines.append(f"  {r.regime.upper()} {what}, {SPACE_BASES[r.basis]} (weight {r.weight_budget or 'all'}): "
                     f"{r.accuracy_weight:.3f} vs {r.accuracy_lora_b:.3f}, {r.diff_mean:+.3f}{interval} over "
                     f"{r.n_pairs} seeds")
    return lines
