"""The last lines of ``make demo``: what its placement contrast found, and where the report is.

    python scripts/demo_headline.py COMPARE_DIR REPORT_HTML
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd


def headline(compare_dir: Path) -> list[str]:
    """One line per regime and budget: base, full-B, each method's accuracy, and informed minus random, paired."""
    summary = pd.read_csv(compare_dir / "summary.csv", dtype={"budget": str}).fillna({"budget": ""})
    paired = pd.read_csv(compare_dir / "paired.csv", dtype={"budget": str})
    lines = []
    for r in paired.itertuples():
        g = summary[summary["regime"] == r.regime]
        acc = {m: g[(g["method"] == m) & (g["budget"].isin(["", r.budget]))]["accuracy_mean"].iloc[0]
               for m in ("base", "full", r.baseline, r.method)}
        if np.isfinite(r.ci95_lo):
            verdict = ("informed placement wins" if r.ci95_lo > 0 else "random wins" if r.ci95_hi < 0
                       else "no difference shown")
            interval = f" [{r.ci95_lo:+.3f}, {r.ci95_hi:+.3f}]"
        else:
            verdict, interval = "too few seeds for an interval", ""
        lines.append(f"demo: {r.regime.upper()} at {r.budget}: base {acc['base']:.3f}, full-B {acc['full']:.3f}, "
                     f"{r.baseline} {acc[r.baseline]:.3f}, {r.method} {acc[r.method]:.3f}; {r.method} - {r.baseline} "
                     f"{r.diff_mean:+.3f}{interval} over {r.n_pairs} seeds: {verdict}")
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    compare_dir, report = Path(argv[0]), Path(argv[1])
    for line in headline(compare_dir):
        print(line)
    print("demo: a toy contrast on the tiny model and few seeds (docs/findings.md has the full study); "
          f"everything is in {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
