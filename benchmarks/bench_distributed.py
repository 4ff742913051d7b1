"""The recorder's cost under FSDP2 against DDP: blocked time per step on 2 CPU processes (gloo), side by side.

Each engine runs in its own ``torchrun`` launch of this script (``--worker``) on the stand-in model of
``bench_recording.py`` (PEFT LoRA layers with Qwen2.5-1.5B's ``lora_B`` shapes, ``--layers`` of its 28 layers, r=16):

- DDP: every process holds the whole model; after backward the B gradients are all-reduced in one flat bucket (what
  DDP's bucketed all-reduce does), and the recorder reads whole gradients on the main process;
- FSDP2: ``fully_shard`` on every LoRA layer; backward reduce-scatters each B gradient into a ``DTensor`` block per
  process, and the recorder gathers every block to the main process in one collective a step.

Two identical models take turns every step (the order alternates), one with a :class:`GradientRecorder` and one
without; the recorder gets the Trainer's events. The recorder blocks training for its call (``on_pre_optimizer_step``
+ ``on_optimizer_step``: under FSDP2 the gather, then the main process's copy and statistics), timed in wall and CPU
seconds (``process_time``: every thread of the process, the writer's included), median over the steps of the slower
process (the next step waits for it); the ratio FSDP2 / DDP of that is the headline. The difference of the median
step times with and without the recorder is reported too (it also holds the writer thread's competition for the
cores, and is noisy on a loaded machine). A pause after every
step lets the writer keep up, so a full queue does not count. The machine may be shared: CPU seconds of each launch
(``getrusage`` of the children) are reported next to the wall times.

    python benchmarks/bench_distributed.py [--layers 4] [--steps 20] [--pause 0.2] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import adapter_shapes, add_output_argument, markdown_table, median, write_json

REPO = Path(__file__).resolve().parents[1]
ENGINES = ("ddp", "fsdp2")


def all_reduce_flat(grads: list[torch.Tensor]) -> None:
    """DDP's gradient averaging, as one bucket: concatenate, all-reduce, divide, copy back."""
    import torch.distributed as dist

    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(part.view_as(g))


def worker(engine: str, layers: int, rank: int, steps: int, pause: float, out: Path) -> None:
    """One process of a launch, from joining the process group to leaving it.

    The sharded models' ``DTensor`` parameters hold the device mesh and so the gloo process group: they must be freed
    before ``destroy_process_group``, or the group's C++ threads are torn down during interpreter shutdown, which
    aborts the process now and then ("terminate called without an active exception").
    """
    import torch.distributed as dist

    dist.init_process_group("gloo")
    timed_steps(engine, layers, rank, steps, pause, out)
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def timed_steps(engine: str, layers: int, rank: int, steps: int, pause: float, out: Path) -> None:
    """Time ``steps`` steps with and without the recorder; rank 0 writes the JSON."""
    import torch.distributed as dist
    from bench_recording import lora_model
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from gradlens.lora import lora_b_parameters
    from gradlens.record.recorder import GradientRecorder

    me, world = dist.get_rank(), dist.get_world_size()
    shapes = adapter_shapes(layers, rank)
    models = [lora_model(shapes, rank) for _ in range(2)]  # [with recorder, without]
    if engine == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for model in models:
            modules = dict(model.named_modules())
            for name in model.names:
                fully_shard(modules[name], mesh=mesh)
    args = TrainingArguments(output_dir=str(out / "trainer"), report_to="none", max_grad_norm=0.0, use_cpu=True)
    state, control = TrainerState(), TrainerControl()
    state.is_world_process_zero = me == 0
    recorder = GradientRecorder(out / f"run-{engine}", announce=False)
    recorder.on_train_begin(args, state, control, model=models[0])
    b_params = [[p for _, p in lora_b_parameters(m)] for m in models]
    torch.manual_seed(1 + me)  # each process its own inputs
    width = next(iter(models[0].parameters())).shape[-1]
    timings: dict[str, list[float]] = {"with": [], "without": [], "call": [], "call_cpu": []}
    for t in range(steps):
        x = torch.randn(16, width)
        upstream = [torch.randn(16, d) for d, _ in shapes.values()]
        for which in ((0, 1) if t % 2 == 0 else (1, 0)):
            model = models[which]
            for p in model.parameters():
                p.grad = None
            dist.barrier()
            start = time.perf_counter()
            model.loss(x, upstream).backward()
            if engine == "ddp":
                all_reduce_flat([p.grad for p in b_params[which]])
            if which == 0:
                call, call_cpu = time.perf_counter(), time.process_time()
                recorder.on_pre_optimizer_step(args, state, control, model=model)
                state.global_step += 1
                recorder.on_optimizer_step(args, state, control)
                timings["call"].append(time.perf_counter() - call)
                timings["call_cpu"].append(time.process_time() - call_cpu)
            timings["with" if which == 0 else "without"].append(time.perf_counter() - start)
        time.sleep(pause)
    recorder.on_train_end(args, state, control)
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, timings)
    if me == 0:
        slowest = {k: [max(r[k][t] for r in everyone) for t in range(steps)] for k in timings}
        entries = sum(d * r for d, r in shapes.values())
        (out / f"{engine}.json").write_text(json.dumps({
            "engine": engine, "processes": world, "steps": steps, "entries": entries,
            "gathered_mb_per_step": 4 * entries / 1e6 if engine == "fsdp2" else 0.0,
            "step_s_without": median(slowest["without"]), "step_s_with": median(slowest["with"]),
            "blocked_s": median(slowest["with"]) - median(slowest["without"]),
            "recorder_call_s": median(slowest["call"]), "recorder_call_cpu_s": median(slowest["call_cpu"]),
            "recorded_as": json.loads((out / f"run-{engine}" / "manifest.json").read_text())["config"]["recorder"]}))


def launch(engine: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One torchrun launch of 2 worker processes; its result with the launch's wall and CPU seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), str(Path(__file__).parent),
                                                       os.environ.get("PYTHONPATH")]))}
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                    str(args.processes), __file__, "--worker", engine, "--layers", str(args.layers), "--rank",
                    str(args.rank), "--steps", str(args.steps), "--pause", str(args.pause), "--dir", str(out)],
                   env=env, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {**json.loads((out / f"{engine}.json").read_text()), "launch_wall_s": time.perf_counter() - start,
            "launch_cpu_s": after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="layers of the 1.5B adapter's shapes (28: all)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--pause", type=float, default=0.2, help="seconds after each step, for the writer")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    add_output_argument(parser, "distributed")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.layers, args.rank, args.steps, args.pause, Path(args.dir))
        return 0

    from gradlens.provenance import package_versions

    with tempfile.TemporaryDirectory(prefix="gradlens-bench-dist-", dir=args.dir) as tmp:
        rows = [launch(engine, args, Path(tmp)) for engine in ENGINES]
    ddp, fsdp = rows
    ratio = fsdp["recorder_call_s"] / ddp["recorder_call_s"]
    print(markdown_table(
        ["engine", "MB gathered/step", "step ms without", "step ms with", "blocked ms", "recorder call ms (CPU ms)",
         "launch wall s (CPU s)"],
        [(r["engine"], f"{r['gathered_mb_per_step']:.1f}", f"{1e3 * r['step_s_without']:.1f}",
          f"{1e3 * r['step_s_with']:.1f}", f"{1e3 * r['blocked_s']:.1f}",
          f"{1e3 * r['recorder_call_s']:.1f} ({1e3 * r['recorder_call_cpu_s']:.1f})",
          f"{r['launch_wall_s']:.0f} ({r['launch_cpu_s']:.0f})") for r in rows]))
    print(f"the recorder's call per step (the time it blocks training), FSDP2 / DDP: {ratio:.2f}x")
    write_json(args.json, {"benchmark": "distributed", "layers": args.layers, "rank": args.rank, "steps": args.steps,
                           "pause_s": args.pause, "processes": args.processes, "rows": rows,
                           "recorder_call_ratio_fsdp2_over_ddp": ratio, "versions": package_versions(),
                           "load_note": "measured on a shared machine: CPU seconds next to wall seconds"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
