"""RELEX (arXiv 2605.21468): GRPO weight-update trajectories are dominated by a rank-1 direction.

From the runs of ``scripts/claim_runs.py`` (SFT and GRPO on ``toy:small`` and ``toy:math``, 60 steps, seeds 0-2,
float32), B after every step: the trajectory's rows are the cumulative update after each step (``B_t``, and
``Delta W_t = s B_t A``), and its top-direction share ``s_1^2 / sum s_i^2`` (:mod:`gradlens.stats.trajectory`) is
taken per module and pooled over the adapter, next to the same share of random walks with the run's own step norms in
the same number of dimensions (the null: a random walk already scores about 0.8). ``excess`` is share minus the
null's mean; ``above_null`` the share of modules above the null's 95th percentile. The per-step updates' own top share
(rows ``u_t = B_t - B_{t-1}``, not summed) is reported too, against random directions with the same norms.

Writes ``benchmarks/results/claim_rank1.json``.

    python scripts/claim_trajectory_rank1.py --runs runs/claims --resume
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: experiments/ is not installed

import numpy as np

import experiments.claims as claims
from gradlens.stats.core import gram_product
from gradlens.stats.trajectory import random_walk_top_shares, top_share, unit_wishart_gram

STATS = ("share_b", "null_b", "excess_b", "share_dw", "null_dw", "excess_dw", "step_share_b", "step_null_b",
         "module_median_share_b", "module_median_excess_b", "module_above_null_b")


def increment_gram(gram: np.ndarray) -> np.ndarray:
    """The Gram of the steps ``u_t = x_t - x_{t-1}`` (``x_0 = 0``) from the Gram of the partial sums ``x_t``."""
    d = np.eye(len(gram)) - np.eye(len(gram), k=-1)
    return d @ gram @ d.T


def read(gram: np.ndarray, dim: int, draws: int, seed: int) -> dict[str, float]:
    """Top share of a cumulative trajectory with Gram ``gram`` in ``dim`` dimensions, its random-walk null (mean and
    95th percentile) and the per-step updates' top share against random directions of the same norms."""
    steps = increment_gram(gram)
    norms = np.sqrt(np.clip(np.diag(steps), 0, None))
    null = random_walk_top_shares(norms, dim, draws=draws, seed=seed)
    rng = np.random.default_rng(seed + 1)
    step_null = [top_share(unit_wishart_gram(len(norms), dim, rng) * np.outer(norms, norms)) for _ in range(draws)]
    share = top_share(gram)
    return {"share": share, "null": float(null.mean()), "null_p95": float(np.quantile(null, 0.95)),
            "excess": share - float(null.mean()), "step_share": top_share(steps),
            "step_null": float(np.mean(step_null))}


def measure(run_dir: Path, draws: int, seed: int) -> dict[str, Any]:
    traj = claims.load_trajectory(run_dir)
    a, scaling = claims.adapter_factors(run_dir)
    modules, pooled_b, pooled_w, dim_b = {}, 0.0, 0.0, 0
    for i, (name, b) in enumerate(sorted(traj.items())):
        t = len(b)
        gb = gram_product(b.reshape(t, -1))
        gw = gram_product((scaling * (b.astype(np.float64) @ a[name].astype(np.float64))).reshape(t, -1))
        pooled_b, pooled_w, dim_b = pooled_b + gb, pooled_w + gw, dim_b + b[0].size
        rb, rw = read(gb, b[0].size, draws, seed + 7 * i), read(gw, b[0].size, draws, seed + 7 * i + 3)
        modules[name] = {"share_b": rb["share"], "null_b": rb["null"], "null_p95_b": rb["null_p95"],
                         "excess_b": rb["excess"], "share_dw": rw["share"], "null_dw": rw["null"]}
    rb, rw = read(pooled_b, dim_b, 4 * draws, seed), read(pooled_w, dim_b, 4 * draws, seed + 1)
    per = list(modules.values())
    return {"share_b": rb["share"], "null_b": rb["null"], "null_p95_b": rb["null_p95"], "excess_b": rb["excess"],
            "share_dw": rw["share"], "null_dw": rw["null"], "excess_dw": rw["excess"],
            "step_share_b": rb["step_share"], "step_null_b": rb["step_null"],
            "module_median_share_b": float(np.median([m["share_b"] for m in per])),
            "module_median_excess_b": float(np.median([m["excess_b"] for m in per])),
            "module_above_null_b": float(np.mean([m["share_b"] > m["null_p95_b"] for m in per])),
            "modules": modules}


def main(argv: list[str]) -> int:
    p = claims.parser(__doc__, "benchmarks/results/claim_rank1.json")
    p.add_argument("--draws", type=int, default=100, help="random walks per module (4x for the pooled adapter)")
    a = p.parse_args(argv)
    wall, cpu = time.time(), claims.cpu_seconds()
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for world, regime, seed, run_dir in claims.float32_runs(Path(a.runs), a.seeds, a.resume):
        runs.setdefault(f"{world} {regime}", {})[seed] = measure(run_dir, a.draws, seed=1000 * seed)
    summary = {key: {s: claims.interval([r[s] for r in rows.values()]) for s in STATS} for key, rows in runs.items()}
    for world in claims.WORLDS:
        summary[f"{world} grpo-sft"] = {s: claims.interval(
            [runs[f"{world} grpo"][k][s] - runs[f"{world} sft"][k][s] for k in a.seeds]) for s in STATS}
    result = {"claim": "arXiv 2605.21468 (RELEX): GRPO weight-update trajectories are dominated by a rank-1 direction",
              "steps": claims.STEPS, "seeds": a.seeds, "draws": a.draws, "summary": summary, "runs": runs}
    claims.write_result(Path(a.out), result, argv, wall, cpu)
    for key, row in summary.items():
        print(key, "  ".join(f"{s} {v['mean']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]" for s, v in row.items()))
    print(f"claim_trajectory_rank1: {a.out}; {time.time() - wall:.0f} s wall, {claims.cpu_seconds() - cpu:.0f} s CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
