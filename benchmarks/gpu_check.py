"""GPU check: the paths a GPU run takes, on one CUDA GPU in bf16, timed, with peak memory, in under 8 minutes.

1. ``gradlens record`` and ``gradlens train --mask`` (a mask ``gradlens select`` made from the recorded run) under
   SFT and GRPO on the toy:small base model, saved as a bf16 model directory so its weights really are bf16;
2. a mini ``gradlens compare`` (random and fisher at 1%, one seed, both regimes, no sweep);
3. the drift guard against what vLLM weight sync does (merge and unmerge the adapter in the bf16 base weights);
4. the recording benchmark at the Qwen2.5-1.5B adapter shape (10.3 M B entries at r=16) with the gradients on the
   GPU: the time the recorder adds to a step (device-to-host copy included) and its sustained MB/s, using
   ``bench_recording.py``'s stand-in model.

Writes one JSON: seconds, ``torch.cuda.max_memory_allocated`` and outcome of every part, the GPU and package
versions. Without CUDA it exits with code 2 and one line (``--cpu`` runs the same script on the CPU at toy sizes, a
smoke test of the script itself whose numbers mean nothing).

    python benchmarks/gpu_check.py --out gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import adapter_shapes, median

BUDGET_S = 480  # parts not started by then are skipped (the check must fit in 8 minutes)
QUIET = ["--logging_steps", "1000", "--disable_tqdm", "true"]


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON to write")
    parser.add_argument("--steps", type=positive, default=20, help="optimizer steps of each toy training run")
    parser.add_argument("--record-steps", type=positive, default=30, help="steps of the 1.5B recording benchmark")
    parser.add_argument("--layers", type=positive, default=28, help="layers of the benchmark adapter (28: 1.5B)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="scratch space (removed afterwards)")
    parser.add_argument("--cpu", action="store_true", help="smoke-test this script on the CPU (numbers mean nothing)")
    return parser.parse_args(argv)


class Check:
    """Runs the parts in order, each timed and with its peak GPU memory, within the time budget."""

    def __init__(self, device: str, root: Path) -> None:
        self.device, self.root = device, root
        self.parts: list[dict[str, Any]] = []
        self.start = time.perf_counter()

    def part(self, name: str, fn: Callable[[], dict[str, Any] | None]) -> bool:
        if time.perf_counter() - self.start > BUDGET_S:
            self.parts.append({"name": name, "ok": False, "skipped": f"over the {BUDGET_S} s budget"})
            return False
        cuda = self.device == "cuda"
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        row: dict[str, Any] = {"name": name}
        t0 = time.perf_counter()
        try:
            row.update(fn() or {})
            row["ok"] = True
        except Exception as e:  # a failed part is the finding: record it and go on with the others
            row.update(ok=False, error=f"{type(e).__name__}: {e}".splitlines()[0], traceback=traceback.format_exc())
        if cuda:
            torch.cuda.synchronize()
            row["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        row["seconds"] = time.perf_counter() - t0
        print(f"gpu_check: {name}: {'ok' if row['ok'] else 'FAILED ' + row.get('error', '')} "
              f"({row['seconds']:.1f} s)", flush=True)
        self.parts.append(row)
        return row["ok"]


def gradlens(*argv: str) -> None:
    """One gradlens command in this process (so its GPU memory is measured); a non-zero exit is an error."""
    from gradlens.cli.main import main

    rc = main(list(argv))
    if rc != 0:
        raise RuntimeError(f"gradlens {argv[0]} exited with {rc}")


def bf16_toy_model(root: Path) -> Path:
    """toy:small saved as a bfloat16 model directory: loaded by path, its weights stay bf16 on a bf16 GPU."""
    from gradlens.models import load_model

    model, tokenizer = load_model("toy:small")
    path = root / "toy-small-bf16"
    model.to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def record_and_train(check: Check, model: Path, regime: str, steps: int, device: str) -> None:
    root = check.root / regime
    common = ["--model", str(model), "--regime", regime, "--max_steps", str(steps), "--device", device, *QUIET]

    def record() -> dict[str, Any]:
        gradlens("record", *common, "--out", str(root / "run"), "--n_eval", "100")
        meta = json.loads((root / "run" / "manifest.json").read_text())
        return {"steps": len(meta["steps"]), "model_dtype": meta["config"]["model_dtype"],
                "accuracy": json.loads((root / "run" / "eval.json").read_text())["accuracy"]}

    def train() -> dict[str, Any]:
        gradlens("select", str(root / "run"), "--out", str(root / "sel"), "--methods", "fisher", "--budgets", "1%")
        gradlens("train", *common, "--out", str(root / "train"), "--n_eval", "100", "--learning_rate", "0.03",
                 "--mask", str(root / "sel" / "masks" / "fisher-1pct.safetensors"))
        info = json.loads((root / "train" / "train.json").read_text())
        return {"steps": info["steps"], "train_seconds": info["train_seconds"], "model_dtype": info["model_dtype"],
                "b_nonzero": info["b_nonzero"], "mask_k": info["mask"]["k"], "accuracy": info["eval"]["accuracy"],
                "drift_guard": {k: info["drift_guard"].get(k) for k in ("dtype", "drifted", "max_abs_change")},
                "warnings": info["warnings"]}

    if check.part(f"record-{regime}", record):
        check.part(f"train-{regime}", train)


def mini_compare(check: Check, model: Path, steps: int, device: str) -> dict[str, Any]:
    out = check.root / "compare"
    gradlens("compare", "--model", str(model), "--out", str(out), "--methods", "random", "fisher", "--budgets", "1%",
             "--seeds", "0", "--max_steps", str(steps), "--probe_steps", "4", "--full_lrs", "3e-3", "--sparse_lrs",
             "0.1", "--n_val", "50", "--n_eval", "100", "--eval_samples", "0", "--no-progress", "--device", device,
             *QUIET)
    import pandas as pd

    table = pd.read_csv(out / "placement.csv")
    return {"rows": len(table), "accuracy": {f"{r.regime}/{r.method}": float(r.accuracy) for r in table.itertuples()}}


def drift_cycles(model_path: Path, device: str, cycles: int = 8) -> dict[str, Any]:
    """``cycles`` merge/unmerge rounds (one per vLLM weight sync) on the bf16 model with a non-zero adapter."""
    from gradlens.drift import DriftGuard
    from gradlens.lora import attach_lora, lora_b_parameters
    from gradlens.models import load_model_and_tokenizer

    model = attach_lora(load_model_and_tokenizer(model_path, dtype=torch.bfloat16)[0].to(device), r=16)
    with torch.no_grad():
        for _, p in lora_b_parameters(model):
            p.normal_(0, 0.02)
    guard = DriftGuard()
    guard.start(model)
    for _ in range(cycles):
        model.merge_adapter()
        model.unmerge_adapter()
    report = guard.finish(model)
    return {"cycles": cycles, **{k: report[k] for k in ("dtype", "drifted", "changed_layers", "layers",
                                                        "max_abs_change")}}


def timed(fn: Callable[[], Any], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def recording_benchmark(root: Path, steps: int, layers: int, dtype: str, device: str) -> dict[str, Any]:
    """Steps at the 1.5B adapter shape with and without the recorder (same backward, interleaved, GPU synced), then
    back to back for the sustained write rate."""
    from bench_recording import POOL, WIDTH, Loop, lora_model

    from gradlens.record.recorder import GradientRecorder

    shapes = adapter_shapes(layers)
    gen = torch.Generator(device=device).manual_seed(0)
    upstream = [[torch.randn(WIDTH, d, generator=gen, device=device) for d, _ in shapes.values()] for _ in range(POOL)]
    inputs = [torch.randn(WIDTH, WIDTH, generator=gen, device=device) for _ in range(2 * steps)]
    model, bare = lora_model(shapes, 16).to(device), lora_model(shapes, 16).to(device)
    rec = GradientRecorder(root / f"paced-{dtype}", dtype=dtype)
    loop, plain = Loop(model, rec, root), Loop(bare, None, root)
    added, bare_steps = [], []
    for t in range(steps):
        x, up = inputs[t], upstream[t % POOL]
        bare_steps.append(timed(lambda x=x, up=up: plain.step(x, up), device))
        added.append(timed(lambda x=x, up=up: loop.step(x, up), device) - bare_steps[-1])
        time.sleep(0.2)  # let the background writer keep up: this part measures what a step waits for
    loop.end()
    rec = GradientRecorder(root / f"saturated-{dtype}", dtype=dtype)
    loop = Loop(model, rec, root)
    step_bytes = sum(s.size for s in rec.specs) * torch.empty((), dtype=getattr(torch, dtype)).element_size()
    def back_to_back() -> None:
        for t in range(steps):
            loop.step(inputs[steps + t], upstream[t % POOL])
        loop.end()  # returns once every shard is written

    wall = timed(back_to_back, device)
    for d in (f"paced-{dtype}", f"saturated-{dtype}"):
        shutil.rmtree(root / d, ignore_errors=True)
    return {"dtype": dtype, "entries": sum(d * r for d, r in shapes.values()), "steps": steps,
            "bare_step_ms": 1e3 * median(bare_steps), "recorder_added_ms": 1e3 * median(added),
            "sustained_mb_s": steps * step_bytes / wall / 1e6, "shard_mb_per_step": step_bytes / 1e6}


def environment(device: str) -> dict[str, Any]:
    from gradlens.provenance import package_versions

    info: dict[str, Any] = {"device": device, "versions": package_versions(), "torch_cuda": torch.version.cuda}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    total_memory_gib=props.total_memory / 2**30, bf16_supported=torch.cuda.is_bf16_supported())
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is available to this process (torch.cuda.is_available() is False); this check "
              "needs one (CI has none: nothing was run)", file=sys.stderr)
        return 2
    device = "cpu" if args.cpu else "cuda"
    if args.cpu:
        args.steps, args.record_steps, args.layers = min(args.steps, 2), min(args.record_steps, 3), min(args.layers, 1)
    root = Path(tempfile.mkdtemp(prefix="gradlens-gpu-check-", dir=args.dir))
    check = Check(device, root)
    try:
        model = bf16_toy_model(root)
        for regime in ("sft", "grpo"):
            record_and_train(check, model, regime, args.steps, device)
        check.part("compare-mini", lambda: mini_compare(check, model, args.steps, device))
        check.part("drift-merge-unmerge-bf16", lambda: drift_cycles(model, device))
        for dtype in ("bfloat16", "float32"):
            check.part(f"recording-1.5b-{dtype}",
                       lambda dtype=dtype: recording_benchmark(root, args.record_steps, args.layers, dtype, device))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {"check": "gpu", "ok": all(p["ok"] for p in check.parts),
              "total_seconds": time.perf_counter() - check.start, "budget_seconds": BUDGET_S,
              "settings": {k: str(v) for k, v in vars(args).items()}, **environment(device), "parts": check.parts}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"gpu_check: {'ok' if result['ok'] else 'FAILED'} in {result['total_seconds']:.0f} s; wrote {args.out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
