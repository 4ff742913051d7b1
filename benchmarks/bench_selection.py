"""Wall time of ``gradlens.placement.select`` on an adapter of Qwen2.5-1.5B's LoRA-B shapes, next to one argpartition.

28 layers of q/k/v/o/gate/up/down with 1536/256/256/1536/8960/8960/1536 rows at r=16: 10,321,920 B entries.
Synthetic float64 accumulators of T=64 steps stand in for a run (only their shapes and value spread matter here).
For budgets of 0.1%, 1% and 10%, both scopes and every selector, the median of 5 calls of ``select`` (scoring
included) is set against the median of 5 ``np.argpartition`` calls on a flat array of the same length (the
selector's concatenated scores; the magnitude scores for the baselines), the floor for any top-k selection over the
whole adapter. Writes ``benchmarks/results/selection.json``.

    python benchmarks/bench_selection.py [--scopes global per_module] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from functools import partial
from pathlib import Path

import numpy as np

from gradlens.placement import INFORMED, SCOPES, SELECTORS, Budget, scores, select
from gradlens.store import Accumulators, ModuleAccumulator

ROWS = {"self_attn.q_proj": 1536, "self_attn.k_proj": 256, "self_attn.v_proj": 256, "self_attn.o_proj": 1536,
        "mlp.gate_proj": 8960, "mlp.up_proj": 8960, "mlp.down_proj": 1536}
LAYERS = 28
RANK = 16
STEPS = 64
BUDGETS = ("0.1%", "1%", "10%")
RESULTS = Path(__file__).resolve().parent / "results" / "selection.json"


def synthetic_accumulators(shapes: dict[str, tuple[int, int]]) -> Accumulators:
    """Accumulators whose sums have the spread of a drift-plus-noise run of STEPS steps (no raw gradients needed)."""
    rng = np.random.default_rng(0)
    modules = {}
    for name, shape in shapes.items():
        drift = rng.normal(0, 0.3, shape)
        positive = rng.binomial(STEPS, 1 / (1 + np.exp(-2 * drift)))  # steps with g > 0: sign stability from drift
        modules[name] = ModuleAccumulator(
            count=STEPS, sum=STEPS * drift + rng.normal(0, np.sqrt(STEPS), shape),
            sumsq=STEPS * (1 + drift**2) * rng.gamma(50, 1 / 50, shape), sumabs=STEPS * (0.8 + np.abs(drift)),
            sumsign=(2 * positive - STEPS).astype(np.float64), nonzero=np.full(shape, STEPS, np.int64),
            sqnorm=np.ones(STEPS), dot_prev=np.zeros(STEPS))
    return Accumulators(path=Path("synthetic"), steps=np.arange(STEPS), modules=modules)


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scopes", nargs="+", choices=SCOPES, default=list(SCOPES))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    shapes = {f"model.layers.{i}.{proj}": (d, RANK) for i in range(LAYERS) for proj, d in ROWS.items()}
    n = sum(d * r for d, r in shapes.values())
    print(f"adapter: {len(shapes)} modules, {n:,} B entries; median of {args.repeats} calls")
    acc = synthetic_accumulators(shapes)
    flats = {m: np.concatenate([s.ravel() for s in scores(m, acc).values()]) for m in INFORMED}
    rows = []
    print(f"{'scope':<11}{'selector':<15}{'budget':>7}{'k':>11}{'select s':>10}{'argpart s':>11}{'ratio':>7}")
    for scope in args.scopes:
        for text in BUDGETS:
            budget = Budget.parse(text, scope=scope)
            counts = budget.counts(shapes)
            k = counts if isinstance(counts, int) else sum(counts.values())
            reference = select("magnitude", budget, shapes, accumulators=acc)
            for method in SELECTORS:
                call = partial(select, method, budget, shapes, accumulators=acc, reference=reference)
                t_select = median_seconds(call, args.repeats)
                t_part = median_seconds(partial(np.argpartition, flats.get(method, flats["magnitude"]), n - k),
                                        args.repeats)
                rows.append({"scope": scope, "selector": method, "budget": text, "k": k, "select_s": t_select,
                             "argpartition_s": t_part, "ratio": t_select / t_part})
                print(f"{scope:<11}{method:<15}{text:>7}{k:>11,}{t_select:>10.3f}{t_part:>11.3f}"
                      f"{t_select / t_part:>7.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "entries": n, "modules": len(shapes), "rank": RANK, "steps": STEPS, "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
                    "processor": platform.processor() or platform.machine()},
        "rows": rows}, indent=1) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
