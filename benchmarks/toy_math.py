"""The toy:math world's targets, measured through the CLI a user runs: the base model (``gradlens toy base --preset
math``), then 60-step full-B LoRA-FA runs under SFT and GRPO on several seeds (``gradlens train --model toy:math
--record``), each with held-out greedy accuracy (``eval.json``), its wall and CPU seconds (one thread: the CPU
seconds are what it takes on an idle core), and under GRPO the share of recorded steps that carry a learning signal.

    python benchmarks/toy_math.py --seeds 0 1 2 --n_eval 200 --work /tmp/toy-math

Writes ``benchmarks/results/toy_math.json``. The machine is shared, so the load average is stored with every time.

The defaults were chosen by runs off them, each a regime, a label and TRL fields, recorded in the same JSON's
``exploration`` section (kept when the benchmark is run again):

    python benchmarks/toy_math.py --seeds 0 --explore grpo t0.7 temperature=0.7 --explore grpo b32 \
        per_device_train_batch_size=32 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _common import add_output_argument, write_json
from scipy import stats

from gradlens.evaluate import wilson_interval
from gradlens.provenance import package_versions
from gradlens.store import open_run
from gradlens.toy.model import ensure_base_model

# The settings a run off the defaults may change, stored with each exploration run as TRL read them.
EXPLORED_ARGS = ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type",
                 "warmup_steps", "warmup_ratio", "max_grad_norm", "num_generations", "max_completion_length",
                 "generation_batch_size", "steps_per_generation", "num_iterations", "temperature", "beta",
                 "scale_rewards", "loss_type", "mask_truncated_completions", "max_length")


def gradlens(*args: str) -> tuple[str, float, float]:
    """Run the gradlens CLI on one thread; its stdout, wall seconds and CPU seconds (user + system, of that process
    alone: what it would take on an idle core). A failure stops the benchmark with its output."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "gradlens.cli.main", *args], stdout=stdout, stderr=stderr,
                                text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        out, err = stdout.read(), stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"gradlens {' '.join(args)} failed ({proc.returncode}):\n{out}\n{err}")
    return out, time.perf_counter() - start, usage.ru_utime + usage.ru_stime


def base_report(n_eval: int, k: int) -> dict[str, Any]:
    """``gradlens toy base --preset math``, its printed lines parsed."""
    out, seconds, cpu = gradlens("toy", "base", "--preset", "math", "--n", str(n_eval), "--k", str(k))
    value = {key: float(re.search(rf"{pattern}\s+([\d.]+)", out).group(1)) for key, pattern in
             (("greedy", "greedy accuracy:"), ("sampled", "sampled accuracy:"), (f"pass_at_{k}", f"pass@{k}:"),
              ("mean_completion_tokens", "greedy tokens:"), ("parameters", "parameters:"))}
    value["parameters"] = int(re.search(r"parameters:\s+([\d,]+)", out).group(1).replace(",", ""))
    print(out)
    return {**value, "n": n_eval, "k": k, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
            "load_average": os.getloadavg()}


def train_run(regime: str, seed: int, steps: int, n_eval: int, work: Path, fields: dict[str, str] | None = None,
              label: str = "") -> dict[str, Any]:
    """One ``gradlens train --model toy:math`` run with the regime's defaults, or with ``fields`` (TRL fields, or
    gradlens flags such as ``lora_r``) over them; accuracy, seconds and signal."""
    fields = fields or {}
    out = work / f"{regime}{'-' + label if label else ''}-seed{seed}"
    load = os.getloadavg()
    overrides = [arg for field, value in fields.items() for arg in (f"--{field}", value)]
    _, seconds, cpu = gradlens("train", "--model", "toy:math", "--regime", regime, "--max_steps", str(steps), "--seed",
                          str(seed), "--n_eval", str(n_eval), "--record", "--out", str(out), "--disable_tqdm", "true",
                          *overrides)
    evaluation = json.loads((out / "eval.json").read_text())
    train_info = json.loads((out / "train.json").read_text())
    records = open_run(out / "run").step_records
    row = {"regime": regime, **({"label": label, "fields": fields} if label else {}), "seed": seed,
           "accuracy": evaluation["accuracy"], "ci95": evaluation["ci95"],
           "n": evaluation["n"], "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
           "train_seconds": train_info.get("train_seconds"),
           "load_average_before": load, "steps": len(records),
           "zero_gradient_steps": sum(bool(r.get("zero_gradient")) for r in records)}
    if fields:  # what the run trained with, as TRL read it
        row["training_args"] = {k: v for k, v in train_info["training_args"].items() if k in EXPLORED_ARGS}
    if regime == "grpo":
        zero_std = [r.get("frac_reward_zero_std") for r in records]
        row.update(zero_reward_std_steps=sum(bool(r.get("zero_reward_std")) for r in records),
                   signal_share=sum(not (r.get("zero_reward_std") or r.get("zero_gradient")) for r in records)
                   / len(records),
                   mean_groups_with_signal=statistics.mean(1 - z for z in zero_std if z is not None),
                   reward_first_10_steps=statistics.mean(r["reward_mean"] for r in records[:10]),
                   reward_last_10_steps=statistics.mean(r["reward_mean"] for r in records[-10:]))
    print(json.dumps(row))
    return row


def explore(specs: list[list[str]], args: argparse.Namespace) -> None:
    """Train each ``REGIME LABEL FIELD=VALUE...`` on every seed and append the runs to the JSON's exploration
    section, with the package versions they ran on."""
    if not args.json.exists() or "base" not in json.loads(args.json.read_text()):
        raise SystemExit(f"--explore: {args.json} holds no base model report; run the benchmark once first")
    jobs = []
    for spec in specs:
        if len(spec) < 2 or spec[0] not in ("sft", "grpo") or any("=" not in a for a in spec[2:]):
            raise SystemExit(f"--explore {' '.join(spec)}: want REGIME LABEL FIELD=VALUE..., REGIME sft or grpo")
        regime, label, *assignments = spec
        fields = dict(a.split("=", 1) for a in assignments)
        jobs += [(regime, seed, label, fields) for seed in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda job: train_run(job[0], job[1], args.steps, args.n_eval, args.work, job[3],
                                                   job[2]), jobs))
    payload = json.loads(args.json.read_text())
    base = payload["base"]
    floor = wilson_interval(round(base["greedy"] * base["n"]), base["n"])[0]
    for run in runs:  # below the base model's interval: the rate (or setting) broke the model; not averaged
        run["collapsed"] = run["accuracy"] < floor
    section = payload.setdefault("exploration", {
        "note": "runs off the defaults (gradlens train --model toy:math --max_steps STEPS --n_eval N plus FIELDS), "
                "appended by --explore; accuracy is greedy on the first n held-out problems, cpu_seconds the one-"
                "thread process's user+system time; collapsed: greedy accuracy below the base model's 95% Wilson "
                "interval on the same prompts", "runs": []})
    section["runs"] += [{**run, "steps": args.steps, "versions": package_versions(), "load_average_after":
                         os.getloadavg()} for run in runs]
    write_json(args.json, {k: v for k, v in payload.items() if k != "machine"})


def mean_interval(values: list[float]) -> dict[str, float]:
    """Mean and the t-based 95% interval over seeds."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return {"mean": mean, "ci95": [math.nan, math.nan]}
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "ci95": [mean - half, mean + half]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--regimes", nargs="+", default=["sft", "grpo"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--n_eval", type=int, default=200)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=1, help="training runs at once (each on one thread)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gradlens-toy-math"))
    parser.add_argument("--explore", nargs="+", action="append", metavar="REGIME LABEL FIELD=VALUE",
                        help="instead of the benchmark, runs with these fields off the defaults, appended to the "
                             "JSON's exploration section (repeat for several settings)")
    add_output_argument(parser, "toy_math")
    args = parser.parse_args()
    if args.explore:
        explore(args.explore, args)
        return
    recipe = json.loads((ensure_base_model("math") / "gradlens_recipe.json").read_text())
    base = base_report(args.n_eval, args.k)
    jobs = [(regime, seed) for regime in args.regimes for seed in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:  # each job is its own one-thread process
        runs = list(pool.map(lambda job: train_run(*job, args.steps, args.n_eval, args.work), jobs))
    summary = {}
    for regime in args.regimes:
        rows = [r for r in runs if r["regime"] == regime]
        summary[regime] = {"accuracy": mean_interval([r["accuracy"] for r in rows]),
                           "gain_over_base": mean_interval([r["accuracy"] - base["greedy"] for r in rows]),
                           "cpu_seconds_max": max(r["cpu_seconds"] for r in rows)}
        if regime == "grpo":
            summary[regime]["signal_share"] = mean_interval([r["signal_share"] for r in rows])
    # Sections this run does not write (the exploration, timings taken by hand) are kept.
    kept = json.loads(args.json.read_text()) if args.json.exists() else {}
    write_json(args.json, {**kept, "benchmark": "toy_math", "steps": args.steps, "seeds": args.seeds,
                           "recipe": {k: recipe[k] for k in ("build_seconds", "pretrain_steps", "batch_size",
                                                             "learning_rate", "carryless_share", "threads")},
                           "base": base, "summary": summary, "runs": runs})


if __name__ == "__main__":
    main()
