"""A short, readable description of a recorded run: what ``gradlens info`` prints (with ``--verify``, after reading
and checking every byte)."""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gradlens.errors import GradlensError
from gradlens.store import open_run, verify_run
from gradlens.store.runstate import adapter_line, adapter_note, run_space, run_state


def run_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Facts about a run directory (validates every shard, so a missing or truncated one raises, naming the file)."""
    run = open_run(path)
    records = run.step_records
    state = run_state(run.meta)
    config = run.meta.get("config", {})
    clipped = [r for r in records if isinstance(r.get("clip_coef"), float) and r["clip_coef"] < 1.0]
    losses = [r["loss"] for r in records if isinstance(r.get("loss"), float) and math.isfinite(r["loss"])]
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and "trainer" not in f.parts)
    return {
        "path": str(path),
        "regime": config.get("record", {}).get("regime") or config.get("trainer_class"),
        "complete": bool(run.meta.get("complete")),
        "state": {**state.to_json(), "description": state.describe("describing")},
        "planned_steps": run.meta.get("planned_steps"),
        "adapter": config.get("adapter"),
        "modules": len(run.modules),
        "entries": sum(s.size for s in run.specs),
        "projections": dict(Counter(s.proj for s in run.specs)),
        "steps": len(run.steps),
        "first_step": run.steps[0] if run.steps else None,
        "last_step": run.steps[-1] if run.steps else None,
        "nonfinite_steps": len(run.meta.get("nonfinite_steps", [])),
        "clipped_steps": len(clipped),
        "no_signal_steps": sum(1 for r in records if r.get("zero_gradient") or r.get("zero_reward_std")),
        "loss_first_last": (losses[0], losses[-1]) if losses else None,
        "dtype": run.meta["dtype"],
        "save_raw": run.meta["save_raw"],
        "seed": run.meta.get("seed"),
        "format_version": run.manifest.format_version,
        "bytes": size,
        "space": run_space(run.meta),
    }


def format_run_info(info: dict[str, Any]) -> str:
    loss = info["loss_first_last"]
    lines = [
        f"{info['path']}: {info['regime'] or 'unknown regime'} run, {info['state']['description']}",
        f"  steps:    {info['steps']} (steps {info['first_step']}..{info['last_step']}), "
        f"{info['clipped_steps']} clipped, {info['nonfinite_steps']} non-finite",
        f"  modules:  {info['modules']} ({', '.join(f'{k}:{v}' for k, v in info['projections'].items())}), "
        f"{info['entries']:,} {'W' if info.get('space') == 'weight' else 'B'} entries",
        f"  storage:  {info['dtype']}, raw shards {'on' if info['save_raw'] else 'off'}, "
        f"{info['bytes'] / 2**20:.1f} MiB, seed {info['seed']}, format {info['format_version']}",
    ]
    if info["adapter"]:
        lines.append(f"  adapter:  {adapter_line(info['adapter'])}")
        if (note := adapter_note(info["adapter"])) is not None:
            lines.append(f"  NOTE:     {note}")
    if info["no_signal_steps"]:  # complete is not the same as informative: say it
        lines.append(f"  WARNING:  {info['no_signal_steps']} of {info['steps']} steps had no learning signal "
                     "(zero_gradient / zero_reward_std in their step records)")
    if loss:
        lines.append(f"  loss:     {loss[0]:.4f} -> {loss[1]:.4f}")
    return "\n".join(lines)


def verify_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read every shard and accumulator tensor the manifest lists and check its crc32: one entry per tensor checked
    (``tensors``), grouped by file (``files``), and the failures."""
    manifest, checked = verify_run(path)
    files: dict[str, list[dict[str, Any]]] = {}
    for c in checked:
        files.setdefault(c.file, []).append(asdict(c))
    return {"path": str(path), "format_version": manifest.format_version, "tensors": [asdict(c) for c in checked],
            "files": files, "bytes": sum(c.bytes for c in checked), "failed": [asdict(c) for c in checked if c.error],
            "checksums": all(c.checksum for c in checked)}


def format_verify(info: dict[str, Any]) -> str:
    """One line per file: the tensors read and whether each matched; then the total."""
    lines = []
    for file, tensors in info["files"].items():
        bad = [t for t in tensors if t["error"]]
        names = [t["tensor"] for t in tensors]
        what = f"{len(names)} tensor(s) ({names[0]}..{names[-1]})" if len(names) > 1 else f"tensor {names[0]}"
        state = "ok" if not bad else f"{len(bad)} BAD: " + "; ".join(t["error"] for t in bad)
        lines.append(f"  verify:   {file}: {what}, {sum(t['bytes'] for t in tensors) / 2**20:.2f} MiB, {state}")
    n, failed = len(info["tensors"]), len(info["failed"])
    if failed:
        verdict = f"{failed} of {n} tensor(s) FAILED"
    elif info["checksums"]:
        verdict = f"all {n} tensor(s) match their crc32"
    else:
        verdict = (f"{n} tensor(s) read; format {info['format_version']} run: no checksums recorded, only framing and "
                   "shapes checked")
    lines.append(f"  verified: {len(info['files'])} file(s), {info['bytes'] / 2**20:.2f} MiB read: {verdict}")
    return "\n".join(lines)


def check_verified(info: dict[str, Any]) -> None:
    """Raise a one-line GradlensError naming the first failure if any tensor failed verification."""
    if info["failed"]:
        raise GradlensError(f"{info['path']}: {len(info['failed'])} of {len(info['tensors'])} tensor(s) failed "
                            f"verification; first: {info['failed'][0]['error']}")
