"""Analysis at 1.5B-adapter scale: ``gradlens analyze`` against a plain read of the same bytes, and a dense SVD.

Writes a float32 run (``RunWriter`` defaults) of Qwen2.5-1.5B's LoRA-B shapes (r=16, all 7 projections of 28 layers,
41.3 MB per step) for ``--steps`` steps (T=100: 4.1 GB of shards) into a temporary directory; each step is a fixed
drift plus fresh noise. Then, ``--repeats`` times, interleaved, and each in a child process whose peak RSS is taken
from ``os.wait4``, with the run's files evicted from the page cache before every pass (all of them read from the
disk; ``fincore``, where installed, checks that nothing stayed resident):

- **read**: the baseline, a plain numpy pass that reads every shard file into one reused buffer and nothing else;
- **analyze**: ``gradlens analyze RUN --out OUT`` (every statistic, tables and figures, as a user runs it) with the
  code of this checkout, and with ``--old REF`` (repeatable) also with the code of each of those git revisions
  (``git archive``), in the same invocation, so that old and new meet the same machine load;
- **dense SVD** (unless ``--skip-svd``): the most obvious implementation, ``run.gradients(module)`` as a
  ``T x d_out*r`` matrix and ``np.linalg.svd`` of it, per module (only the per-module trajectory erank).

And the fixed cost: ``gradlens analyze`` on a small run of the same 196 modules (``d_out / 64``, ``--small-steps``
steps: 2.6 MB) against a child that only imports the modules that analyze imports (found by running it once), so
that ``analyze - imports`` is the cost beyond the imports. Reports medians, ratios to the read, peak resident memory
and CPU seconds (user + system, all threads). The runs are deleted afterwards.

    python benchmarks/bench_analysis.py [--steps 100] [--layers 28] [--repeats 2] [--memory-mb 512] [--dir /tmp]
                                        [--old REF ...] [--skip-svd] [--small-steps 4]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import (
    ROWS_1P5B,
    adapter_shapes,
    add_output_argument,
    check_free_disk,
    drop_page_cache,
    markdown_table,
    median,
    seconds,
    write_json,
)

ROOT = Path(__file__).resolve().parents[1]
PEAK_LIMIT = 2 * 10**9  # the target: peak RSS of analyze under 2 GB whatever T
CHUNK = 64 * 2**20
MODULES_SCRIPT = """import json, runpy, sys
before, dest = set(sys.modules), sys.argv[1]
sys.argv = ["gradlens", *sys.argv[2:]]
try:
    runpy.run_module("gradlens.cli.main", run_name="__main__", alter_sys=True)
except SystemExit as e:
    if e.code:
        raise
names = ["gradlens.cli.main", *(m for m in sys.modules if m not in before)]
open(dest, "w").write(json.dumps(names))
"""
IMPORTS_SCRIPT = """import importlib, json, sys
for name in json.loads(open(sys.argv[1]).read()):
    try:
        importlib.import_module(name)
    except Exception:
        pass
"""


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


def small_shapes(layers: int) -> dict[str, tuple[int, int]]:
    """The 1.5B adapter's modules with ``d_out / 64`` rows: the same tables and figures, 2% of the bytes."""
    return {f"model.layers.{i}.{proj}": (max(1, d // 64), 16) for i in range(layers) for proj, d in ROWS_1P5B.items()}


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
    from gradlens.stats.core import erank
    from gradlens.store import open_run

    run = open_run(run_dir)
    for module in run.modules:
        g = run.gradients(module)
        erank(np.linalg.svd(g.reshape(len(g), -1), compute_uv=False))


def resident_bytes(files: list[Path]) -> int | None:
    """Bytes of ``files`` in the page cache (``fincore``), or None where fincore is not installed."""
    if not files or shutil.which("fincore") is None:
        return None
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, files)],
                         capture_output=True, text=True, check=False).stdout
    return sum(int(x) for x in out.split() if x.isdigit())


def child(cmd: list[str], files: list[Path], env: dict[str, str] | None = None) -> tuple[float, int, float, int]:
    """(wall seconds, peak RSS bytes, CPU seconds, bytes still cached before) of a child started with a cold page
    cache for ``files``."""
    drop_page_cache(files)
    cached = resident_bytes(files)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"bench_analysis: {' '.join(cmd)} failed")
    return wall, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime, cached or 0  # ru_maxrss: KiB on Linux


def code_env(tree: Path) -> dict[str, str]:
    """The environment of a child that imports gradlens from ``tree``."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH")) if p)}


def old_tree(ref: str, dest: Path) -> Path:
    """``gradlens/`` at git revision ``ref``, extracted into ``dest``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "gradlens"], capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def analyze_cmd(run: Path, out: Path, memory_mb: float) -> list[str]:
    """``gradlens analyze`` into ``out``, emptied first (analyze refuses a used ``--out``, and a baseline tree may
    not know ``--overwrite``)."""
    shutil.rmtree(out, ignore_errors=True)
    return [sys.executable, "-m", "gradlens.cli.main", "analyze", str(run), "--out", str(out), "--memory_mb",
            str(memory_mb), "--no-progress"]


def fixed_cost(root: Path, trees: dict[str, Path], args: argparse.Namespace) -> list[dict]:
    """Per code version: analyze on the small run, a child importing what it imports, and their difference."""
    small = root / "small"
    subprocess.run([sys.executable, __file__, "--run", str(small), "--steps", str(args.small_steps), "--layers",
                    str(args.layers), "--worker", "write-small"], check=True, env=code_env(ROOT))
    files = [p for p in small.rglob("*") if p.is_file()]
    rows = []
    for name, tree in trees.items():
        modules = root / f"modules-{name}.json"
        subprocess.run([sys.executable, "-c", MODULES_SCRIPT, str(modules), "analyze", str(small), "--out",
                        str(root / "small-out"), "--no-progress"], check=True, env=code_env(tree),
                       stdout=subprocess.DEVNULL)
        walls: dict[str, list[float]] = {"analyze": [], "imports": []}
        for _ in range(args.repeats):
            walls["analyze"].append(child(analyze_cmd(small, root / "small-out", args.memory_mb), files,
                                          code_env(tree))[0])
            walls["imports"].append(child([sys.executable, "-c", IMPORTS_SCRIPT, str(modules)], [], code_env(tree))[0])
        a, i = median(walls["analyze"]), median(walls["imports"])
        rows.append({"code": name, "analyze_seconds": a, "imports_seconds": i, "fixed_seconds": a - i,
                     "modules_imported": len(json.loads(modules.read_text())), "seconds_all": walls})
        print(f"  small run, {name}: analyze {a:.2f} s, imports {i:.2f} s, beyond the imports {a - i:.2f} s",
              flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="recorded steps T")
    parser.add_argument("--layers", type=int, default=28, help="layers of the adapter (28: Qwen2.5-1.5B)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--memory-mb", type=float, default=512, help="analyze --memory_mb")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the temporary runs are written")
    parser.add_argument("--old", action="append", default=[],
                        help="also time analyze with gradlens/ of this git revision (e.g. main); repeatable")
    parser.add_argument("--skip-svd", action="store_true", help="leave out the dense SVD pass")
    parser.add_argument("--small-steps", type=int, default=4, help="steps of the small run (fixed cost)")
    parser.add_argument("--worker", choices=("write", "write-small", "read", "svd"), help=argparse.SUPPRESS)
    parser.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    add_output_argument(parser, "analysis")
    args = parser.parse_args()
    shapes = adapter_shapes(args.layers)
    if args.worker:  # in a child, so the parent stays small: a forked child's peak RSS starts from the parent's
        {"write": lambda run: write_run(run, shapes, args.steps),
         "write-small": lambda run: write_run(run, small_shapes(args.layers), args.steps),
         "read": plain_read, "svd": dense_svd}[args.worker](args.run)
        return 0

    n = sum(d * r for d, r in shapes.values())
    check_free_disk(args.dir, 2.5 * 4 * n * args.steps, "bench_analysis")
    root = Path(tempfile.mkdtemp(prefix="gradlens-bench-analysis-", dir=args.dir))
    try:
        trees = {"new": ROOT, **{ref: old_tree(ref, root / f"old-{k}") for k, ref in enumerate(args.old)}}
        run = root / "run"
        print(f"writing {args.steps} steps x {len(shapes)} modules ({n:,} entries) to {run} ...", flush=True)
        me = [sys.executable, __file__, "--run", str(run), "--steps", str(args.steps), "--layers", str(args.layers),
              "--worker"]
        write_s = seconds(lambda: subprocess.run(me + ["write"], check=True, env=code_env(ROOT)))
        files = [p for p in run.rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in shard_files(run))
        print(f"wrote {size / 1e9:.2f} GB of shards in {write_s:.0f} s", flush=True)
        passes = {"read": (me + ["read"], ROOT)}
        passes.update({"analyze" if name == "new" else f"analyze ({name})":
                       (analyze_cmd(run, root / "analysis", args.memory_mb), tree) for name, tree in trees.items()})
        if not args.skip_svd:
            passes["dense SVD"] = (me + ["svd"], ROOT)
        got: dict[str, list[tuple[float, int, float, int]]] = {k: [] for k in passes}
        for rep in range(args.repeats):
            for name, (cmd, tree) in passes.items():
                got[name].append(child(cmd, files, code_env(tree)))
                wall, peak, cpu, _ = got[name][-1]
                print(f"  repeat {rep + 1}/{args.repeats} {name}: {wall:.1f} s (CPU {cpu:.1f} s), "
                      f"peak RSS {peak / 1e9:.2f} GB", flush=True)
                shutil.rmtree(root / "analysis", ignore_errors=True)
        fixed = fixed_cost(root, trees, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    base = median(w for w, *_ in got["read"])
    rows = [{"pass": k, "seconds": median(w for w, *_ in v), "ratio": median(w for w, *_ in v) / base,
             "mb_s": size / median(w for w, *_ in v) / 1e6, "peak_rss_bytes": max(p for _, p, *_ in v),
             "cpu_seconds": median(c for *_, c, _ in v), "seconds_all": [w for w, *_ in v],
             "cached_bytes_before": max(b for *_, b in v)} for k, v in got.items()]
    print(markdown_table(["pass (cold page cache)", "seconds", "ratio to read", "MB/s", "CPU s", "peak RSS GB"],
                         [(r["pass"], f"{r['seconds']:.1f}", f"{r['ratio']:.2f}", f"{r['mb_s']:.0f}",
                           f"{r['cpu_seconds']:.1f}", f"{r['peak_rss_bytes'] / 1e9:.2f}") for r in rows]))
    print(markdown_table(["code", "small run: analyze s", "imports s", "beyond the imports s"],
                         [(f["code"], f"{f['analyze_seconds']:.2f}", f"{f['imports_seconds']:.2f}",
                           f"{f['fixed_seconds']:.2f}") for f in fixed]))
    write_json(args.json, {"benchmark": "analysis", "steps": args.steps, "layers": args.layers, "modules": len(shapes),
                           "entries": n,
                           "shard_bytes": size, "write_seconds": write_s, "repeats": args.repeats,
                           "memory_mb": args.memory_mb, "old": args.old, "load_average": os.getloadavg(),
                           "page_cache": "cold (posix_fadvise DONTNEED before each pass; cached_bytes_before: "
                                         "fincore's count right after)",
                           "rows": rows, "small_run": {"steps": args.small_steps, "rows": fixed}}, disk=args.dir)
    analyze_peak = max(r["peak_rss_bytes"] for r in rows if r["pass"] == "analyze")
    print(f"analyze peak RSS {analyze_peak / 1e9:.2f} GB: {'under' if analyze_peak < PEAK_LIMIT else 'OVER'} 2 GB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
