"""Sawant (arXiv 2605.07366): allocating LoRA rank across modules by gradient magnitude hurts under GRPO.

gradlens does not allocate rank; it places a budget of B entries. The entry-level analogue of the claim: ``fisher``
scores entries by gradient energy ``sum_t g^2`` over the probe, and ``random_matched`` takes fisher's per-module
counts and places them uniformly inside each module, i.e. a budget allocated across modules by gradient energy. Each
is compared with ``random`` (uniform over the adapter) on the same seed (same probe, LoRA init and data order), under
GRPO and SFT: ``gradlens compare`` on ``toy:small``, 60 steps, budgets 0.3% and 1%, seeds 0-2, rates swept per method
and budget on seed 1000 with one grid extension. Writes the two comparisons' tables and provenance, and where
fisher's budget went (share of the selected entries per projection type, mean over seeds), to
``benchmarks/results/claim_sawant.json``.

    python scripts/claim_sawant.py --out runs/sawant --resume
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: experiments/ is not installed

import pandas as pd

from experiments.bundle import compare_tables
from gradlens.compare.tables import format_ci
from gradlens.fsio import json_dump
from gradlens.provenance import package_versions

METHODS = ["random", "random_matched", "fisher"]
SETTINGS: dict[str, Any] = {"model": "toy:small", "max_steps": 60, "budgets": ["0.3%", "1%"], "seeds": [0, 1, 2],
                            "sweep_seeds": [1000], "sparse_lrs": [0.03, 0.1, 0.3], "full_lrs": [0.003, 0.01],
                            "grid_extensions": 1, "eval_samples": 0, "export": False}


def allocation(where: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per budget: the share of fisher's selected entries in each projection type, mean over seeds."""
    g = where[(where["method"] == "fisher") & (where["group"] == "proj")]
    return {budget: rows.groupby("key")["selected_share"].mean().round(4).to_dict()
            for budget, rows in g.groupby("budget")}


def table(result: dict[str, dict[str, Any]]) -> list[str]:
    """The markdown table of the finding: accuracies and the paired differences against random."""
    out = ["| regime | budget | full | random (lr) | random_matched (lr) | fisher (lr) | random_matched - random | "
           "fisher - random |", "|" + "---|" * 8]
    for regime, tables in result.items():
        s = pd.DataFrame(tables["summary"]).set_index(["method", "budget"], drop=False)
        paired = pd.DataFrame(tables["paired"]).set_index(["budget", "method"])
        full = s[s["method"] == "full"].iloc[0]
        for budget in SETTINGS["budgets"]:
            cells = [f"{format_ci(s.loc[(m, budget)])} ({s.loc[(m, budget)].lr:g})" for m in METHODS]
            diffs = [f"{d.diff_mean:+.3f} [{d.ci95_lo:+.3f}, {d.ci95_hi:+.3f}]"
                     for d in (paired.loc[(budget, m)] for m in METHODS[1:])]
            out.append(f"| {regime.upper()} | {budget} | {format_ci(full)} | " + " | ".join([*cells, *diffs]) + " |")
    return out


def main(argv: list[str]) -> int:
    from gradlens.compare import compare
    from gradlens.config import CompareConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/sawant")
    p.add_argument("--json", default="benchmarks/results/claim_sawant.json")
    p.add_argument("--resume", action="store_true", help="reuse finished runs")
    a = p.parse_args(argv)
    wall, result, where = time.time(), {}, {}
    for regime in ("grpo", "sft"):
        out = Path(a.out) / regime
        compare(CompareConfig(out=str(out), regimes=[regime], methods=METHODS, resume=a.resume, progress=False,
                              **SETTINGS))
        result[regime] = compare_tables(out)
        where[regime] = allocation(pd.read_csv(out / "where.csv", dtype={"budget": str}))
    print("\n".join(table(result)))
    json_dump({"claim": "Sawant (arXiv 2605.07366): allocating LoRA rank by gradient magnitude hurts under GRPO",
               "command": f"python scripts/claim_sawant.py --out {a.out}", "settings": SETTINGS,
               "fisher_allocation_by_projection": where, "comparisons": result, "versions": package_versions()},
              a.json)
    print(f"claim_sawant: {a.json}; {time.time() - wall:.0f} s wall")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
