"""Leave one world out on the committed findings: the 36 points of docs/findings.md section 3 as a table for
``gradlens diagnose --check``, with the widths (``toy:small`` at 60 and 240 steps, ``toy:wide``) as the worlds.

    python scripts/diagnose_check_findings.py --out runs/diagnose-check-findings

Writes OUT/points.csv (world, cell, budget, the diagnose's predicted recovery, the measured gap as a share of the
full-LoRA gain) and runs the check on it. The only probe statistic section 3 keeps is the predicted recovery, so the
choice on one world is that statistic's direction; a phase diagram's own tables give more candidates.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradlens.cli.main import main as gradlens

FINDINGS = Path(__file__).resolve().parents[1] / "docs" / "findings.md"
ROW = re.compile(r"^\| (toy-\S+) \| (SFT|GRPO) \| (\S+%) \| (\d+) \|.*\| ([+-]\d\.\d+) \[[^]]*\] \| \d+ \| "
                 r"(\d\.\d+) / (\d\.\d+) \|")


def points(text: str) -> list[dict[str, object]]:
    """The section 3 rows: one per cell, regime and budget."""
    rows = []
    for line in text.splitlines():
        m = ROW.match(line)
        if m:
            cell, regime, budget, k, gap, measured, predicted = m.groups()
            rows.append({"world": cell.split("-")[1], "cell": f"{cell}-{regime.lower()}", "budget": budget,
                         "k": int(k), "predicted_recovery": float(predicted), "gap": float(gap),
                         "measured_recovery": float(measured)})
    return rows


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/diagnose-check-findings")
    a = p.parse_args(argv)
    import pandas as pd

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(points(FINDINGS.read_text()))
    table.to_csv(out / "points.csv", index=False)
    print(f"{len(table)} points ({', '.join(f'{w}: {n}' for w, n in table['world'].value_counts().items())}) "
          f"in {out / 'points.csv'}")
    return gradlens(["diagnose", "--check", str(out / "points.csv"), "--predictors", "predicted_recovery",
                     "--out", str(out), "--overwrite"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
