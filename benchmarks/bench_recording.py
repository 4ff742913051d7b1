"""Recording at 1.5B-adapter scale: how long the recorder blocks a training step, and how fast it writes shards.

A stand-in model holds PEFT LoRA layers (r=16) whose ``lora_B`` have Qwen2.5-1.5B's exact shapes (all 7 projections
of 28 layers, 10,321,920 entries; the base layers are 16 features wide, since only B's shape matters here). Each
step a backward through it produces fresh rank-16 gradients, and the real :class:`GradientRecorder` sees the events a
Trainer sends (``on_train_begin``, ``on_pre_optimizer_step``, ``on_optimizer_step``, ``on_train_end``; the loop
does not clip, as a Trainer clips in its own time), so the whole write path runs: the copy into the ring, the clip
statistics, background queue, float64 accumulators, shards, manifest. For each storage dtype:

1. raw disk bandwidth (median of ``--disk-repeats``): the same bytes as the run's shards, in files of the shard size,
   written with ``ndarray.tofile`` + fsync;
2. sustained throughput: ``--steps`` recorded steps back to back (training faster than the disk), shard bytes over
   the time from the first step to ``on_train_end`` returning; its ratio to 1;
3. blocked time per step, with a training loop the writer can keep up with (a pause of 1.25x the writer's seconds
   per step from 2 after each step): the step time with the recorder minus that of an identical model without one
   (same backward, interleaved), median over the steps; its ratio to the median time of a bare copy of the same
   gradients into new host tensors (``tensor.to("cpu", copy=True)``, timed in the same steps), the floor for getting
   them off the step;
4. shard writing alone (``--writer``, or only it with ``--writer-only``): :class:`RunWriter` fed precomputed
   gradients, committed (``flush``) at the 1.5B adapter's steps per shard whatever ``--layers`` (so a shard weighs
   against the statistics as it does at full size): shard bytes per second of commit time (``flush`` and ``close``:
   shard, statistics, manifest; ``add_step``'s accumulation is timed apart), its ratio to raw disk, and the bytes
   actually written (``/proc/self/io`` ``wchar``) per shard byte, the final compaction at close included.

With ``--baseline REV`` every measurement also runs on the gradlens of git revision REV, side by side (each code in
a fresh process, the old one first).

Bytes written per shard byte in 2 are measured the same way (the whole process's ``wchar``).

    python benchmarks/bench_recording.py [--steps 50] [--dtypes float32 bfloat16] [--layers 28] [--dir /tmp]
    python benchmarks/bench_recording.py --writer-only --layers 4 --steps 96 --baseline b7a7f9c
    python benchmarks/bench_recording.py --layers 4 --baseline eec7250
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import (
    adapter_shapes,
    add_output_argument,
    check_free_disk,
    markdown_table,
    median,
    seconds,
    write_json,
)

REPO = Path(__file__).resolve().parents[1]
WIDTH = 16  # input features of the stand-in linear layers (and rows of the batch): B's gradient is rank 16
POOL = 4  # distinct output gradients, cycled with a fresh input each step


class StandIn(torch.nn.Module):
    """``model.layers.{i}.{self_attn|mlp}.{proj}`` linear layers of the 1.5B adapter's output widths."""

    def __init__(self, shapes: dict[str, tuple[int, int]]) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList()
        for name, (d_out, _) in shapes.items():
            i, parent, proj = name.split(".")[2:]
            while len(self.model.layers) <= int(i):
                self.model.layers.append(torch.nn.ModuleDict({"self_attn": torch.nn.ModuleDict(),
                                                               "mlp": torch.nn.ModuleDict()}))
            self.model.layers[int(i)][parent][proj] = torch.nn.Linear(WIDTH, d_out, bias=False)
        self.names = list(shapes)

    def loss(self, x: torch.Tensor, upstream: list[torch.Tensor]) -> torch.Tensor:
        """``sum_m <layer_m(x), upstream_m>``: its B gradients are ``upstream_m^T (x A_m^T)``, rank 16."""
        mods = dict(self.named_modules())
        return sum((mods[n](x) * u).sum() for n, u in zip(self.names, upstream, strict=True))


def lora_model(shapes: dict[str, tuple[int, int]], rank: int) -> torch.nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    from gradlens.lora import freeze_lora_a

    torch.manual_seed(0)
    model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj",
                                    "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]), StandIn(shapes))
    freeze_lora_a(model)
    for p in (p for n, p in model.named_parameters() if "lora_B" in n):
        torch.nn.init.normal_(p, std=0.01)  # non-zero B, so A gets a gradient path like in training (A is frozen)
    return model


class Loop:
    """A minimal training loop sending the Trainer's events to a recorder (``None``: the same loop without one)."""

    def __init__(self, model: torch.nn.Module, recorder: Any, tmp: Path) -> None:
        from transformers import TrainerControl, TrainerState, TrainingArguments

        self.model, self.recorder = model, recorder
        # no clipping: a Trainer clips in its own time, and without one the recorder has no clipping to read
        self.args = TrainingArguments(output_dir=str(tmp / "trainer"), report_to="none", max_grad_norm=0.0)
        self.state, self.control = TrainerState(), TrainerControl()
        if recorder is not None:
            recorder.on_train_begin(self.args, self.state, self.control, model=model)

    def step(self, x: torch.Tensor, upstream: list[torch.Tensor]) -> float:
        """One optimizer step's backward and recorder events (no optimizer update); returns its seconds."""
        for p in self.model.parameters():
            p.grad = None
        start = time.perf_counter()
        self.model.loss(x, upstream).backward()
        if self.recorder is not None:
            self.recorder.on_pre_optimizer_step(self.args, self.state, self.control, model=self.model)
            self.state.global_step += 1
            self.recorder.on_optimizer_step(self.args, self.state, self.control)
        return time.perf_counter() - start

    def end(self) -> float:
        return seconds(lambda: self.recorder.on_train_end(self.args, self.state, self.control))


def raw_disk_seconds(folder: Path, step_bytes: int, steps: int, per_file: int) -> float:
    """Write ``steps * step_bytes`` bytes as files of ``per_file`` steps with plain numpy + fsync; delete them."""
    folder.mkdir()
    block = np.random.default_rng(1).integers(0, 255, step_bytes * per_file, dtype=np.uint8)
    start = time.perf_counter()
    for i in range(0, steps, per_file):
        with open(folder / f"raw-{i:06d}.bin", "wb") as f:
            block[: step_bytes * min(per_file, steps - i)].tofile(f)
            f.flush()
            os.fsync(f.fileno())
    took = time.perf_counter() - start
    shutil.rmtree(folder)
    return took


def bytes_written() -> int:
    """Bytes this process has passed to write() so far (``/proc/self/io`` ``wchar``: every thread, every file)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no wchar")


def writer_row(dtype: str, shapes: dict[str, tuple[int, int]], steps: int, per_shard: int, root: Path) -> dict:
    """4. in this process: ``steps`` precomputed float32 steps into a RunWriter, a commit (``flush``) every
    ``per_shard`` of them, then ``close``; commit time (shard, statistics, manifest) apart from add_step time."""
    from gradlens.store import ModuleSpec, RunWriter

    specs = [ModuleSpec.from_name(name, shape) for name, shape in shapes.items()]
    rng = np.random.default_rng(0)
    pool = [[rng.standard_normal(s.shape, dtype=np.float32) for s in specs] for _ in range(POOL)]
    path = root / f"writer-{dtype}"
    written, adding, committing = bytes_written(), 0.0, 0.0
    w = RunWriter(path, specs, dtype=dtype, steps_per_shard=per_shard + 1)  # commits only when flushed
    for t in range(steps):
        adding += seconds(lambda t=t: w.add_step(t, pool[t % POOL], {"loss": 1.0}))
        if (t + 1) % per_shard == 0:
            committing += seconds(w.flush)
    committing += seconds(w.close)
    written = bytes_written() - written
    shard_bytes = sum(f.stat().st_size for f in (path / "shards").glob("*.safetensors"))
    shutil.rmtree(path)
    return {"dtype": dtype, "steps": steps, "steps_per_shard": per_shard, "shard_bytes": shard_bytes,
            "bytes_written": written, "bytes_written_per_shard_byte": written / shard_bytes,
            "add_step_s": adding / steps, "commit_s": committing, "writer_mb_s": shard_bytes / committing / 1e6}


def code_trees(args: argparse.Namespace, root: Path) -> list[tuple[str, Path]]:
    """This tree, after (``--baseline``) revision REV's gradlens unpacked under ``root``."""
    trees = [("worktree", REPO)]
    if args.baseline:
        old = root / "baseline"
        if not old.exists():
            old.mkdir()
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.baseline, "gradlens"],
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        trees.insert(0, (args.baseline, old))
    return trees


def child(tree: Path, argv: list[str]) -> dict[str, Any]:
    """Run this script with ``argv`` in a fresh process importing gradlens from ``tree``; its last line's JSON."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(Path(__file__).parent)])}
    out = subprocess.run([sys.executable, __file__, *argv], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def writer_rows(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    """4. for each dtype: this tree's writer and (``--baseline``) revision REV's, each in a fresh process, with the
    raw-disk time of the same shard bytes."""
    trees = code_trees(args, root)
    from gradlens.modules import ModuleSpec
    from gradlens.store import default_steps_per_shard

    full = list(adapter_shapes(rank=args.rank).values())
    rows = []
    for dtype in args.dtypes:
        per_shard = default_steps_per_shard([ModuleSpec.from_name(f"m.{i}", s) for i, s in enumerate(full)], dtype)
        for label, tree in trees:
            row = {"code": label, **child(tree, ["--child-writer", dtype, "--per-shard", str(per_shard), "--layers",
                                                 str(args.layers), "--rank", str(args.rank), "--steps",
                                                 str(args.steps), "--dir", str(root)])}
            step_bytes = row["shard_bytes"] // args.steps
            row["raw_disk_s"] = median(raw_disk_seconds(root / "raw", step_bytes, args.steps, per_shard)
                                       for _ in range(args.disk_repeats))
            row["raw_disk_mb_s"] = row["shard_bytes"] / row["raw_disk_s"] / 1e6
            row["throughput_ratio"] = row["raw_disk_s"] / row["commit_s"]
            print(f"  {dtype} {label}: {row['writer_mb_s']:.0f} MB/s, {row['bytes_written_per_shard_byte']:.2f} "
                  "bytes written / shard byte", flush=True)
            rows.append(row)
    return rows


def bench_dtype(dtype: str, shapes: dict[str, tuple[int, int]], rank: int, steps: int, disk_repeats: int,
                root: Path) -> dict[str, Any]:
    from gradlens.record.recorder import GradientRecorder

    rng = torch.Generator().manual_seed(0)
    upstream = [[torch.randn(WIDTH, d, generator=rng) for d, _ in shapes.values()] for _ in range(POOL)]
    inputs = [torch.randn(WIDTH, WIDTH, generator=rng) for _ in range(2 * steps)]
    model, bare = lora_model(shapes, rank), lora_model(shapes, rank)

    # 2. sustained: back to back
    rec = GradientRecorder(root / f"run-{dtype}", dtype=dtype)
    loop = Loop(model, rec, root)
    step_bytes = sum(s.size for s in rec.specs) * torch.empty((), dtype=getattr(torch, dtype)).element_size()
    per_shard = rec.writer.run_writer.steps_per_shard
    written, start = bytes_written(), time.perf_counter()
    saturated = [loop.step(inputs[t], upstream[t % POOL]) for t in range(steps)]
    loop.end()
    wall, written = time.perf_counter() - start, bytes_written() - written
    acc_bytes = (root / f"run-{dtype}" / "accumulators.safetensors").stat().st_size
    shard_files = sum(f.stat().st_size for f in (root / f"run-{dtype}" / "shards").glob("*.safetensors"))
    shutil.rmtree(root / f"run-{dtype}")
    writer_step = wall / steps

    # 1. raw disk, after the run so its page-cache churn is the same for both
    disk = median(raw_disk_seconds(root / "raw", step_bytes, steps, per_shard) for _ in range(disk_repeats))

    # 3. blocked time, paced so the writer keeps up; interleaved with the same loop without a recorder
    rec = GradientRecorder(root / f"paced-{dtype}", dtype=dtype)
    loop, plain = Loop(model, rec, root), Loop(bare, None, root)
    blocked, copies = [], []
    for t in range(steps):
        x, up = inputs[steps + t], upstream[t % POOL]
        without = plain.step(x, up)
        blocked.append(loop.step(x, up) - without)
        grads = [p.grad for n, p in bare.named_parameters() if "lora_B" in n]
        copies.append(seconds(lambda g=grads: [h.to("cpu", torch.float32, copy=True) for h in g]))
        time.sleep(1.25 * writer_step)
    loop.end()
    shutil.rmtree(root / f"paced-{dtype}")
    copy = median(copies)

    shard_bytes = steps * step_bytes
    return {
        "dtype": dtype, "steps": steps, "steps_per_shard": per_shard, "shard_bytes_per_step": step_bytes,
        "accumulators_bytes": acc_bytes, "bytes_written_per_shard_byte": written / shard_files,
        "bare_copy_s": copy, "blocked_s": median(blocked), "blocked_ratio": median(blocked) / copy,
        "saturated_step_s": median(saturated), "saturated_ratio": median(saturated) / copy,
        "recorder_wall_s": wall, "recorder_mb_s": shard_bytes / wall / 1e6,
        "raw_disk_s": disk, "raw_disk_mb_s": shard_bytes / disk / 1e6, "throughput_ratio": disk / wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="recorded steps T per measurement")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=("float32", "bfloat16"))
    parser.add_argument("--layers", type=int, default=28, help="layers of the adapter (28: Qwen2.5-1.5B)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--disk-repeats", type=int, default=3)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the temporary runs are written")
    parser.add_argument("--writer", action="store_true", help="also measure shard writing alone (4.)")
    parser.add_argument("--writer-only", action="store_true", help="measure only shard writing (4.)")
    parser.add_argument("--baseline", metavar="REV", help="git revision measured too, side by side (1.-4.)")
    parser.add_argument("--child-writer", metavar="DTYPE", help=argparse.SUPPRESS)  # 4. in a fresh process
    parser.add_argument("--child-recorder", metavar="DTYPE", help=argparse.SUPPRESS)  # 1.-3. in a fresh process
    parser.add_argument("--per-shard", type=int, help=argparse.SUPPRESS)
    add_output_argument(parser, "recording")
    args = parser.parse_args()

    shapes = adapter_shapes(args.layers, args.rank)
    if args.child_writer:
        print(json.dumps(writer_row(args.child_writer, shapes, args.steps, args.per_shard, Path(args.dir))))
        return 0
    if args.child_recorder:
        print(json.dumps(bench_dtype(args.child_recorder, shapes, args.rank, args.steps, args.disk_repeats,
                                     Path(args.dir))))
        return 0
    n = sum(d * r for d, r in shapes.values())
    check_free_disk(args.dir, 3 * 4 * n * args.steps, "bench_recording")
    rows, writer = [], []
    root = Path(tempfile.mkdtemp(prefix="gradlens-bench-rec-", dir=args.dir))
    try:
        for dtype in args.dtypes if not args.writer_only else ():
            print(f"{dtype}: {len(shapes)} modules, {n:,} B entries, {args.steps} steps ...", flush=True)
            for label, tree in code_trees(args, root):  # each in a fresh process, one after the other
                rows.append({"code": label, **child(tree, ["--child-recorder", dtype, "--layers", str(args.layers),
                                                           "--rank", str(args.rank), "--steps", str(args.steps),
                                                           "--disk-repeats", str(args.disk_repeats),
                                                           "--dir", str(root)])})
        if args.writer or args.writer_only:
            print(f"shard writing: {len(shapes)} modules, {n:,} B entries, {args.steps} steps ...", flush=True)
            writer = writer_rows(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if writer:
        print(markdown_table(
            ["storage", "code", "steps/shard", "add_step ms", "raw disk MB/s", "commits MB/s (ratio)",
             "bytes written / shard byte"],
            [(r["dtype"], r["code"], r["steps_per_shard"], f"{1e3 * r['add_step_s']:.0f}", f"{r['raw_disk_mb_s']:.0f}",
              f"{r['writer_mb_s']:.0f} ({r['throughput_ratio']:.2f})", f"{r['bytes_written_per_shard_byte']:.2f}")
             for r in writer]))
    if not rows:
        write_json(args.json, {"benchmark": "recording", "entries": n, "modules": len(shapes), "rank": args.rank,
                               "rows": writer, "writer": writer}, disk=args.dir)
        return 0
    print(markdown_table(
        ["storage", "code", "MB/step", "bare copy ms", "blocked ms (ratio)", "saturated step ms (ratio)",
         "raw disk MB/s", "recorder MB/s (ratio)", "steps/shard", "bytes written / shard byte"],
        [(r["dtype"], r["code"], f"{r['shard_bytes_per_step'] / 1e6:.1f}", f"{1e3 * r['bare_copy_s']:.1f}",
          f"{1e3 * r['blocked_s']:.0f} ({r['blocked_ratio']:.1f}x)",
          f"{1e3 * r['saturated_step_s']:.0f} ({r['saturated_ratio']:.1f}x)", f"{r['raw_disk_mb_s']:.0f}",
          f"{r['recorder_mb_s']:.0f} ({r['throughput_ratio']:.2f})", r["steps_per_shard"],
          f"{r['bytes_written_per_shard_byte']:.1f}") for r in rows]))
    write_json(args.json, {"benchmark": "recording", "entries": n, "modules": len(shapes), "rank": args.rank,
                           "rows": rows, "writer": writer}, disk=args.dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
