"""Peak resident memory and wall time of ``gradlens analyze`` on a synthetic run larger than 4 GB.

Writes a float32 run (raw shards on) of Llama-like LoRA-B shapes (r=16; q/o/down 2048, k/v 512, gate/up 5504 rows;
4 layers, 28 modules, 4.7 MB per step) into a temporary directory, analyses it with the ``gradlens analyze`` command
in a child process, and reports the child's peak RSS (``os.wait4``'s ``ru_maxrss``) and wall time. The run is
deleted afterwards. Needs 10 GB of free disk where the run goes.

    python benchmarks/bench_analyze_memory.py [--gb 4.3] [--memory-mb 512] [--dir /tmp] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROWS = {"q_proj": 2048, "k_proj": 512, "v_proj": 512, "o_proj": 2048, "gate_proj": 5504, "up_proj": 5504,
        "down_proj": 2048}
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
LAYERS = 4
RANK = 16
LIMIT_BYTES = 2 * 10**9  # the acceptance bound: peak RSS under 2 GB


def write_run(path: Path, target_bytes: float) -> tuple[int, int]:
    """Write the synthetic run: a fixed drift plus fresh noise each step (cosines and sign stability in between)."""
    from gradlens.store import ModuleSpec, RunWriter

    specs = [ModuleSpec.from_name(f"model.layers.{i}.{PARENT[p]}.{p}", (d, RANK))
             for i in range(LAYERS) for p, d in ROWS.items()]
    per_step = 4 * sum(s.size for s in specs)
    steps = int(np.ceil(target_bytes / per_step))
    rng = np.random.default_rng(0)
    drift = [rng.standard_normal(s.shape, dtype=np.float32) for s in specs]
    with RunWriter(path, specs, config={"record": {"regime": "synthetic"}}, seed=0) as writer:
        for step in range(steps):
            grads = [0.3 * d + rng.standard_normal(d.shape, dtype=np.float32) for d in drift]
            writer.add_step(step, grads, {"loss": 0.0, "clip_coef": 1.0})
            if step % 100 == 0:
                print(f"  writing step {step}/{steps}", flush=True)
    return steps, len(specs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=4.3, help="size of the raw shards in GB (1e9 bytes)")
    parser.add_argument("--memory-mb", type=float, default=512, help="analyze --memory_mb")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the temporary run is written")
    parser.add_argument("--keep", action="store_true", help="keep the run and the analysis")
    args = parser.parse_args()

    free = shutil.disk_usage(args.dir).free
    if free < 10 * 10**9:
        print(f"bench_analyze_memory: only {free / 1e9:.1f} GB free in {args.dir}; need 10 GB. Not running.")
        return 1
    root = Path(tempfile.mkdtemp(prefix="gradlens-bench-", dir=args.dir))
    try:
        run, out = root / "run", root / "analysis"
        start = time.perf_counter()
        steps, n_modules = write_run(run, args.gb * 1e9)
        write_s = time.perf_counter() - start
        size = sum(f.stat().st_size for f in run.rglob("*") if f.is_file())
        print(f"wrote {run}: {steps} steps x {n_modules} modules, {size / 1e9:.2f} GB on disk in {write_s:.0f} s",
              flush=True)

        cmd = [sys.executable, "-m", "gradlens.cli.main", "analyze", str(run), "--out", str(out),
               "--memory_mb", str(args.memory_mb)]
        start = time.perf_counter()
        child = subprocess.Popen(cmd)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        peak = usage.ru_maxrss * 1024  # kilobytes on Linux
        if child.returncode != 0:
            print(f"bench_analyze_memory: gradlens analyze exited {child.returncode}")
            return child.returncode
        print(f"RESULT analyze of {size / 1e9:.2f} GB ({steps} steps, {n_modules} modules, memory_mb "
              f"{args.memory_mb:g}): peak RSS {peak / 1e9:.2f} GB ({peak / 2**30:.2f} GiB), wall {wall:.0f} s; "
              f"{'PASS' if peak < LIMIT_BYTES else 'FAIL'} (bound {LIMIT_BYTES / 1e9:.0f} GB)")
        return 0 if peak < LIMIT_BYTES else 1
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
