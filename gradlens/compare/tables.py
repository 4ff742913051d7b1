"""The placement tables: the CSV rows a comparison writes as it goes, the summary over seeds, where the informed
entries sit, and the finding in words. pandas only (no torch), so the report can read a comparison cheaply."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradlens.config import INFORMED_METHODS
from gradlens.errors import GradlensError
from gradlens.fsio import atomic_write

PLACEMENT = "placement.csv"
SWEEP = "sweep.csv"


class Table:
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
        atomic_write(self.path, lambda tmp: pd.DataFrame(self.rows).to_csv(tmp, index=False))

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)


def with_references(placement: pd.DataFrame) -> pd.DataFrame:
    """``placement`` with each row's base-model and same-seed full-B LoRA accuracy added as columns."""
    placement = placement.copy()
    placement["k"] = placement["k"].astype("Int64")
    full_of = placement[placement["method"] == "full"].set_index(["regime", "seed"])["accuracy"]
    base_of = placement[placement["method"] == "base"].set_index("regime")["accuracy"]
    placement["base_accuracy"] = placement["regime"].map(base_of)
    placement["full_lora_accuracy"] = [full_of.get((r, s), float("nan"))
                                       for r, s in zip(placement["regime"], placement["seed"], strict=True)]
    return placement


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


def format_ci(r: Any) -> str:
    """``mean [lo, hi]`` of a summary row (a Series or an itertuples row); the interval left out when undefined."""
    get = r.__getitem__ if isinstance(r, pd.Series) else lambda key: getattr(r, key)
    lo, hi, mean = get("ci95_lo"), get("ci95_hi"), get("accuracy_mean")
    return f"{mean:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else "")


def format_pct(x: float) -> str:
    """A share as a whole percentage, ``n/a`` when undefined."""
    return "n/a" if not np.isfinite(x) else f"{100 * x:.0f}%"


def _budget_lines(gb: pd.DataFrame, budget: str) -> list[str]:
    parts = [f"{r.method} {format_ci(r)} ({format_pct(r.gain_recovered)} of the gain)" for r in gb.itertuples()]
    lines = [f"  {budget}: " + "; ".join(parts)]
    informed = gb[gb.method.isin(INFORMED_METHODS)]
    rand = gb[gb.method == "random"]
    if len(informed) and len(rand):
        best = informed.loc[informed.accuracy_mean.idxmax()]
        r = rand.iloc[0]
        overlap = not (best.ci95_lo > r.ci95_hi or r.ci95_lo > best.ci95_hi)
        verdict = "intervals overlap" if overlap else "intervals do not overlap"
        lines.append(f"    best informed ({best.method}) - random = {best.accuracy_mean - r.accuracy_mean:+.3f} "
                     f"({verdict})")
    return lines


def findings(summary: pd.DataFrame, probes: pd.DataFrame) -> str:
    """The comparison in a few sentences: per regime and budget, random against the best informed method."""
    lines = []
    for regime, g in summary.groupby("regime", sort=False):
        base = g[g.method == "base"].accuracy_mean.iloc[0]
        full = g[g.method == "full"]
        lines.append(f"{regime.upper()}: base {base:.3f}, full-B LoRA {format_ci(full.iloc[0])}")
        for budget, gb in g[~g.method.isin(["base", "full"])].groupby("budget", sort=False):
            lines += _budget_lines(gb, budget)
    if len(probes) and "fraction_steps" in probes:
        for regime, p in probes.groupby("regime", sort=False):
            lines.append(f"{regime.upper()} probe: {p.probe_steps.iloc[0]} steps, {p.probe_seconds.mean():.1f} s "
                         f"= {100 * p.fraction_steps.mean():.1f}% of the run in steps, "
                         f"{100 * p.fraction_seconds.mean():.1f}% in measured seconds")
    return "\n".join(lines)


def where_rows(mask: dict[str, np.ndarray], regime: str, method: str, budget: str, seed: int) -> pd.DataFrame:
    """Where one mask's entries sit (:func:`~gradlens.placement.masks.where_table`), tagged with its run."""
    from gradlens.placement.masks import where_table

    df = where_table(mask)
    for column, value in (("seed", seed), ("budget", budget), ("method", method), ("regime", regime)):
        df.insert(0, column, value)
    return df
