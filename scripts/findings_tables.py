"""The tables of docs/findings.md, printed as markdown from the outputs of scripts/phase_diagram.py (PHASE),
scripts/rival_measurements.py (PHASE/rivals) and an optional ``gradlens analyze`` of GRPO runs at several group
sizes (--groups); with --grown_grid, the gaps of cells resumed with a larger sparse-rate grid.

    python scripts/findings_tables.py --phase runs/phase [--groups runs/groups/analysis]
    python scripts/findings_tables.py --grown_grid runs/phase-wide-lr4/toy-wide-60steps-sft ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: experiments/ is not installed


def ci(mean: float, lo: float, hi: float, signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    if not np.isfinite(mean):
        return "n/a"
    return f.format(mean) + (f" [{f.format(lo)}, {f.format(hi)}]" if np.isfinite(lo) else "")


def budget_order(column: pd.Series) -> pd.Series:
    """Sort key: budgets by their share of the adapter, other columns as they are."""
    from gradlens.budget import Budget

    if column.name != "budget":
        return column
    return column.map(lambda b: Budget.parse(str(b)).fraction or 0.0)


def placement(phase: Path) -> list[str]:
    """Per cell, regime and budget: accuracies, the paired accuracy difference, the gap share and the prediction."""
    rows = pd.read_csv(phase / "phase.csv", dtype={"budget": str})
    out = ["| cell | regime | budget | k | full-B | random | sign | sign - random (acc., paired) | gap (share of "
           "full gain) | pairs | recovery measured / predicted | lr random / sign |", "|" + "---|" * 12]
    for cell_dir in sorted(p.parent for p in phase.glob("*/summary.csv")):
        summary = pd.read_csv(cell_dir / "summary.csv", dtype={"budget": str}).fillna({"budget": ""})
        paired = pd.read_csv(cell_dir / "paired.csv", dtype={"budget": str})
        paired = paired.sort_values(["regime", "budget"], key=budget_order, kind="stable")  # resumed cells: any order
        for r in paired.itertuples():
            s = summary[summary["regime"] == r.regime].set_index(["method", "budget"])
            g = rows[(rows["regime"] == r.regime) & (rows["budget"] == r.budget)
                     & (rows["cell"] == cell_dir.name.rsplit("-", 1)[0])]
            if not len(g):
                continue
            g = g.iloc[0]
            acc = {m: ci(s.at[(m, b), "accuracy_mean"], s.at[(m, b), "ci95_lo"], s.at[(m, b), "ci95_hi"])
                   for m, b in (("full", ""), ("random", r.budget), ("sign", r.budget))}
            out.append(f"| {g['cell']} | {r.regime.upper()} | {r.budget} | {g['k']} | {acc['full']} | "
                       f"{acc['random']} | {acc['sign']} | {ci(r.diff_mean, r.ci95_lo, r.ci95_hi, True)} "
                       f"({r.n_pairs}) | {ci(g['gap'], g['gap_lo'], g['gap_hi'], True)} | {g['n_pairs']} | "
                       f"{g['measured_recovery']:.2f} / {g['predicted_recovery']:.2f} | "
                       f"{s.at[('random', r.budget), 'lr']:g} / {s.at[('sign', r.budget), 'lr']:g} |")
    agree = json.loads((phase / "phase.json").read_text())["agreement"]
    for key in ("spearman_predicted_recovery", "spearman_predicted_recovery_run"):
        a = agree[key]
        out.append(f"\n{key}: rho {a['rho']:.2f} (p {a['p']:.2g}, {a['n']} cells)")
    out.append(f"wrong (other side of {agree['wrong_at']:.0%}): " + "; ".join(
        f"{w['cell']} {w['regime']} {w['budget']} (predicted {w['predicted_recovery']:.2f}, measured "
        f"{w['measured_recovery']:.2f})" for w in agree["wrong"]))
    return out


def rivals(phase: Path) -> list[str]:
    s = pd.read_csv(phase / "rivals" / "rivals_summary.csv", dtype={"budget": str})
    out = ["| cell | regime | per-step erank (of r=8) | Gaussian | trajectory erank raw | Gaussian (norm-matched) | "
           "unit rows | Gaussian | lag-1 cosine | steps with a gradient |", "|" + "---|" * 10]
    for r in s[(s["table"] == "rank") & (s["scope"] == "adapter")].itertuples():
        out.append(f"| {r.cell} | {r.regime.upper()} | {ci(r.erank_step, r.erank_step_lo, r.erank_step_hi)} | "
                   f"{r.erank_step_gaussian:.2f} | {ci(r.erank_traj, r.erank_traj_lo, r.erank_traj_hi)} | "
                   f"{r.erank_traj_gaussian:.1f} | {ci(r.erank_traj_unit, r.erank_traj_unit_lo, r.erank_traj_unit_hi)}"
                   f" | {r.erank_traj_unit_gaussian:.1f} | {ci(r.cos_lag1, r.cos_lag1_lo, r.cos_lag1_hi, True)} "
                   f"(Gaussian sd {r.cos_lag1_gaussian_sd:.3f}) | {r.steps_with_gradient:.0f} |")
    out += ["", "| cell | regime | group | moved > 1e-5 | share holding 90% of the update's energy | Gaussian |",
            "|---|---|---|---|---|---|"]
    sparsity = s[(s["table"] == "sparsity") & (s["group"] == "adapter")].rename(columns={"moved_1e-05": "moved"})
    for r in sparsity.itertuples():
        out.append(f"| {r.cell} | {r.regime.upper()} | {r.group} | {r.moved:.4f} | "
                   f"{ci(r.energy90_share, r.energy90_share_lo, r.energy90_share_hi)} | "
                   f"{r.energy90_share_gaussian:.3f} |")
    out += ["", "| cell | regime | budget | probe top-k also in the run's top-k | Jaccard | chance |",
            "|---|---|---|---|---|---|"]
    for r in s[s["table"] == "persistence"].itertuples():
        out.append(f"| {r.cell} | {r.regime.upper()} | {r.budget} | {ci(r.share, r.share_lo, r.share_hi)} | "
                   f"{ci(r.jaccard, r.jaccard_lo, r.jaccard_hi)} | {r.share_chance:.4f} |")
    w = pd.read_csv(phase / "rivals" / "where.csv", dtype={"budget": str})
    projs = ["q", "k", "v", "o", "gate", "up", "down"]
    out += ["", "| cell | regime | budget | " + " | ".join(projs) + " |", "|" + "---|" * (3 + len(projs))]
    for (cell, regime, budget), g in w.groupby(["cell", "regime", "budget"], sort=False):
        e = g.set_index("key")["mean"]
        out.append(f"| {cell} | {regime.upper()} | {budget} | " + " | ".join(f"{e.get(p, np.nan):.2f}" for p in projs)
                   + " |")
    c = pd.read_csv(phase / "rivals" / "probe_cost.csv")
    out += ["", "| cell | regime | probe steps / run steps | probe seconds (mean, max) | share of the run in steps, "
            "seconds | scoring |", "|---|---|---|---|---|---|"]
    for r in c.itertuples():
        out.append(f"| {r.cell} | {r.regime.upper()} | {r.probe_steps} / {r.train_steps} | {r.probe_seconds:.1f}, "
                   f"{r.probe_seconds_max:.1f} | {100 * r.fraction_steps:.1f}%, {100 * r.fraction_seconds:.1f}% | "
                   f"{1000 * r.scoring_seconds_max:.0f} ms |")
    return out


def groups(path: Path) -> list[str]:
    s = pd.read_csv(path / "summary.csv")
    s = s[s["scope"] == "adapter"] if "scope" in s else s
    out = ["| run | per-step erank (of r=8) | trajectory erank, unit rows (of T) | lag-1 cosine |",
           "|---|---|---|---|"]
    for r in s.itertuples():
        out.append(f"| {Path(str(r.run)).name if hasattr(r, 'run') else r.regime} | {r.erank_step_mean:.2f} | "
                   f"{r.erank_traj_unit:.1f} of {r.steps} | {r.cos_lag1_mean:+.3f} |")
    return out


def grown_grid(cell: Path) -> list[str]:
    """Rows of one compare resumed with a larger ``--sparse_lrs`` grid: its placement.csv then holds runs at the old
    and the new chosen rate, so keep, per regime, method and budget, the runs at the rate the grown sweep picks
    (compare's own rule, :func:`gradlens.compare.protocol.sweep_rates`), on the seeds both methods ran at it."""
    from experiments.rivals import gap_table
    from gradlens.compare.protocol import sweep_rates
    from gradlens.compare.tables import t_interval, with_references

    runs = pd.read_csv(cell / "placement.csv", dtype={"budget": str}).fillna({"budget": ""})
    sweep = pd.read_csv(cell / "sweep.csv", dtype={"budget": str}).fillna({"budget": ""})
    chosen = []
    for (regime, method, budget), g in sweep.groupby(["regime", "method", "budget"], sort=False):
        score = g.groupby("lr").apply(lambda r: -np.inf if r["diverged"].astype(bool).any() else r["accuracy"].mean(),
                                      include_groups=False)
        best, _ = sweep_rates(list(score.index), lambda lr, s=score: float(s[lr]), 0)
        chosen.append({"regime": regime, "method": method, "budget": budget, "lr": best})
    keep = runs.merge(pd.DataFrame(chosen), on=["regime", "method", "budget", "lr"])
    sparse = keep[keep["budget"] != ""]
    both = sparse.groupby(["regime", "budget", "seed"])["method"].transform("nunique") == 2
    keep = pd.concat([runs[runs["method"] == "base"], keep[keep["budget"] == ""], sparse[both]], ignore_index=True)
    gaps = gap_table(with_references(keep)).set_index(["regime", "budget"])
    out = []
    for (regime, budget), g in sparse[both].groupby(["regime", "budget"], sort=False):
        w = g.pivot_table(index="seed", columns="method", values="accuracy")
        lr = g.groupby("method")["lr"].first()
        r = gaps.loc[(regime, budget)]
        out.append((regime, budget, f"| {cell.name} | {regime.upper()} | {budget} | {w['random'].mean():.3f} "
                    f"({lr['random']:g}) | {w['sign'].mean():.3f} ({lr['sign']:g}) | "
                    f"{ci(*t_interval(w['sign'] - w['random']), signed=True)} ({len(w)}) | "
                    f"{ci(r['gap'], r['gap_lo'], r['gap_hi'], True)} | {r['measured_recovery']:.2f} |"))
    out.sort(key=lambda row: (row[0], budget_order(pd.Series([row[1]], name="budget")).iloc[0]))
    return [row[2] for row in out]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phase", default="runs/phase")
    p.add_argument("--groups", default=None)
    p.add_argument("--grown_grid", nargs="+", default=None, help="compare directories resumed with a larger grid")
    a = p.parse_args(argv)
    if a.grown_grid:
        print("| cell | regime | budget | random (lr) | sign (lr) | sign - random (acc., paired) | gap (share of full "
              "gain) | recovery measured |\n" + "|---" * 8 + "|")
        print("\n".join(row for cell in a.grown_grid for row in grown_grid(Path(cell))))
        return 0
    phase = Path(a.phase)
    print("\n".join(placement(phase)))
    if (phase / "rivals").is_dir():
        print("\n" + "\n".join(rivals(phase)))
    else:
        print(f"\n(no rival measurements in {phase / 'rivals'}: scripts/rival_measurements.py --phase {phase} "
              "makes them)")
    if a.groups:
        print("\n" + "\n".join(groups(Path(a.groups))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
