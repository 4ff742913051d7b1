"""Wall-time overhead of the GradientRecorder (raw shards on) on the toy runs, measured side by side.

Each repetition trains the same toy run twice, once without and once with the recorder, in alternating order, so
machine noise hits both alike. Only ``trainer.train()`` is timed (model loading and dataset preparation are not).

    python benchmarks/bench_recorder_overhead.py [--regime sft|grpo|both] [--steps 60] [--reps 3] [--preset tiny]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def train_once(regime: str, steps: int, preset: str, out: Path | None) -> float:
    from transformers import set_seed

    from gradlens.adapters import attach_lora
    from gradlens.config import TOY_TRL_DEFAULTS
    from gradlens.recorder import GradientRecorder
    from gradlens.regimes import build_grpo_trainer, build_sft_trainer
    from gradlens.toy.model import load_base_model
    from gradlens.toy.task import AdditionTask, exact_match_reward

    set_seed(0)
    model, tokenizer = load_base_model(preset)
    model = attach_lora(model)
    data = AdditionTask().dataset("train", 2048)
    overrides = {**TOY_TRL_DEFAULTS[regime], "max_steps": steps, "logging_steps": 10, "disable_tqdm": True}
    with tempfile.TemporaryDirectory() as trainer_dir:
        if regime == "sft":
            trainer = build_sft_trainer(model, tokenizer, data, output_dir=trainer_dir, overrides=overrides)
        else:
            trainer = build_grpo_trainer(model, tokenizer, data, exact_match_reward, output_dir=trainer_dir,
                                         overrides=overrides)
        if out is not None:
            GradientRecorder.attach(trainer, out, steps_per_shard=16)
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regime", choices=("sft", "grpo", "both"), default="both")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--preset", default="tiny")
    args = parser.parse_args()
    regimes = ("sft", "grpo") if args.regime == "both" else (args.regime,)
    train_once(regimes[0], 2, args.preset, None)  # warm-up: imports, kernels, caches
    for regime in regimes:
        plain, recorded = [], []
        for rep in range(args.reps):
            with tempfile.TemporaryDirectory() as tmp:
                order = (False, True) if rep % 2 == 0 else (True, False)
                for with_recorder in order:
                    t = train_once(regime, args.steps, args.preset, Path(tmp) / "run" if with_recorder else None)
                    (recorded if with_recorder else plain).append(t)
        ratios = [r / p for r, p in zip(recorded, plain, strict=True)]
        print(f"{regime}: {args.steps} steps, preset {args.preset}, {args.reps} reps | "
              f"no recorder median {statistics.median(plain):.2f} s | "
              f"recorder median {statistics.median(recorded):.2f} s | "
              f"ratio median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
