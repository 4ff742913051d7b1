"""Wall-time overhead of the GradientRecorder (raw shards on) on real toy runs, measured side by side.

Each repetition trains the same toy run twice, once without and once with the recorder, in alternating order, so
machine noise hits both alike. Only ``trainer.train()`` is timed (model loading and dataset preparation are not).
Reports the median over repetitions of the on / off ratio.

    python benchmarks/bench_recorder_overhead.py [--regime sft|grpo|both] [--steps 60] [--reps 3] [--preset tiny]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import add_output_argument, markdown_table, median, toy_train, write_json


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regime", choices=("sft", "grpo", "both"), default="both")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--preset", default="tiny")
    add_output_argument(parser, "recorder_overhead")
    args = parser.parse_args()
    regimes = ("sft", "grpo") if args.regime == "both" else (args.regime,)
    toy_train(regimes[0], 2, args.preset, None)  # warm-up: imports, kernels, caches
    rows = []
    for regime in regimes:
        plain, recorded = [], []
        for rep in range(args.reps):
            with tempfile.TemporaryDirectory() as tmp:
                for with_recorder in (False, True) if rep % 2 == 0 else (True, False):
                    t = toy_train(regime, args.steps, args.preset, Path(tmp) / "run" if with_recorder else None)
                    (recorded if with_recorder else plain).append(t)
        ratios = [r / p for r, p in zip(recorded, plain, strict=True)]
        rows.append({"regime": regime, "steps": args.steps, "preset": args.preset, "reps": args.reps,
                     "off_s": median(plain), "on_s": median(recorded), "ratio": median(ratios),
                     "ratio_min": min(ratios), "ratio_max": max(ratios), "off_all": plain, "on_all": recorded})
    print(markdown_table(["regime", "off s", "on s", "on / off (range)"],
                         [(r["regime"], f"{r['off_s']:.1f}", f"{r['on_s']:.1f}",
                           f"{r['ratio']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})") for r in rows]))
    write_json(args.json, {"benchmark": "recorder_overhead", "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
