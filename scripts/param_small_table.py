"""Is the rival conflict the parameterisation? The table of ``docs/weight-space.md`` ("toy:small"): per regime, space
and budget, base, full, random and sign held-out accuracy over seeds, sign - random paired, random's share of full's
gain, and weight minus lora_b paired per seed, from the cells ``scripts/phase_diagram.py --space lora_b weight``
wrote into one ``--out``.

    python scripts/param_small_table.py runs/param-small --json benchmarks/results/param_small.json \
        --log runs/param-sft.log --command "python scripts/phase_diagram.py ..." --note "reduced: ..."

The JSON carries the provenance (the commands, versions, seeds, the rates each run trained at, the sweep's notes,
what was reduced, CPU and wall seconds parsed from ``/usr/bin/time -f "TIME REGIME SPACE wall %e user %U sys %S"``
lines in the logs); a diverged run is counted per row, never averaged in.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Any

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: experiments/ is not installed

from experiments.rivals import cell_dir
from gradlens.compare.tables import paired_differences, space_table, summarize
from gradlens.errors import GradlensError
from gradlens.fsio import json_dump, read_json
from gradlens.provenance import package_versions

SPACES = ("lora_b", "weight")
TIME_LINE = re.compile(r"TIME (\w+) (\w+) wall ([\d.]+) user ([\d.]+) sys ([\d.]+)")


def load(out: Path, model: str, steps: int, regime: str) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Both spaces' held-out rows of one regime, and each cell's provenance (its config and sweep notes)."""
    frames, provs = [], []
    for space in SPACES:
        cell = cell_dir(out, model, steps, regime, space)
        if not (cell / "placement.csv").is_file():
            continue
        frames.append(pd.read_csv(cell / "placement.csv", dtype={"budget": str}).assign(
            budget=lambda d: d["budget"].fillna("")))
        if (cell / "provenance.json").is_file():
            prov = read_json(cell / "provenance.json", "compare provenance")
            provs.append({"cell": cell.name, "space": space, "notes": prov.get("notes", []),
                          "diverged_runs": prov.get("diverged_runs"), "seconds": prov.get("seconds"),
                          "config": {k: prov["config"].get(k) for k in ("full_lrs", "sparse_lrs", "sweep_seeds",
                                                                        "grid_extensions", "seeds", "budgets",
                                                                        "n_val", "n_eval", "max_steps")}})
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), provs


def _num(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)


def rows_of(placement: pd.DataFrame) -> list[dict[str, Any]]:
    """One row per regime, space and budget: the references and both placements with their intervals."""
    summary = summarize(placement)
    paired = paired_differences(placement)
    rows = []
    for (space, regime), s in summary.groupby(["space", "regime"], sort=False):
        ref = {m: s[s["method"] == m].iloc[0] for m in ("base", "full") if (s["method"] == m).any()}
        for budget in [b for b in dict.fromkeys(s["budget"]) if b]:
            row: dict[str, Any] = {"regime": regime, "space": space, "budget": budget}
            for name, r in [*ref.items(), *((m, s[(s["method"] == m) & (s["budget"] == budget)]) for m in
                                            ("random", "sign"))]:
                r = r.iloc[0] if isinstance(r, pd.DataFrame) else r
                row[name] = {"mean": _num(r["accuracy_mean"]), "ci95": [_num(r["ci95_lo"]), _num(r["ci95_hi"])],
                             "n_seeds": int(r["n_seeds"]), "n_diverged": int(r["n_diverged"]), "lr": float(r["lr"]),
                             "k": _num(r["k"]), "gain_share": _num(r["gain_recovered"]),
                             "gain_share_ci95": [_num(r["gain_recovered_lo"]), _num(r["gain_recovered_hi"])]}
            per_seed = placement[(placement["space"] == space) & (placement["regime"] == regime)
                                 & (placement["budget"].isin(["", budget]))]
            row["per_seed"] = per_seed[["method", "seed", "lr", "accuracy", "diverged"]].to_dict("records")
            p = paired[(paired["space"] == space) & (paired["regime"] == regime) & (paired["budget"] == budget)
                       & (paired["method"] == "sign")]
            if len(p):
                p = p.iloc[0]
                row["sign_minus_random"] = {"mean": _num(p["diff_mean"]), "ci95": [_num(p["ci95_lo"]),
                                                                                   _num(p["ci95_hi"])],
                                            "n_pairs": int(p["n_pairs"]), "n_excluded": int(p["n_excluded"])}
            rows.append(row)
    return rows


def timings(logs: list[Path]) -> list[dict[str, Any]]:
    """CPU (user + sys) and wall seconds of each phase_diagram process, as ``/usr/bin/time`` printed them."""
    out = []
    for log in logs:
        try:
            text = log.read_text()
        except OSError as e:
            raise GradlensError(f"{log}: cannot read the log ({e.strerror})") from None
        for m in TIME_LINE.finditer(text):
            out.append({"regime": m[1], "space": m[2], "wall_s": float(m[3]),
                        "cpu_s": round(float(m[4]) + float(m[5]), 1), "log": str(log)})
    return out


def _ci(d: dict[str, Any] | None, signed: bool = False) -> str:
    if not d or d["mean"] is None:
        return "-"
    f = "{:+.3f}" if signed else "{:.3f}"
    lo, hi = d["ci95"]
    interval = f" [{f.format(lo)}, {f.format(hi)}]" if lo is not None else ""
    bad = f" ({d['n_diverged']} diverged)" if d.get("n_diverged") else ""
    return f.format(d["mean"]) + interval + bad


def markdown(rows: list[dict[str, Any]], spaces: list[dict[str, Any]]) -> str:
    """The two tables of the docs section."""
    lines = ["| regime | space | budget (k) | base | full (lr) | random (lr) | sign (lr) | sign - random, paired "
             "| random's share of full's gain |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def acc(name: str, r: dict[str, Any] = r) -> str:
            d = r.get(name)
            return f"{_ci(d)} ({d['lr']:g})" if d else "-"

        share = r.get("random", {})
        share_text = "-" if share.get("gain_share") is None else f"{share['gain_share']:.2f}" + (
            f" [{share['gain_share_ci95'][0]:.2f}, {share['gain_share_ci95'][1]:.2f}]"
            if share["gain_share_ci95"][0] is not None else "")
        k = r.get("random", {}).get("k")
        lines.append(f"| {r['regime'].upper()} | {r['space']} | {r['budget']} ({k:.0f}) | {r['base']['mean']:.3f} | "
                     f"{acc('full')} | {acc('random')} | {acc('sign')} | {_ci(r.get('sign_minus_random'), True)} | "
                     f"{share_text} |")
    lines += ["", "| regime | method | budget | weight | lora_b | weight - lora_b, paired | pairs |",
              "|---|---|---|---|---|---|---|"]
    for s in spaces:
        lo, hi = s["ci95_lo"], s["ci95_hi"]
        interval = f" [{lo:+.3f}, {hi:+.3f}]" if lo is not None and math.isfinite(lo) else ""
        lines.append(f"| {s['regime'].upper()} | {s['method']} | {s['budget'] or 'all'} | {s['accuracy_weight']:.3f} "
                     f"| {s['accuracy_lora_b']:.3f} | {s['diff_mean']:+.3f}{interval} | {s['n_pairs']} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the phase_diagram --out holding both spaces' cells")
    p.add_argument("--model", default="toy:small")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--regimes", nargs="+", default=["sft", "grpo"])
    p.add_argument("--json", default="benchmarks/results/param_small.json")
    p.add_argument("--log", nargs="*", default=[], help="logs holding /usr/bin/time's TIME lines")
    p.add_argument("--command", action="append", default=[], help="a command that produced the cells")
    p.add_argument("--note", action="append", default=[], help="what was reduced, and other caveats")
    a = p.parse_args(argv)
    try:
        rows, spaces, cells = [], [], []
        for regime in a.regimes:
            placement, provs = load(Path(a.out), a.model, a.steps, regime)
            if not len(placement):
                continue
            rows += rows_of(placement)
            table = space_table(placement)
            spaces += [{k: (_num(v) if isinstance(v, float) else v) for k, v in r.items()}
                       for r in table.to_dict("records")] if len(table) else []
            cells += provs
        if not rows:
            raise GradlensError(f"{a.out}: no finished cells of {a.model} at {a.steps} steps")
        result = {"benchmark": "param_small", "question": "under GRPO, does a random 1% of W recover full "
                  "fine-tuning's gain while a random 1% of B does not? (toy:small, 60 steps)", "model": a.model,
                  "steps": a.steps, "commands": a.command, "reduced": a.note, "timings": timings(
                      [Path(x) for x in a.log]), "cells": cells, "rows": rows, "weight_minus_lora_b": spaces,
                  "versions": package_versions()}
        json_dump(result, a.json)
    except GradlensError as e:
        print(f"param_small_table: error: {e}", file=sys.stderr)
        return 2
    print(markdown(rows, spaces))
    print(f"param_small_table: {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
