"""Record every run the published-claims scripts read (``scripts/claim_*.py``), one at a time, 60 steps each: SFT
and GRPO on ``toy:small`` and ``toy:math`` in float32, and GRPO on ``toy:small`` with bf16 master weights, seeds 0-2;
then GRPO on ``toy:small`` at learning rates 1e-4 and 1e-5 (the task's is 1e-3) in float32 and bf16. Each run keeps
its raw gradient shards and B after every step (:mod:`experiments.claims`).

    python scripts/claim_runs.py --out runs/claims --resume
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: experiments/ is not installed

from experiments.claims import cpu_seconds, ensure_run, n_eval, run_name

LOW_LRS = (1e-4, 1e-5)
PLAN = ([("toy:small", "grpo", False, None), ("toy:small", "grpo", True, None), ("toy:small", "sft", False, None),
         ("toy:math", "sft", False, None), ("toy:math", "grpo", False, None)]
        + [("toy:small", "grpo", bf16, lr) for lr in LOW_LRS for bf16 in (False, True)])


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/claims")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--only", nargs="+", default=None, help="run names to record (default: the whole plan)")
    p.add_argument("--resume", action="store_true", help="reuse finished runs")
    a = p.parse_args(argv)
    wall = time.time()
    for model, regime, bf16, lr in PLAN:
        for seed in a.seeds:
            name = run_name(model, regime, seed, bf16, lr)
            if a.only and name not in a.only:
                continue
            _, cost = ensure_run(Path(a.out), model, regime, seed, bf16_master=bf16, resume=a.resume,
                                 n_eval=n_eval(model), learning_rate=lr)
            print(f"claim_runs: {name}: {cost}", flush=True)
    print(f"claim_runs: done; {time.time() - wall:.0f} s wall, {cpu_seconds():.0f} s CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
