"""Informed minus random placement, paired per seed, across worlds and spaces: ``toy:small`` (addition, 2 layers)
and ``toy:math`` (word problems, 4 layers), each in LoRA-B and in the base weights W, under SFT and GRPO.

Reads only committed results, so the figure is redrawn without training: ``benchmarks/results/param_small.json``
(``toy:small``, both spaces and regimes, budgets 0.1% and 1%) and ``benchmarks/results/phase_math.json``
(``toy:math``'s shipped base, B only: SFT at 0.1% and 1%, GRPO at 1%). ``toy:math``'s W space ran only on its first
base (``phase_math_v1.json``, docs/weight-space.md) and is not drawn. Writes ``figures/05_worlds_spaces.png``; the
PNG's metadata names its sources.

    python scripts/worlds_spaces_figure.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd

from gradlens.analysis.figures import new_figure
from gradlens.budget import Budget
from gradlens.fsio import atomic_write, read_json

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"toy:small": ROOT / "benchmarks/results/param_small.json",
           "toy:math": ROOT / "benchmarks/results/phase_math.json"}
STYLE = {("toy:small", "lora_b"): ("C0", "-", "o"), ("toy:small", "weight"): ("C0", "--", "s"),
         ("toy:math", "lora_b"): ("C1", "-", "o"), ("toy:math", "weight"): ("C1", "--", "s")}


def points(small: dict, math: dict) -> pd.DataFrame:
    """One row per world, space, regime and budget: sign - random in held-out accuracy, mean and 95% t-interval over
    the paired seeds, as the two result files hold them."""
    rows = [{"world": "toy:small", "space": r["space"], "regime": r["regime"], "budget": r["budget"],
             "diff": r["sign_minus_random"]["mean"], "lo": r["sign_minus_random"]["ci95"][0],
             "hi": r["sign_minus_random"]["ci95"][1], "pairs": r["sign_minus_random"]["n_pairs"]}
            for r in small["rows"]]
    rows += [{"world": "toy:math", "space": p["space"], "regime": p["regime"], "budget": p["budget"],
              "diff": p["diff_mean"], "lo": p["ci95_lo"], "hi": p["ci95_hi"], "pairs": p["n_pairs"]}
             for cell in math["cells"].values() for p in cell["paired"]
             if p["method"] == "sign" and p["baseline"] == "random"]
    df = pd.DataFrame(rows)
    return df.assign(share=[Budget.parse(b).fraction for b in df["budget"]])


def draw(df: pd.DataFrame, path: Path) -> Path:
    fig, axes = new_figure(1, 2, width=4.8, height=3.6)
    for ax, regime in zip(axes[0], ("sft", "grpo"), strict=True):
        for (world, space), (color, line, marker) in STYLE.items():
            g = df[(df["world"] == world) & (df["space"] == space) & (df["regime"] == regime)].sort_values("share")
            if g.empty:
                continue
            ax.errorbar(100 * g["share"], g["diff"], yerr=[g["diff"] - g["lo"], g["hi"] - g["diff"]], color=color,
                        linestyle=line, marker=marker, capsize=3, label=f"{world} {'B' if space == 'lora_b' else 'W'}")
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("budget (% of the space's entries)")
        ax.set_ylabel("sign - random, accuracy (paired)")
        ax.set_title(regime.upper())
        ax.legend(fontsize=7)
    meta = {"Source": json.dumps({w: str(p.relative_to(ROOT)) for w, p in SOURCES.items()}),
            "Description": "sign - random per world, space and regime; 95% t-intervals over seeds"}
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png", metadata=meta))
    return path


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "figures/05_worlds_spaces.png"))
    a = p.parse_args(argv)
    df = points(*(read_json(SOURCES[w], f"{w} results") for w in ("toy:small", "toy:math")))
    print(df.drop(columns="share").to_string(index=False, float_format=lambda x: f"{x:+.3f}"))
    print(f"worlds_spaces_figure: {draw(df, Path(a.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
