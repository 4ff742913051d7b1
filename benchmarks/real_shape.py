"""Real-shape CPU run: the SFT recipe on a random-init model of Qwen2.5-0.5B's exact shape, through a hub id.

The CPU stand-in for a GPU run. It builds Qwen2.5-0.5B from its config (the values are written below; no download:
random weights, a small BPE tokenizer trained in memory whose few hundred tokens fit the 151,936 embedding rows),
saves it under a local hub id into an offline hub cache (the layout ``from_pretrained`` reads after a download), and
runs ``recipes/qwen2.5-1.5b-gsm8k-sft.yaml`` through that id, scaled down (steps, batch, sequence length): once as
``gradlens train`` without the recorder and once with it (``--record``, the recorder of ``gradlens record``), each in
its own process, the same settings otherwise. Then ``gradlens analyze`` and ``gradlens select`` on the recorded run.

Reports the median step time with and without the recorder (the first step, with its allocations, left out) and
their ratio, each run's peak RSS, the raw shard bytes per step, and the analyze and select times; writes
``benchmarks/results/real_shape.json``, with the load average before and after the runs: the two runs follow each
other, so on shared cores the ratio holds only when nothing else ran.

    OMP_NUM_THREADS=2 python benchmarks/real_shape.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import RESULTS, check_free_disk, markdown_table, median, positive, write_json

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "qwen2.5-1.5b-gsm8k-sft.yaml"
HUB_ID = "gradlens-bench/qwen2.5-0.5b-random"
# Qwen/Qwen2.5-0.5B config.json (as published on the hub; values checked against a public copy of that file).
QWEN25_05B = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
              "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True, "rope_theta": 1e6,
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "max_window_layers": 24,
              "use_sliding_window": False, "hidden_act": "silu"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=positive, default=5,
                        help="optimizer steps of each run (the first is not timed)")
    parser.add_argument("--batch", type=positive, default=2, help="per_device_train_batch_size (the recipe's: 16)")
    parser.add_argument("--seq-len", type=positive, default=128, help="max_length (the recipe's: 512)")
    parser.add_argument("--layers", type=positive, default=QWEN25_05B["num_hidden_layers"],
                        help="fewer layers for a smoke test (24: the real shape)")
    parser.add_argument("--hidden", type=positive, default=QWEN25_05B["hidden_size"], help="smoke tests: smaller")
    parser.add_argument("--intermediate", type=positive, default=QWEN25_05B["intermediate_size"],
                        help="smoke tests: smaller")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="scratch space (removed afterwards)")
    parser.add_argument("--json", type=Path, default=RESULTS / "real_shape.json", help="where the results go")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "WORK"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    return {**QWEN25_05B, "num_hidden_layers": args.layers, "max_window_layers": args.layers,
            "hidden_size": args.hidden, "intermediate_size": args.intermediate}


def gsm_rows(n: int) -> list[dict[str, str]]:
    """GSM8K-format rows with short questions and long worked answers, so that after truncation to ``--seq-len``
    tokens most of every sequence is completion, where SFT's loss is."""
    rows = []
    for i in range(n):
        b = 17 + 2 * i
        work = " ".join(f"On day {d} Tom buys {b} apples, so he has bought {b}*{d} = <<{b}*{d}={b * d}>>{b * d}."
                        for d in range(1, 25))
        rows.append({"question": f"Tom buys {b} apples a day for 24 days. How many apples does he buy?",
                     "answer": f"{work}\n#### {24 * b}"})
    return rows


def build_world(config: dict[str, Any], work: Path, n_rows: int, hub_id: str = HUB_ID,
                dtype: str = "float32") -> dict[str, Any]:
    """A random-init Qwen2 of ``config`` (saved in ``dtype``) under ``hub_id`` in the offline hub cache of
    ``work/hf_home``, and ``n_rows`` GSM8K-format rows in ``work/data``. Also used by ``gpu_check.py``."""
    import torch
    import transformers

    from tests.helpers.hub_cache import save_to_hub_cache
    from tests.helpers.models import END_OF_TEXT, build_bpe_tokenizer

    tokenizer = build_bpe_tokenizer(END_OF_TEXT)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **config, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None))
    params = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    save_to_hub_cache(model.to(getattr(torch, dtype)), tokenizer, work / "hf_home", hub_id)
    saved = time.perf_counter() - start
    data = work / "data"
    data.mkdir()
    rows = gsm_rows(n_rows)
    for split, part in (("train", rows), ("test", rows[:8])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return {"parameters": params, "tokenizer_tokens": len(tokenizer), "save_seconds": saved}


def train_argv(args: argparse.Namespace, work: Path, kind: str) -> list[str]:
    """``gradlens train`` arguments: the recipe through the hub id, sized down; ``--record`` for the recorded run."""
    return ["train", "--config", str(RECIPE), "--model", HUB_ID, "--task", f"gsm8k:{work / 'data'}",
            "--out", str(work / kind), "--max_steps", str(args.steps), "--per_device_train_batch_size",
            str(args.batch), "--max_length", str(args.seq_len), "--n_eval", "0", "--device", "cpu",
            "--no-drift_guard", "--disable_tqdm", "true", *(["--record"] if kind == "record" else [])]


def child(args: argparse.Namespace) -> None:
    """One run in this process (so its peak RSS is its own), each step timed; writes ``WORK/KIND.json``."""
    from transformers import TrainerCallback

    from gradlens.cli.dataclass_args import config_from_args, parse_extra_flags
    from gradlens.cli.main import build_parser
    from gradlens.config import TrainConfig
    from gradlens.training import train

    kind, work = args.child[0], Path(args.child[1])

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, *_, **__) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__) -> None:
            self.times.append(time.perf_counter() - self.start)

    parsed, extra = build_parser().parse_known_args(train_argv(args, work, kind))
    config = config_from_args(TrainConfig, parsed, parse_extra_flags(extra), extra_field="trl")
    timer = StepTimer()
    result = train(config, progress=False, callbacks=[timer])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    (work / f"{kind}.json").write_text(json.dumps({"step_seconds": timer.times, "steps": result.steps,
                                                   "train_seconds": result.seconds, "peak_rss_bytes": peak}))


def run_child(args: argparse.Namespace, work: Path, kind: str) -> dict[str, Any]:
    from tests.helpers.hub_cache import offline_env

    env = {**os.environ, **offline_env(work / "hf_home"), "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, __file__, "--child", kind, str(work), "--steps", str(args.steps), "--batch",
            str(args.batch), "--seq-len", str(args.seq_len)]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"real_shape: the {kind} run failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads((work / f"{kind}.json").read_text())


def shard_bytes(run: Path) -> int:
    """Bytes of the raw gradient shards of a run (not its statistics, manifest or adapter)."""
    from gradlens import open_run

    return sum((run / shard.file).stat().st_size for shard in open_run(run).manifest.shards)


def cli_seconds(argv: list[str]) -> float:
    """Wall time of one ``gradlens`` command in this process; exits if it fails (its error line is above)."""
    from gradlens.cli.main import main as gradlens

    start = time.perf_counter()
    if gradlens(argv) != 0:
        sys.exit(f"real_shape: gradlens {argv[0]} failed")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    sys.path.insert(0, str(ROOT))  # tests.helpers.hub_cache: the hub-cache layout the tests use too
    config = model_config(args)
    weights = 4 * (config["vocab_size"] * config["hidden_size"] + config["num_hidden_layers"] * (
        4 * config["hidden_size"] ** 2 + 3 * config["hidden_size"] * config["intermediate_size"]))
    check_free_disk(args.dir, 3 * weights, "real_shape")
    work = Path(tempfile.mkdtemp(prefix="gradlens-bench-", dir=args.dir))
    try:
        world = build_world(model_config(args), work, max(64, args.batch * args.steps))
        load = {"before": os.getloadavg()}  # the cores are shared: a load above nproc makes step times noisy
        runs = {kind: run_child(args, work, kind) for kind in ("train", "record")}
        load["after"] = os.getloadavg()
        recorded = work / "record" / "run"
        steps = runs["record"]["steps"]
        analyze_s = cli_seconds(["analyze", str(recorded), "--out", str(work / "analysis"), "--no-figures",
                                 "--no-progress"])
        select_s = cli_seconds(["select", str(recorded), "--out", str(work / "select"), "--budgets", "1%", "0.1%"])
        per_step = shard_bytes(recorded) / steps
    finally:
        shutil.rmtree(work, ignore_errors=True)
    timed = {kind: median(run["step_seconds"][1:] or run["step_seconds"]) for kind, run in runs.items()}
    rows = [[kind, f"{timed[kind]:.2f}", f"{runs[kind]['peak_rss_bytes'] / 2**30:.2f}"] for kind in runs]
    print(markdown_table(["run", "median step s", "peak RSS GiB"], rows))
    ratio = timed["record"] / timed["train"]
    print(f"recorder: {ratio:.3f}x the step time; {per_step / 1e6:.1f} MB of shards per step; analyze "
          f"{analyze_s:.1f} s, select {select_s:.1f} s ({steps} steps, {world['parameters'] / 1e6:.0f} M parameters)")
    write_json(args.json, {
        "benchmark": "real_shape", "recipe": str(RECIPE.relative_to(ROOT)), "hub_id": HUB_ID, "model_config": config,
        "world": world, "settings": {"steps": args.steps, "per_device_train_batch_size": args.batch,
                                     "max_length": args.seq_len, "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "median_step_seconds": timed, "recorder_step_ratio": ratio, "runs": runs, "shard_bytes_per_step": per_step,
        "analyze_seconds": analyze_s, "select_seconds": select_s, "load_average_1_5_15_min": load,
        "rows": [dict(zip(["run", "median_step_seconds", "peak_rss_gib"], r, strict=True)) for r in rows]}, args.dir)


if __name__ == "__main__":
    main()
    sys.exit(0)
