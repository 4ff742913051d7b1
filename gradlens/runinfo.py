"""A short, readable description of a recorded run: what ``gradlens info`` prints."""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

from gradlens.store import open_run


def run_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Facts about a run directory (validates every shard, so a missing or truncated one raises, naming the file)."""
    run = open_run(path)
    records = run.step_records
    config = run.meta.get("config", {})
    clipped = [r for r in records if isinstance(r.get("clip_coef"), float) and r["clip_coef"] < 1.0]
    losses = [r["loss"] for r in records if isinstance(r.get("loss"), float) and math.isfinite(r["loss"])]
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and "trainer" not in f.parts)
    return {
        "path": str(path),
        "regime": config.get("record", {}).get("regime") or config.get("trainer_class"),
        "complete": bool(run.meta.get("complete")),
        "modules": len(run.modules),
        "entries": sum(s.size for s in run.specs),
        "projections": dict(Counter(s.proj for s in run.specs)),
        "steps": len(run.steps),
        "first_step": run.steps[0] if run.steps else None,
        "last_step": run.steps[-1] if run.steps else None,
        "nonfinite_steps": len(run.meta.get("nonfinite_steps", [])),
        "clipped_steps": len(clipped),
        "loss_first_last": (losses[0], losses[-1]) if losses else None,
        "dtype": run.meta["dtype"],
        "save_raw": run.meta["save_raw"],
        "seed": run.meta.get("seed"),
        "bytes": size,
    }


def format_run_info(info: dict[str, Any]) -> str:
    loss = info["loss_first_last"]
    state = "complete" if info["complete"] else "INCOMPLETE"
    lines = [
        f"{info['path']}: {info['regime'] or 'unknown regime'} run, {state}",
        f"  steps:    {info['steps']} (steps {info['first_step']}..{info['last_step']}), "
        f"{info['clipped_steps']} clipped, {info['nonfinite_steps']} non-finite",
        f"  modules:  {info['modules']} ({', '.join(f'{k}:{v}' for k, v in info['projections'].items())}), "
        f"{info['entries']:,} B entries",
        f"  storage:  {info['dtype']}, raw shards {'on' if info['save_raw'] else 'off'}, "
        f"{info['bytes'] / 2**20:.1f} MiB, seed {info['seed']}",
    ]
    if loss:
        lines.append(f"  loss:     {loss[0]:.4f} -> {loss[1]:.4f}")
    return "\n".join(lines)
