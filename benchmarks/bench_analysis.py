"""Analysis at 1.5B-adapter scale: ``gradlens analyze`` against a plain read of the same bytes, and a dense SVD.

Writes a float32 run (``RunWriter`` defaults) of Qwen2.5-1.5B's LoRA-B shapes (r=16, all 7 projections of 28 layers,
41.3 MB per step) for ``--steps`` steps (T=100: 4.1 GB of shards) into a temporary directory; each step is a fixed
drift plus fresh noise. Then, ``--repeats`` times and each in a child process whose peak RSS is taken from
``os.wait4``, with the run's files evicted from the page cache before every pass (all three read from the disk):

- **read**: the baseline, a plain numpy pass that reads every shard file into one reused buffer and nothing else;
- **analyze**: ``gradlens analyze RUN --out OUT`` (every statistic, tables and figures, as a user runs it);
- **dense SVD**: the most obvious implementation, ``run.gradients(module)`` as a ``T x d_out*r`` matrix and
  ``np.linalg.svd`` of it, per module (only the per-module trajectory erank: a small part of what analyze computes).

Reports median seconds and their ratios to the read, and peak resident memory. The run is deleted afterwards.

    python benchmarks/bench_analysis.py [--steps 100] [--layers 28] [--repeats 2] [--memory-mb 512] [--dir /tmp]
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

import numpy as np
from _common import (
    adapter_shapes,
    add_output_argument,
    check_free_disk,
    drop_page_cache,
    markdown_table,
    median,
    seconds,
    write_json,
)

PEAK_LIMIT = 2 * 10**9  # the target: peak RSS of analyze under 2 GB whatever T
CHUNK = 64 * 2**20


def write_run(path: Path, shapes: dict[str, tuple[int, int]], steps: int) -> None:
    """A drift plus fresh noise each step (cosines and sign stability in between), through the real RunWriter."""
    from gradlens.store import ModuleSpec, RunWriter

    specs = [ModuleSpec.from_name(name, shape) for name, shape in shapes.items()]
    rng = np.random.default_rng(0)
    drift = [rng.standard_normal(s.shape, dtype=np.float32) for s in specs]
    with RunWriter(path, specs, config={"record": {"regime": "synthetic"}}, seed=0) as writer:
        for step in range(steps):
            writer.add_step(step, [0.3 * d + rng.standard_normal(d.shape, dtype=np.float32) for d in drift],
                            {"loss": 0.0, "clip_coef": 1.0})


def shard_files(run: Path) -> list[Path]:
    return [run / s["file"] for s in json.loads((run / "manifest.json").read_text())["shards"]]


def plain_read(run: Path) -> None:
    """The baseline: every shard file's bytes into one reused numpy buffer."""
    buf = np.empty(CHUNK, np.uint8)
    for path in shard_files(run):
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def dense_svd(run_dir: Path) -> None:
    """The obvious implementation: each module's ``T x d_out*r`` matrix, dense SVD, entropy effective rank."""
    from gradlens.stats import erank
    from gradlens.store import open_run

    run = open_run(run_dir)
    for module in run.modules:
        g = run.gradients(module)
        erank(np.linalg.svd(g.reshape(len(g), -1), compute_uv=False))


def child(cmd: list[str], files: list[Path]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of a child process started with a cold page cache for ``files``."""
    drop_page_cache(files)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"bench_analysis: {' '.join(cmd)} failed")
    return wall, usage.ru_maxrss * 1024  # kilobytes on Linux


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="recorded steps T")
    parser.add_argument("--layers", type=int, default=28, help="layers of the adapter (28: Qwen2.5-1.5B)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--memory-mb", type=float, default=512, help="analyze --memory_mb")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the temporary run is written")
    parser.add_argument("--worker", choices=("write", "read", "svd"), help=argparse.SUPPRESS)
    parser.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    add_output_argument(parser, "analysis")
    args = parser.parse_args()
    shapes = adapter_shapes(args.layers)
    if args.worker:  # in a child, so the parent stays small: a forked child's peak RSS starts from the parent's
        {"write": lambda run: write_run(run, shapes, args.steps), "read": plain_read, "svd": dense_svd}[args.worker](
            args.run)
        return 0

    n = sum(d * r for d, r in shapes.values())
    check_free_disk(args.dir, 2.5 * 4 * n * args.steps, "bench_analysis")
    root = Path(tempfile.mkdtemp(prefix="gradlens-bench-analysis-", dir=args.dir))
    try:
        run = root / "run"
        print(f"writing {args.steps} steps x {len(shapes)} modules ({n:,} entries) to {run} ...", flush=True)
        me = [sys.executable, __file__, "--run", str(run), "--steps", str(args.steps), "--layers", str(args.layers),
              "--worker"]
        write_s = seconds(lambda: subprocess.run(me + ["write"], check=True))
        files = [p for p in run.rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in shard_files(run))
        print(f"wrote {size / 1e9:.2f} GB of shards in {write_s:.0f} s", flush=True)
        passes = {"read": me + ["read"],
                  "analyze": [sys.executable, "-m", "gradlens.cli.main", "analyze", str(run), "--out",
                              str(root / "analysis"), "--memory_mb", str(args.memory_mb)],
                  "dense SVD": me + ["svd"]}
        times: dict[str, list[float]] = {k: [] for k in passes}
        peaks: dict[str, list[int]] = {k: [] for k in passes}
        for rep in range(args.repeats):
            for name, cmd in passes.items():
                wall, peak = child(cmd, files)
                times[name].append(wall)
                peaks[name].append(peak)
                print(f"  repeat {rep + 1}/{args.repeats} {name}: {wall:.1f} s, peak RSS {peak / 1e9:.2f} GB",
                      flush=True)
            shutil.rmtree(root / "analysis", ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    base = median(times["read"])
    rows = [{"pass": k, "seconds": median(v), "ratio": median(v) / base, "mb_s": size / median(v) / 1e6,
             "peak_rss_bytes": max(peaks[k]), "seconds_all": v} for k, v in times.items()]
    print(markdown_table(["pass (cold page cache)", "seconds", "ratio to read", "MB/s", "peak RSS GB"],
                         [(r["pass"], f"{r['seconds']:.1f}", f"{r['ratio']:.2f}", f"{r['mb_s']:.0f}",
                           f"{r['peak_rss_bytes'] / 1e9:.2f}") for r in rows]))
    write_json(args.json, {"benchmark": "analysis", "steps": args.steps, "modules": len(shapes), "entries": n,
                           "shard_bytes": size, "write_seconds": write_s, "repeats": args.repeats,
                           "memory_mb": args.memory_mb, "page_cache": "cold (posix_fadvise DONTNEED before each pass)",
                           "rows": rows}, disk=args.dir)
    analyze_peak = max(peaks["analyze"])
    print(f"analyze peak RSS {analyze_peak / 1e9:.2f} GB: {'under' if analyze_peak < PEAK_LIMIT else 'OVER'} 2 GB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
