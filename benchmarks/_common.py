"""Shared helpers of the benchmarks: the 1.5B adapter's shapes, timing, medians, the machine, tables and JSON.

Every benchmark reports ratios against a baseline measured in the same run, because the machines they run on are
shared and noisy; the absolute seconds go to the JSON next to the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
# Qwen2.5-1.5B: rows of each projection's lora_B (its output features); with r=16 on all 7 projections of 28 layers
# that is 28 * 23,040 * 16 = 10,321,920 B entries per step.
ROWS_1P5B = {"self_attn.q_proj": 1536, "self_attn.k_proj": 256, "self_attn.v_proj": 256, "self_attn.o_proj": 1536,
             "mlp.gate_proj": 8960, "mlp.up_proj": 8960, "mlp.down_proj": 1536}
LAYERS_1P5B = 28
RANK = 16


def adapter_shapes(layers: int = LAYERS_1P5B, rank: int = RANK) -> dict[str, tuple[int, int]]:
    """``{module name: (d_out, r)}`` of the 1.5B adapter (fewer ``layers`` for quick runs), in model order."""
    return {f"model.layers.{i}.{proj}": (d, rank) for i in range(layers) for proj, d in ROWS_1P5B.items()}


def seconds(fn: Callable[[], Any]) -> float:
    """Wall time of one call (``perf_counter``)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time over ``repeats`` calls."""
    return statistics.median(seconds(fn) for _ in range(repeats))


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def _command(cmd: Sequence[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def machine(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """What the numbers were measured on: CPUs (``nproc``, ``lscpu`` model), memory, and the disk under ``path``."""
    model = next((line.split(":", 1)[1].strip() for line in _command(["lscpu"]).splitlines()
                  if line.startswith("Model name:")), platform.processor() or platform.machine())
    info: dict[str, Any] = {
        "nproc": len(os.sched_getaffinity(0)), "cpu_model": model,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(), "numpy": np.__version__,
    }
    if path is not None:
        fields = _command(["df", "--output=source,fstype", str(path)]).splitlines()[-1:]
        source, fstype = (fields[0].split() + ["?", "?"])[:2] if fields else ("?", "?")
        rotational = Path(f"/sys/block/{Path(source).name}/queue/rotational")
        info["disk"] = {"path": str(path), "device": source, "fstype": fstype,
                        "rotational": rotational.read_text().strip() == "1" if rotational.exists() else None,
                        "free_gb": round(shutil.disk_usage(path).free / 1e9, 1)}
    return info


def check_free_disk(path: str | os.PathLike[str], need_bytes: float, name: str) -> None:
    """Exit with a one-line message when ``path`` has less than ``need_bytes`` free (the benchmark writes there)."""
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        sys.exit(f"{name}: only {free / 1e9:.1f} GB free in {path}; need {need_bytes / 1e9:.1f} GB. Not running.")


def drop_page_cache(paths: Iterable[Path]) -> None:
    """Evict these (already fsynced) files from the page cache, so the next read comes from the disk.

    ``posix_fadvise(DONTNEED)`` per file needs no privileges and leaves other processes' cached files alone.
    """
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table (what docs/performance.md quotes); floats are printed as given, so format them first."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def positive(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_output_argument(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--json", type=Path, default=RESULTS / f"{name}.json", help="where the results go")


def write_json(path: Path, payload: dict[str, Any], disk: str | os.PathLike[str] | None = None) -> None:
    """Write ``payload`` plus the machine description (and the disk under ``disk``) as indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**payload, "machine": machine(disk)}, indent=1) + "\n")
    print(f"wrote {path}")


def toy_train(regime: str, steps: int, preset: str, recorder_dir: Path | None) -> float:
    """Seconds of ``trainer.train()`` for one toy run (model loading and data preparation excluded).

    With ``recorder_dir`` a :class:`GradientRecorder` (raw shards on) is attached, as ``gradlens record`` does.
    """
    import tempfile

    from transformers import set_seed

    from gradlens.lora import attach_lora
    from gradlens.models import load_model
    from gradlens.record.recorder import GradientRecorder
    from gradlens.tasks.addition import AdditionTask
    from gradlens.training.trl_trainer import build_trainer

    set_seed(0)
    model, tokenizer = load_model(f"toy:{preset}")
    model = attach_lora(model)
    task = AdditionTask()
    settings = {**task.trl_defaults(regime), "max_steps": steps, "logging_steps": 10, "disable_tqdm": True}
    with tempfile.TemporaryDirectory() as trainer_dir:
        trainer = build_trainer(regime, model, tokenizer, task.dataset("train", 2048), task, output_dir=trainer_dir,
                                settings=settings)
        if recorder_dir is not None:
            GradientRecorder.attach(trainer, recorder_dir, steps_per_shard=16)
        return seconds(trainer.train)
