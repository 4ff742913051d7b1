"""The phase diagram of the placement claim: informed-minus-random gap (share of the full-LoRA gain, paired per seed)
against the budget, SFT and GRPO, at two widths and (at the first width) two run lengths, next to what
``gradlens diagnose`` predicts for the same cells.

    python scripts/phase_diagram.py --out runs/phase                 # the full setting (the defaults)
    python scripts/phase_diagram.py --out runs/phase --resume        # continue after an interruption
    python scripts/phase_diagram.py --out runs/phase-math --widths toy:math --steps 60 --space lora_b weight --resume
                                                                     # the toy:math world, both spaces

Writes OUT/<cell>-<regime>/ (one ``gradlens compare`` per cell, space and regime; a weight-space cell is named
<model>-<steps>steps-weight; ``--regimes sft`` and ``--regimes grpo``
can run as two processes into one OUT, then once more with ``--resume`` to draw both), OUT/phase.csv,
OUT/phase.json, OUT/phase.png and a copy of the figure at --figure (default figures/04_phase.png). The default widths
include ``toy:wide``, a preset that gradlens/toy_presets.py must define (hidden 512, MLP 1024, 2 layers); pass
--widths toy:small without it.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: experiments/ is not installed

from experiments.bundle import phase_bundle
from experiments.rivals import PhaseConfig, run_phase
from gradlens.errors import GradlensError
from gradlens.fsio import json_dump


def parse(argv: list[str]) -> tuple[PhaseConfig, Path | None, bool, Path | None]:
    d = PhaseConfig(out="")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/phase")
    p.add_argument("--figure", default="figures/04_phase.png", help="copy of the figure ('' for none)")
    p.add_argument("--widths", nargs="+", default=d.widths, help="models; the first one also runs every --steps")
    p.add_argument("--task", default=d.task, help="as gradlens compare --task (e.g. gsm8k:FILE on a real model; "
                   "default: each model's own task, toy:math's word problems for toy:math, else addition)")
    p.add_argument("--space", nargs="+", default=d.spaces, choices=["lora_b", "weight"],
                   help="spaces: lora_b (the default, B of LoRA-FA) and/or weight (the base weights W)")
    p.add_argument("--steps", nargs="+", type=int, default=d.steps)
    p.add_argument("--regimes", nargs="+", default=d.regimes)
    p.add_argument("--budgets", nargs="+", default=d.budgets)
    p.add_argument("--method", default=d.method, help="the informed selector")
    p.add_argument("--seeds", nargs="+", type=int, default=d.seeds)
    p.add_argument("--probe_steps", type=int, default=d.probe_steps)
    p.add_argument("--full_lrs", nargs="*", type=float, default=d.full_lrs, help="none: the regime's default rate")
    p.add_argument("--sparse_lrs", nargs="+", type=float, default=d.sparse_lrs)
    p.add_argument("--sweep_seeds", nargs="+", type=int, default=d.sweep_seeds)
    p.add_argument("--grid_extensions", type=int, default=d.grid_extensions)
    p.add_argument("--n_val", type=int, default=d.n_val)
    p.add_argument("--n_eval", type=int, default=d.n_eval)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--results", default=None, help="also write one JSON (to commit) holding phase.json and every "
                   "cell's provenance, summary, paired differences, sweep and runs")
    p.add_argument("--tables_only", action="store_true",
                   help="train nothing: tabulate and draw the cells already in --out (each with the seeds it ran)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    a = p.parse_args(argv)
    config = PhaseConfig(out=a.out, widths=a.widths, task=a.task, spaces=a.space, steps=a.steps, regimes=a.regimes,
                         budgets=a.budgets,
                         method=a.method, seeds=a.seeds, probe_steps=a.probe_steps, full_lrs=a.full_lrs or None,
                         sparse_lrs=a.sparse_lrs, sweep_seeds=a.sweep_seeds, grid_extensions=a.grid_extensions,
                         n_val=a.n_val, n_eval=a.n_eval, resume=a.resume, progress=a.progress)
    return config, Path(a.figure) if a.figure else None, a.tables_only, Path(a.results) if a.results else None


def main(argv: list[str]) -> int:
    try:
        config, figure, tables_only, results = parse(argv)
        for model, steps in config.cells():  # refuse a missing preset before hours of training
            for regime in config.regimes:
                for space in config.spaces:
                    config.compare_config(model, steps, regime, Path(config.out), space)
        wall = time.time()
        result = run_phase(config, train=not tables_only)
    except GradlensError as e:
        print(f"phase_diagram: error: {e}", file=sys.stderr)
        return 2
    cpu = sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    out = Path(config.out)
    if figure is not None:
        figure.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "phase.png", figure)
    if results is not None:
        json_dump(phase_bundle(out), results)
    agree = result["agreement"]
    for row in result["rows"]:
        print(f"{row['cell']} {row['regime']:>4} {row['budget']:>6}: gap {row['gap']:+.3f} "
              f"[{row['gap_lo']:+.3f}, {row['gap_hi']:+.3f}] over {row['n_pairs']} seeds; recovery measured "
              f"{row['measured_recovery']:.2f}, predicted {row['predicted_recovery']:.2f}")
    s = agree["spearman_predicted_recovery"]
    print(f"diagnose vs measured recovery: Spearman {s['rho']:.2f} over {s['n']} cells; wrong in "
          f"{len(agree['wrong'])} (other side of {agree['wrong_at']:.0%})")
    print(f"phase_diagram: {out}/phase.csv, phase.json, phase.png; {time.time() - wall:.0f} s wall, {cpu:.0f} s CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
