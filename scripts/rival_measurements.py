"""The rival explanations, measured on the runs of a phase diagram (scripts/phase_diagram.py).

For each cell's probe (one per regime and seed) it records the training run the probe was for (same settings, the
run's length, raw shards kept), then writes to OUT:

- ``rank.csv``: per-step and trajectory effective rank against Gaussian gradients of the same shapes (rank claims);
- ``sparsity.csv``: the share of the trained full-B adapter's entries that moved, and the energy concentration
  (update sparsity, Mukherjee et al. 2025);
- ``persistence.csv``: the probe's sign-consistent top-k against the whole run's (does the subset persist?);
- ``where.csv``: per cell, regime, budget and projection type, the informed masks' enrichment (share of selected
  entries over share of all entries), mean over seeds, from each cell's compare ``where.csv``;
- ``probe_cost.csv``: per cell and regime, the probe's seconds and its share of the run (compare's ``probes.csv``);
- ``rivals_summary.csv``: mean and 95% t-interval over seeds of the headline columns.

    python scripts/rival_measurements.py --phase runs/phase --out runs/phase/rivals [--resume]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: experiments/ is not installed

import pandas as pd

from experiments.rivals import PHASE_BUDGETS, persistence, rank_table, record_like_probe, update_sparsity
from gradlens.compare.tables import t_interval
from gradlens.errors import GradlensError

HEADLINE = {"rank": ("erank_step", "erank_step_gaussian", "erank_traj", "erank_traj_gaussian", "erank_traj_unit",
                     "erank_traj_unit_gaussian", "erank_step_ratio", "erank_traj_ratio", "erank_traj_unit_ratio",
                     "steps_with_gradient", "cos_lag1", "cos_lag1_gaussian_sd"),
            "sparsity": ("moved_1e-05", "energy90_share", "energy90_share_gaussian"),
            "persistence": ("share", "jaccard", "share_chance")}
KEYS = {"rank": ["cell", "regime", "scope", "name"], "sparsity": ["cell", "regime", "group"],
        "persistence": ["cell", "regime", "budget"]}


def probes(phase: Path, seeds: list[int] | None, cells: list[str]) -> list[tuple[str, str, int, Path]]:
    """(cell, regime, seed, probe dir) of every finished probe under the phase diagram's cells (those matching
    ``cells``, glob patterns)."""
    found = []
    for path in sorted(p for c in cells for p in phase.glob(f"{c}/probes/*-seed*/probe.json")):
        regime, seed = path.parent.name.rsplit("-seed", 1)
        if int(seed) < 1000 and (seeds is None or int(seed) in seeds):  # seeds >= 1000 are the sweep's
            found.append((path.parent.parent.parent.name, regime, int(seed), path.parent))
    return found


def measure(cell: str, regime: str, seed: int, probe_dir: Path, out: Path, budgets: list[str],
            resume: bool) -> dict[str, pd.DataFrame]:
    from gradlens.analysis.driver import analyze_run
    from gradlens.store import open_run

    run_dir = out / "runs" / f"{cell}-seed{seed}"
    if not (resume and (run_dir / "manifest.json").is_file() and open_run(run_dir).meta.get("complete")):
        shutil.rmtree(run_dir, ignore_errors=True)
        record_like_probe(probe_dir, run_dir)
    run, probe_run = open_run(run_dir), open_run(probe_dir / "run")
    shapes = {s.name: tuple(s.shape) for s in run.specs}
    tables = {"rank": rank_table(analyze_run(run_dir, lags=1), seed=seed),
              "sparsity": update_sparsity(run_dir / "adapter"),
              "persistence": persistence(probe_run.accumulators(), run.accumulators(), shapes, budgets)}
    return {k: v.assign(cell=cell, regime=regime, seed=seed) for k, v in tables.items()}


def summarize(name: str, df: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for key, g in df.groupby(KEYS[name], sort=False):
        row = dict(zip(KEYS[name], key, strict=True)) | {"table": name, "n_seeds": g["seed"].nunique()}
        for col in HEADLINE[name]:
            row[col], row[f"{col}_lo"], row[f"{col}_hi"] = t_interval(g[col])
        rows.append(row)
    return pd.DataFrame(rows)


def cell_tables(phase: Path) -> dict[str, pd.DataFrame]:
    """Where the informed entries sit and what the probes cost, per cell and regime, from the compare outputs."""
    where, cost = [], []
    for cell in sorted(p.parent for p in phase.glob("*/placement.csv")):
        if (cell / "where.csv").is_file():
            w = pd.read_csv(cell / "where.csv", dtype={"budget": str})
            w = w[w["group"] == "proj"].groupby(["regime", "method", "budget", "key"], sort=False)
            where.append(w["enrichment"].agg(["mean", "min", "max", "size"]).reset_index().assign(cell=cell.name))
        if (cell / "probes.csv").is_file():
            c = pd.read_csv(cell / "probes.csv")
            cost.append(c.groupby("regime").agg(
                probe_steps=("probe_steps", "first"), train_steps=("train_steps", "first"),
                probe_seconds=("probe_seconds", "mean"), probe_seconds_max=("probe_seconds", "max"),
                fraction_steps=("fraction_steps", "mean"), fraction_seconds=("fraction_seconds", "mean"),
                scoring_seconds_max=("scoring_seconds_max", "max")).reset_index().assign(cell=cell.name))
    return {"where": pd.concat(where, ignore_index=True) if where else pd.DataFrame(),
            "probe_cost": pd.concat(cost, ignore_index=True) if cost else pd.DataFrame()}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phase", default="runs/phase")
    p.add_argument("--out", default=None, help="default: PHASE/rivals")
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--cells", nargs="+", default=["*"], help="cell directories to measure (glob patterns)")
    p.add_argument("--budgets", nargs="+", default=PHASE_BUDGETS)
    p.add_argument("--resume", action="store_true")
    a = p.parse_args(argv)
    phase = Path(a.phase)
    out = Path(a.out) if a.out else phase / "rivals"
    wall = time.time()
    try:
        found = probes(phase, a.seeds, a.cells)
        if not found:
            raise GradlensError(f"{phase}: no finished probes under */probes/ (run scripts/phase_diagram.py first)")
        parts = [measure(*f, out, a.budgets, a.resume) for f in found]
    except GradlensError as e:
        print(f"rival_measurements: error: {e}", file=sys.stderr)
        return 2
    summary = []
    for name in HEADLINE:
        df = pd.concat([part[name] for part in parts], ignore_index=True)
        df.to_csv(out / f"{name}.csv", index=False)
        summary.append(summarize(name, df))
    table = pd.concat(summary, ignore_index=True)
    table.to_csv(out / "rivals_summary.csv", index=False)
    for name, df in cell_tables(phase).items():
        df.to_csv(out / f"{name}.csv", index=False)
        with pd.option_context("display.width", 200, "display.max_rows", 400, "display.precision", 3):
            print(df.to_string(index=False))
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.precision", 3):
        for _, g in table.groupby("table", sort=False):
            print(g.dropna(axis=1, how="all").to_string(index=False))
    cpu = sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    print(f"rival_measurements: {len(found)} runs, {out}; {time.time() - wall:.0f} s wall, {cpu:.0f} s CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
