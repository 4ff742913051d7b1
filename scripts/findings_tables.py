"""The tables of docs/findings.md, printed as markdown from the outputs of scripts/phase_diagram.py (PHASE),
scripts/rival_measurements.py (PHASE/rivals) and an optional ``gradlens analyze`` of GRPO runs at several group
sizes (--groups).

    python scripts/findings_tables.py --phase runs/phase [--groups runs/groups/analysis]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd


def ci(mean: float, lo: float, hi: float, signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    if not np.isfinite(mean):
        return "n/a"
    return f.format(mean) + (f" [{f.format(lo)}, {f.format(hi)}]" if np.isfinite(lo) else "")


def budget_order(column: pd.Series) -> pd.Series:
    """Sort key: budgets by their share of the adapter, other columns as they are."""
    from gradlens.placement.budget import Budget

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


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phase", default="runs/phase")
    p.add_argument("--groups", default=None)
    a = p.parse_args(argv)
    phase = Path(a.phase)
    print("\n".join([*placement(phase), "", *rivals(phase)]))
    if a.groups:
        print("\n" + "\n".join(groups(Path(a.groups))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
