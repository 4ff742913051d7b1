"""Selection at 1.5B-adapter scale: ``gradlens.placement.select`` against one argpartition; the probe's cost.

28 layers of q/k/v/o/gate/up/down with 1536/256/256/1536/8960/8960/1536 rows at r=16: 10,321,920 B entries.
Synthetic float64 accumulators of T=64 steps stand in for a run (only their shapes and value spread matter here).
For budgets of 0.1%, 1% and 10%, both scopes and every selector, the median of ``--repeats`` calls of ``select``
(scoring included) is set against the median of as many ``np.argpartition`` calls on a flat array of the same length
(the selector's concatenated scores; the magnitude scores for the baselines), the floor for any top-k selection over
the whole adapter.

The probe's cost on the toy world: ``--probe-reps`` times, a plain toy run of ``--train-steps`` steps (LoRA, no
recorder) and a ``gradlens probe`` of ``--probe-steps`` steps for it (same regime and preset, statistics only, masks
at the three budgets); the probe's training seconds, and its whole wall time (model loading, recording and scoring
included), as fractions of the plain run's training seconds, medians over the repetitions.

    python benchmarks/bench_selection.py [--scopes global per_module] [--repeats 5] [--probe-steps 16]
        [--train-steps 160] [--probe-reps 2] [--regime grpo] [--preset tiny]
"""

from __future__ import annotations

import argparse
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
from _common import (
    RANK,
    adapter_shapes,
    add_output_argument,
    markdown_table,
    median,
    median_seconds,
    toy_train,
    write_json,
)

from gradlens.placement import INFORMED, SCOPES, SELECTORS, Budget, scores, select
from gradlens.store import Accumulators, ModuleAccumulator

STEPS = 64
BUDGETS = ("0.1%", "1%", "10%")


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


def probe_cost(regime: str, preset: str, probe_steps: int, train_steps: int, reps: int) -> dict[str, float]:
    """Median over ``reps`` of the probe's cost as fractions of a plain run of ``train_steps`` steps."""
    from gradlens.config import ProbeConfig
    from gradlens.placement.probe import probe

    train, wall, fraction = [], [], []
    for _ in range(reps):
        full = toy_train(regime, train_steps, preset, None)
        with tempfile.TemporaryDirectory() as tmp:
            result = probe(ProbeConfig(regime=regime, model=f"toy:{preset}", out=str(Path(tmp) / "probe"),
                                       max_steps=probe_steps, budgets=list(BUDGETS), train_steps=train_steps),
                           train_seconds=full, progress=False)
        train.append(full)
        wall.append(result.wall_seconds + sum(result.scoring_seconds.values()))
        fraction.append(result.cost["fraction_seconds"])
    return {"regime": regime, "preset": preset, "probe_steps": probe_steps, "train_steps": train_steps, "reps": reps,
            "fraction_steps": probe_steps / train_steps, "train_seconds": median(train),
            "fraction_seconds": median(fraction),
            "fraction_wall": median(w / t for w, t in zip(wall, train, strict=True))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scopes", nargs="+", choices=SCOPES, default=list(SCOPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=28, help="layers of the adapter (28: Qwen2.5-1.5B)")
    parser.add_argument("--regime", choices=("sft", "grpo"), default="grpo", help="the probe's regime")
    parser.add_argument("--preset", default="tiny", help="the probe's toy preset")
    parser.add_argument("--probe-steps", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=160, help="steps of the run the probe is for")
    parser.add_argument("--probe-reps", type=int, default=2)
    add_output_argument(parser, "selection")
    args = parser.parse_args()

    shapes = adapter_shapes(args.layers)
    n = sum(d * r for d, r in shapes.values())
    print(f"adapter: {len(shapes)} modules, {n:,} B entries; median of {args.repeats} calls", flush=True)
    acc = synthetic_accumulators(shapes)
    flats = {m: np.concatenate([s.ravel() for s in scores(m, acc).values()]) for m in INFORMED}
    rows = []
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
    for scope in args.scopes:
        cell = {(r["selector"], r["budget"]): f"{r['select_s']:.3f} ({r['ratio']:.2f})" for r in rows
                if r["scope"] == scope}
        print(f"\n{scope}: seconds of select (ratio to np.argpartition)")
        print(markdown_table(["selector", *(f"k = {b}" for b in BUDGETS)],
                             [(m, *(cell[m, b] for b in BUDGETS)) for m in SELECTORS]))
    print(f"slowest: {max(r['select_s'] for r in rows):.3f} s (target: under 1 s at every k)", flush=True)

    cost = probe_cost(args.regime, args.preset, args.probe_steps, args.train_steps, args.probe_reps)
    print(f"\nprobe on toy:{args.preset} ({args.regime}), median of {args.probe_reps}")
    print(markdown_table(["probe steps", "run steps", "fraction of steps", "run train s", "fraction of train s",
                          "fraction incl. loading + scoring"],
                         [(args.probe_steps, args.train_steps, f"{cost['fraction_steps']:.1%}",
                           f"{cost['train_seconds']:.1f}", f"{cost['fraction_seconds']:.1%}",
                           f"{cost['fraction_wall']:.1%}")]))
    write_json(args.json, {"benchmark": "selection", "entries": n, "modules": len(shapes), "rank": RANK,
                           "steps": STEPS, "repeats": args.repeats, "rows": rows, "probe": cost})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
