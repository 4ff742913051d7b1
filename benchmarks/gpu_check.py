"""GPU check: the paths a GPU run takes, on one CUDA GPU, checked and timed, in one short blind run (under 6 minutes
on an H100 by estimate). Run it through ``bash benchmarks/gpu_check.sh`` (which installs the prepared wheels and sets
the path); see docs/gpu.md.

0. preflight: the imports (gradlens, torch, transformers, peft, trl, datasets) and the GPUs; if it fails, the JSON
   says why and nothing else runs;
1. ``recording``: the recording benchmark at the Qwen2.5-1.5B adapter shape (10.3 M B entries at r=16) with the
   gradients on the GPU, first: the time the recorder blocks the training stream per step (timed with
   ``torch.cuda.current_stream().synchronize()``, so the writer's side stream is not counted), against a bare device
   copy of the same gradients, and the sustained write rate;
2. ``correctness-*``: every recorded float32 step is compared bitwise with a ``.cpu()`` copy of the gradients taken
   at the same point, and the run's per-entry sums with a CPU ``DeviceStats`` run on those copies; also with
   ``max_queue=1``, with bf16 gradients, and with the adapter spread over two GPUs when there are two;
3. ``drift``: the drift guard against what vLLM weight sync does (merge and unmerge in bf16 base weights);
4. ``recipe-sft-hub-id``: ``gradlens record --config recipes/qwen2.5-1.5b-gsm8k-sft.yaml`` in a child process, with
   the model swapped for a random-init Qwen2.5-1.5B (the recipe's architecture, saved in bf16) under a local hub id
   in an offline hub cache, the recipe's batch and sequence length, at most 10 steps and a short evaluation;
5. ``toy-path`` (last): ``gradlens record``, ``select``, ``train --mask`` under SFT and GRPO and a mini ``compare``,
   on toy:small saved as a bf16 model directory.

Each part has a time budget; a part that would end past :data:`TOTAL_BUDGET_S` is skipped. Writes one JSON: the
preflight, every part's seconds, ``torch.cuda.max_memory_allocated``, outcome and results, the GPU and versions.
Without CUDA it exits with code 2 and one line; ``--cpu`` runs every part on the CPU at toy sizes (a test of the
script; its numbers mean nothing).

    python benchmarks/gpu_check.py --out gpu_check.json [--cpu]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

TOTAL_BUDGET_S = 330  # 5.5 minutes of parts, so the whole check (imports, model saves) stays under 6
RECIPE_SFT = Path(__file__).resolve().parents[1] / "recipes" / "qwen2.5-1.5b-gsm8k-sft.yaml"
# Qwen/Qwen2.5-1.5B's config.json (the recipes' model): its shape, for a random-init stand-in.
QWEN25_15B = {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
              "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True, "rope_theta": 1e6,
              "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "max_window_layers": 28,
              "use_sliding_window": False, "hidden_act": "silu"}
QUIET = ["--logging_steps", "1000", "--disable_tqdm", "true"]
PREFLIGHT_MODULES = ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "gradlens")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from _common import positive  # numpy only, which every machine with torch has

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON to write")
    parser.add_argument("--steps", type=positive, default=20, help="optimizer steps of each toy training run")
    parser.add_argument("--record-steps", type=positive, default=30, help="steps of the 1.5B recording benchmark")
    parser.add_argument("--check-steps", type=positive, default=6, help="steps of each correctness comparison")
    parser.add_argument("--layers", type=positive, default=28, help="layers of the benchmark adapter (28: 1.5B)")
    parser.add_argument("--check-layers", type=positive, default=4, help="layers of the correctness adapter")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="scratch space (removed afterwards)")
    parser.add_argument("--cpu", action="store_true", help="run every part on the CPU at toy sizes (numbers mean "
                        "nothing)")
    return parser.parse_args(argv)


def preflight() -> dict[str, Any]:
    """Import what the parts need, each timed; the first failure is the finding (then no part runs)."""
    info: dict[str, Any] = {"python": sys.version.split()[0], "modules": {}}
    start = time.perf_counter()
    for name in PREFLIGHT_MODULES:
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(name)
        except Exception as e:  # the JSON must say it: a failed import is the whole finding
            info.update(ok=False, error=f"import {name}: {type(e).__name__}: {e}".splitlines()[0],
                        traceback=traceback.format_exc(), seconds=time.perf_counter() - start)
            return info
        info["modules"][name] = {"version": getattr(module, "__version__", None),
                                 "file": getattr(module, "__file__", None), "seconds": time.perf_counter() - t0}
    import torch

    info.update(ok=True, cuda=torch.cuda.is_available(), gpus=torch.cuda.device_count(),
                seconds=time.perf_counter() - start)
    return info


class Context:
    """What every part gets: the device (``cuda`` or ``cpu``), scratch space and the settings."""

    def __init__(self, device: str, root: Path, args: argparse.Namespace) -> None:
        self.device, self.root, self.args = device, root, args
        self._model: Path | None = None

    def toy_model(self) -> Path:
        """toy:small saved as a bfloat16 model directory (made once): loaded by path, its weights stay bf16."""
        if self._model is None:
            import torch

            from gradlens.models import load_model

            model, tokenizer = load_model("toy:small")
            self._model = self.root / "toy-small-bf16"
            model.to(torch.bfloat16).save_pretrained(self._model)
            tokenizer.save_pretrained(self._model)
        return self._model


class Part(NamedTuple):
    """One part of the check: its name, its time budget in seconds (on an H100, by estimate) and what it runs."""

    name: str
    budget_s: float
    run: Callable[[Context], dict[str, Any] | None]


class Check:
    """Runs the parts in order, each timed and with its peak GPU memory, within the total budget; ``save`` is called
    after each part (so a check killed midway still leaves what it found)."""

    def __init__(self, context: Context, save: Callable[[list[dict[str, Any]]], None]) -> None:
        self.context, self.save = context, save
        self.parts: list[dict[str, Any]] = []
        self.start = time.perf_counter()

    def run(self, part: Part) -> bool:
        import torch

        elapsed = time.perf_counter() - self.start
        row: dict[str, Any] = {"name": part.name, "budget_s": part.budget_s}
        if elapsed + part.budget_s > TOTAL_BUDGET_S and not self.context.args.cpu:
            self.parts.append({**row, "ok": False, "skipped": f"would end past the {TOTAL_BUDGET_S} s budget"})
            return False
        cuda = self.context.device == "cuda"
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            row.update(part.run(self.context) or {})
            row["ok"] = True
        except Exception as e:  # a failed part is the finding: record it and go on with the others
            row.update(ok=False, error=f"{type(e).__name__}: {e}".splitlines()[0], traceback=traceback.format_exc())
        if cuda:
            torch.cuda.synchronize()
            row["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        row["seconds"] = time.perf_counter() - t0
        row["over_budget"] = row["seconds"] > part.budget_s
        print(f"gpu_check: {part.name}: {'ok' if row['ok'] else 'FAILED ' + row.get('error', '')} "
              f"({row['seconds']:.1f} s of {part.budget_s:.0f})", flush=True)
        self.parts.append(row)
        self.save(self.parts)
        return row["ok"]


# ---------------------------------------------------------------------------------------------------------------------
# 1. recording benchmark


def stream_timed(fn: Callable[[], Any], device: str) -> float:
    """Seconds of ``fn`` as the training stream sees them: its own queue drained before and after, not the device's
    (the background writer's side stream keeps working)."""
    import torch

    sync = torch.cuda.current_stream().synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def recording_benchmark(ctx: Context, dtype: str) -> dict[str, Any]:
    """Steps at the 1.5B adapter shape with and without the recorder (same backward, interleaved), paced so the
    writer keeps up: the recorder's blocked time per step, and a bare device copy of the same gradients (the floor of
    getting them off the step); then back to back for the sustained write rate."""
    import torch
    from _common import adapter_shapes, median
    from bench_recording import POOL, WIDTH, Loop, lora_model

    from gradlens.record.recorder import GradientRecorder

    device, steps = ctx.device, ctx.args.record_steps
    shapes = adapter_shapes(ctx.args.layers)
    gen = torch.Generator(device=device).manual_seed(0)
    upstream = [[torch.randn(WIDTH, d, generator=gen, device=device) for d, _ in shapes.values()] for _ in range(POOL)]
    inputs = [torch.randn(WIDTH, WIDTH, generator=gen, device=device) for _ in range(2 * steps)]
    model, bare = lora_model(shapes, 16).to(device), lora_model(shapes, 16).to(device)
    rec = GradientRecorder(ctx.root / f"paced-{dtype}", dtype=dtype)
    loop, plain = Loop(model, rec, ctx.root), Loop(bare, None, ctx.root)
    grads = [p for n, p in bare.named_parameters() if "lora_B" in n]
    copies = [torch.empty_like(p) for p in grads]
    added, bare_steps, copy = [], [], []
    for t in range(steps):
        x, up = inputs[t], upstream[t % POOL]
        bare_steps.append(stream_timed(lambda x=x, up=up: plain.step(x, up), device))
        copy.append(stream_timed(lambda: torch._foreach_copy_(copies, [p.grad for p in grads]), device))
        added.append(stream_timed(lambda x=x, up=up: loop.step(x, up), device) - bare_steps[-1])
        time.sleep(0.2 if device == "cuda" else 0.0)  # let the writer keep up: this measures what a step waits for
    loop.end()
    rec = GradientRecorder(ctx.root / f"saturated-{dtype}", dtype=dtype)
    loop = Loop(model, rec, ctx.root)
    step_bytes = sum(s.size for s in rec.specs) * torch.empty((), dtype=getattr(torch, dtype)).element_size()

    def back_to_back() -> None:
        for t in range(steps):
            loop.step(inputs[steps + t], upstream[t % POOL])
        loop.end()  # returns once every shard is written

    wall = stream_timed(back_to_back, device)
    for d in (f"paced-{dtype}", f"saturated-{dtype}"):
        shutil.rmtree(ctx.root / d, ignore_errors=True)
    return {"dtype": dtype, "entries": sum(d * r for d, r in shapes.values()), "steps": steps,
            "bare_step_ms": 1e3 * median(bare_steps), "recorder_blocked_ms": 1e3 * median(added),
            "bare_device_copy_ms": 1e3 * median(copy), "sustained_mb_s": steps * step_bytes / wall / 1e6,
            "shard_mb_per_step": step_bytes / 1e6}


def recording(ctx: Context) -> dict[str, Any]:
    return {dtype: recording_benchmark(ctx, dtype) for dtype in ("bfloat16", "float32")}


# ---------------------------------------------------------------------------------------------------------------------
# 2. correctness


def spread_model(ctx: Context, gpus: int, dtype: str) -> tuple[Any, dict[str, tuple[int, int]]]:
    """The benchmark's stand-in adapter at ``--check-layers`` layers, in ``dtype``, its layers dealt over ``gpus``
    devices in contiguous blocks (as ``device_map`` places them)."""
    import torch
    from _common import adapter_shapes
    from bench_recording import lora_model

    shapes = adapter_shapes(ctx.args.check_layers)
    model = lora_model(shapes, 16).to(getattr(torch, dtype))
    if ctx.device == "cuda":
        layers = model.model.layers
        for i, layer in enumerate(layers):
            layer.to(torch.device("cuda", i * gpus // len(layers)))
    return model, shapes


def compare_with_copies(ctx: Context, name: str, *, max_queue: int = 4, dtype: str = "float32",
                        gpus: int = 1) -> dict[str, Any]:
    """Record ``--check-steps`` steps on the device, taking a ``.cpu()`` copy of every gradient at the point the
    recorder reads them; every stored step must equal its copy bitwise, and the run's per-entry sums those of a CPU
    ``DeviceStats`` fed the copies (one commit, so the float64 sums are added in the same order)."""
    import numpy as np
    import torch
    from bench_recording import WIDTH
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from gradlens import open_run
    from gradlens.record.recorder import GradientRecorder
    from gradlens.stats.device import DeviceStats

    model, shapes = spread_model(ctx, gpus, dtype)
    steps = ctx.args.check_steps
    params = [p for n, p in model.named_parameters() if "lora_B" in n]
    mods = dict(model.named_modules())
    gen = torch.Generator().manual_seed(1)
    first = params[0].device
    rec = GradientRecorder(ctx.root / name, max_queue=max_queue, steps_per_shard=steps)
    args = TrainingArguments(output_dir=str(ctx.root / "trainer"), report_to="none", max_grad_norm=0.0)
    state, control = TrainerState(), TrainerControl()
    rec.on_train_begin(args, state, control, model=model)
    copies = []
    for _ in range(steps):
        x = torch.randn(WIDTH, WIDTH, generator=gen).to(first, params[0].dtype)
        for p in model.parameters():
            p.grad = None
        loss = sum((mods[n](x.to(p.device)) * torch.randn(WIDTH, d, generator=gen).to(p)).sum().float().to(first)
                   for (n, (d, _)), p in zip(shapes.items(), params, strict=True))
        loss.backward()
        copies.append([p.grad.cpu() for p in params])  # synchronizes: exactly what the step's gradients were
        rec.on_pre_optimizer_step(args, state, control, model=model)
        state.global_step += 1
    rec.on_train_end(args, state, control)
    run = open_run(ctx.root / name)
    mismatched = sorted({step for step, copy in zip(run.steps, copies, strict=True) for i, n in enumerate(run.modules)
                         if not np.array_equal(run.gradients(n, [step])[0], copy[i].float().numpy())})
    reference = DeviceStats(run.specs)
    for step, copy in zip(run.steps, copies, strict=True):
        reference.add(step, [c.float() for c in copy])
    ref, acc = reference.host().accumulators(run.path), run.accumulators()
    unequal = [f"{n}.{k}" for n in run.modules for k in ("sum", "sumsq", "sumabs", "sumsign", "nonzero")
               if not np.array_equal(getattr(acc[n], k), getattr(ref[n], k))]
    sq_diff = max(float(np.max(np.abs(acc[n].sqnorm / ref[n].sqnorm - 1))) for n in run.modules)
    shutil.rmtree(ctx.root / name)
    result = {"steps": len(run.steps), "modules": len(run.modules), "gradient_dtype": dtype, "max_queue": max_queue,
              "gpus": gpus, "mismatched_steps": mismatched, "unequal_sums": unequal[:10],
              "sqnorm_max_rel_diff": sq_diff}
    if len(run.steps) != steps or mismatched or unequal or not sq_diff < 1e-12:
        raise AssertionError(f"recorded run differs from the .cpu() copies: {json.dumps(result)}")
    return result


def two_gpus(ctx: Context) -> dict[str, Any]:
    import torch

    if ctx.device != "cuda" or torch.cuda.device_count() < 2:
        return {"skipped": "needs two GPUs"}
    return compare_with_copies(ctx, "two-gpus", gpus=2)


# ---------------------------------------------------------------------------------------------------------------------
# 3. drift guard; 4. the recipe slot


def drift_cycles(ctx: Context, cycles: int = 8) -> dict[str, Any]:
    """``cycles`` merge/unmerge rounds (one per vLLM weight sync) on the bf16 model with a non-zero adapter."""
    import torch

    from gradlens.drift import DriftGuard
    from gradlens.lora import attach_lora, lora_b_parameters
    from gradlens.models import load_model_and_tokenizer

    model = attach_lora(load_model_and_tokenizer(ctx.toy_model(), dtype=torch.bfloat16)[0].to(ctx.device), r=16)
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


def gradlens(*argv: str) -> None:
    """One gradlens command in this process (so its GPU memory is measured); a non-zero exit is an error."""
    from gradlens.cli.main import main

    rc = main(list(argv))
    if rc != 0:
        raise RuntimeError(f"gradlens {argv[0]} exited with {rc}")


def record_and_train(ctx: Context, regime: str) -> dict[str, Any]:
    root, model = ctx.root / regime, ctx.toy_model()
    common = ["--model", str(model), "--regime", regime, "--max_steps", str(ctx.args.steps), "--device", ctx.device,
              *QUIET]
    gradlens("record", *common, "--out", str(root / "run"), "--n_eval", "100")
    meta = json.loads((root / "run" / "manifest.json").read_text())
    recorded = {"steps": len(meta["steps"]), "model_dtype": meta["config"]["model_dtype"],
                "accuracy": json.loads((root / "run" / "eval.json").read_text())["accuracy"]}
    gradlens("select", str(root / "run"), "--out", str(root / "sel"), "--methods", "fisher", "--budgets", "1%")
    gradlens("train", *common, "--out", str(root / "train"), "--n_eval", "100", "--learning_rate", "0.03",
             "--mask", str(root / "sel" / "masks" / "fisher-1pct.safetensors"))
    info = json.loads((root / "train" / "train.json").read_text())
    trained = {"steps": info["steps"], "train_seconds": info["train_seconds"], "model_dtype": info["model_dtype"],
               "b_nonzero": info["b_nonzero"], "mask_k": info["mask"]["k"], "accuracy": info["eval"]["accuracy"],
               "drift_guard": {k: info["drift_guard"].get(k) for k in ("dtype", "drifted", "max_abs_change")},
               "warnings": info["warnings"]}
    return {"record": recorded, "train": trained}


def mini_compare(ctx: Context) -> dict[str, Any]:
    import pandas as pd

    out = ctx.root / "compare"
    gradlens("compare", "--model", str(ctx.toy_model()), "--out", str(out), "--methods", "random", "fisher",
             "--budgets", "1%", "--seeds", "0", "--max_steps", str(ctx.args.steps), "--probe_steps", "4",
             "--full_lrs", "3e-3", "--sparse_lrs", "0.1", "--n_val", "50", "--n_eval", "100", "--eval_samples", "0",
             "--no-progress", "--device", ctx.device, *QUIET)
    table = pd.read_csv(out / "placement.csv")
    return {"rows": len(table), "accuracy": {f"{r.regime}/{r.method}": float(r.accuracy) for r in table.itertuples()}}


def toy_path(ctx: Context) -> dict[str, Any]:
    """The toy path: record, select, train with the mask under SFT and GRPO, and a mini compare."""
    return {**{regime: record_and_train(ctx, regime) for regime in ("sft", "grpo")}, "compare": mini_compare(ctx)}


# The parts, in order: the recording benchmark first (the main GPU-path check), the recipe path last.
PARTS = [
    Part("recording-1.5b", 45, recording),
    Part("correctness-float32", 20, lambda ctx: compare_with_copies(ctx, "float32")),
    Part("correctness-max-queue-1", 15, lambda ctx: compare_with_copies(ctx, "queue1", max_queue=1)),
    Part("correctness-bf16-gradients", 15, lambda ctx: compare_with_copies(ctx, "bf16", dtype="bfloat16")),
    Part("correctness-two-gpus", 20, two_gpus),
    Part("drift-merge-unmerge-bf16", 20, drift_cycles),
    Part("recipe-sft-hub-id", 100, lambda ctx: recipe_run(ctx.root, min(ctx.args.steps, 10), ctx.device)),
    Part("toy-path", 80, toy_path),
]


def recipe_run(root: Path, steps: int, device: str) -> dict[str, Any]:
    """The SFT recipe through ``gradlens record --config`` on a random-init model of its architecture, reached by a
    local hub id offline (``--cpu``: a one-layer, narrow model and a small batch, a smoke test of the path)."""
    import os
    import subprocess

    from real_shape import ROOT, build_world

    sys.path.insert(0, str(ROOT))  # tests.helpers.hub_cache: the offline hub cache the tests use too
    from tests.helpers.hub_cache import offline_env

    config = QWEN25_15B if device == "cuda" else {**QWEN25_15B, "num_hidden_layers": 1, "max_window_layers": 1,
                                                  "hidden_size": 48, "intermediate_size": 96}
    size = [] if device == "cuda" else ["--per_device_train_batch_size", "2", "--max_length", "64"]
    hub_id = "gradlens-check/qwen2.5-1.5b-random"
    world = build_world(config, root / "recipe", n_rows=max(64, 16 * steps), hub_id=hub_id, dtype="bfloat16")
    run = root / "recipe" / "run"
    argv = [sys.executable, "-m", "gradlens.cli.main", "record", "--config", str(RECIPE_SFT), "--model", hub_id,
            "--task", f"gsm8k:{root / 'recipe' / 'data'}", "--out", str(run), "--max_steps", str(steps),
            "--n_eval", "8", "--eval_max_new_tokens", "32", "--device", device, *size, *QUIET]
    env = {**os.environ, **offline_env(root / "recipe" / "hf_home"), "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"gradlens record --config exited with {proc.returncode}: {proc.stderr.strip()[-1500:]}")
    meta = json.loads((run / "manifest.json").read_text())
    return {"recipe": str(RECIPE_SFT.relative_to(ROOT)), "hub_id": hub_id, "parameters": world["parameters"],
            "steps": len(meta["steps"]), "seconds": time.perf_counter() - t0,
            "model_dtype": meta["config"]["model_dtype"], "storage_dtype": meta["config"]["record"]["storage_dtype"],
            "b_grad_norms": [s["b_grad_norm"] for s in meta["steps"]],
            "run_bytes": sum(f.stat().st_size for f in run.rglob("*") if f.is_file()),
            "accuracy": json.loads((run / "eval.json").read_text())["accuracy"]}


def environment(device: str) -> dict[str, Any]:
    import torch

    from gradlens.provenance import package_versions

    info: dict[str, Any] = {"device": device, "versions": package_versions(), "torch_cuda": torch.version.cuda}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpus=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}",
                    total_memory_gib=props.total_memory / 2**30, bf16_supported=torch.cuda.is_bf16_supported())
    return info


def write(out: Path, result: dict[str, Any]) -> None:
    """Write the JSON whole or not at all (it is rewritten after every part)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    result: dict[str, Any] = {"check": "gpu", "ok": False, "budget_seconds": TOTAL_BUDGET_S,
                              "settings": {k: str(v) for k, v in vars(args).items()}, "preflight": preflight()}
    if not result["preflight"]["ok"]:
        result["total_seconds"] = time.perf_counter() - start
        write(args.out, result)
        print(f"gpu_check: preflight FAILED: {result['preflight']['error']}; wrote {args.out}", file=sys.stderr)
        return 1
    if not args.cpu and not result["preflight"]["cuda"]:
        print("gpu_check: no CUDA GPU is available to this process (torch.cuda.is_available() is False); this check "
              "needs one (CI has none: nothing was run)", file=sys.stderr)
        return 2
    device = "cpu" if args.cpu else "cuda"
    if args.cpu:
        args.steps, args.record_steps, args.layers = min(args.steps, 2), min(args.record_steps, 3), min(args.layers, 1)
        args.check_steps, args.check_layers = min(args.check_steps, 3), min(args.check_layers, 1)
    root = Path(tempfile.mkdtemp(prefix="gradlens-gpu-check-", dir=args.dir))
    check = Check(Context(device, root, args),
                  lambda parts: write(args.out, {**result, "finished": False, "parts": parts}))
    try:
        for part in PARTS:
            check.run(part)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result.update(ok=all(p["ok"] for p in check.parts), finished=True, total_seconds=time.perf_counter() - start,
                  **environment(device), parts=check.parts)
    write(args.out, result)
    print(f"gpu_check: {'ok' if result['ok'] else 'FAILED'} in {result['total_seconds']:.0f} s; wrote {args.out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
