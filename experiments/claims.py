"""Recorded runs for the published-claims scripts (``scripts/claim_*.py``): a gradlens recording that also keeps B
after every optimizer step, so the update trajectory (not only the gradients) can be read back.

The B-trajectory is what RELEX's rank-1 claim and the bf16 check need: the recorder stores gradients, and AdamW's
updates cannot be replayed from them exactly (clipping, moment state, rounding in bf16). ``bf16_master`` loads the
whole model, adapter included, in bfloat16 and trains it so: AdamW then keeps B (the master weights) and its moments
in bf16, and an update smaller than half a bf16 ulp of an entry is rounded away; gradlens's own ``--dtype bfloat16``
does not do this (see ``docs/published-claims.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gradlens.fsio import atomic_write

STEPS = 60
TRAJECTORY = "b_trajectory.safetensors"
WORLDS = ("toy:small", "toy:math")
REGIMES = ("sft", "grpo")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (the machine is shared: wall is noise)."""
    return sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


def run_name(model: str, regime: str, seed: int, bf16_master: bool = False, learning_rate: float | None = None
             ) -> str:
    lr = "" if learning_rate is None else f"-lr{learning_rate:g}"
    return f"{model.replace(':', '-')}-{regime}-{'bf16' if bf16_master else 'fp32'}{lr}-seed{seed}"


def trajectory_callback(out: Path) -> Any:
    """A TrainerCallback that copies every lora_B after each optimizer step and writes them, stacked per module as
    float32 ``(T, d_out, r)``, to ``out/b_trajectory.safetensors`` when training ends."""
    from transformers import TrainerCallback

    from gradlens.lora import lora_b_parameters
    from gradlens.models import unwrap

    class BTrajectory(TrainerCallback):
        def __init__(self) -> None:
            self.rows: dict[str, list[np.ndarray]] = {}

        def on_step_end(self, args, state, control, model=None, **kwargs):
            for name, p in lora_b_parameters(unwrap(model)):
                self.rows.setdefault(name, []).append(p.detach().float().cpu().numpy().copy())

        def on_train_end(self, args, state, control, **kwargs):
            from safetensors.numpy import save_file

            tensors = {name: np.stack(rows) for name, rows in self.rows.items()}
            atomic_write(out / TRAJECTORY, lambda tmp: save_file(tensors, str(tmp)))

    return BTrajectory()


def ensure_run(root: Path, model: str, regime: str, seed: int, *, bf16_master: bool = False, resume: bool = True,
               n_eval: int = 0, learning_rate: float | None = None) -> tuple[Path, dict[str, Any]]:
    """The recorded run (60 steps, raw gradient shards kept; ``learning_rate`` None: the task's) and its
    B-trajectory under ``root``; reused when ``resume`` and both are complete, else trained from scratch. Returns the
    run directory and what it cost."""
    import torch

    from gradlens.config import RecordConfig
    from gradlens.store import open_run
    from gradlens.training.run import run_training
    from gradlens.training.setup import setup_run

    out = root / run_name(model, regime, seed, bf16_master, learning_rate)
    if resume and (out / TRAJECTORY).is_file() and (out / "manifest.json").is_file() and open_run(out).meta.get(
            "complete"):
        return out, {"reused": True}
    shutil.rmtree(out, ignore_errors=True)
    config = RecordConfig(model=model, regime=regime, seed=seed, max_steps=STEPS, out=str(out), n_eval=n_eval,
                          dtype="bfloat16" if bf16_master else "float32", learning_rate=learning_rate)
    setup = setup_run(config)  # toy models load in float32 whatever config.dtype says
    if bf16_master:
        setup = dataclasses.replace(setup, model=setup.model.to(torch.bfloat16))
    start, cpu = time.time(), cpu_seconds()
    # what gradlens.record does, plus one callback (record() takes none)
    run_training(config, out=out, tool="scripts/claim_*.py (experiments.claims)", setup=setup, record_dir=out,
                 callbacks=[trajectory_callback(out)], progress=False)
    return out, {"reused": False, "wall_s": round(time.time() - start, 1), "cpu_s": round(cpu_seconds() - cpu, 1)}


def parser(doc: str, out: str) -> argparse.ArgumentParser:
    """The flags every claim script takes: where the runs are, the seeds, the result file and ``--resume``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--runs", default="runs/claims", help="where the recorded runs are (made if missing)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", default=out)
    p.add_argument("--resume", action="store_true", help="reuse finished runs")
    return p


def n_eval(model: str) -> int:
    """Held-out prompts each run is evaluated on: 400 on ``toy:small`` (5-token answers), none on ``toy:math``
    (worked answers of up to 96 tokens cost more than the run)."""
    return 400 if model == "toy:small" else 0


def float32_runs(root: Path, seeds: list[int], resume: bool) -> Iterator[tuple[str, str, int, Path]]:
    """``(world, regime, seed, run directory)`` of the float32 runs of every world and regime (made if missing)."""
    for world in WORLDS:
        for regime in REGIMES:
            for seed in seeds:
                yield world, regime, seed, ensure_run(root, world, regime, seed, resume=resume,
                                                      n_eval=n_eval(world))[0]


def load_trajectory(run_dir: Path) -> dict[str, np.ndarray]:
    """``{module: (T, d_out, r) float32}``: B after each optimizer step of a run made by :func:`ensure_run`."""
    from safetensors.numpy import load_file

    return load_file(str(run_dir / TRAJECTORY))


def base_weights(model: str) -> dict[str, np.ndarray]:
    """``{module name: W (d_out, d_in) float32}`` of the base model's linear layers (the names the adapter uses)."""
    import torch

    from gradlens.models import load_model

    base, _ = load_model(model, progress=False)
    return {name: m.weight.detach().float().numpy() for name, m in base.named_modules()
            if isinstance(m, torch.nn.Linear) and name != "lm_head"}


def adapter_factors(run_dir: Path) -> tuple[dict[str, np.ndarray], float]:
    """``({module: A (r, d_in) float32}, scaling)`` of a run's saved adapter (A is frozen, so the final A is every
    step's A)."""
    from safetensors.torch import load_file

    from gradlens.fsio import read_json

    cfg = read_json(run_dir / "adapter" / "adapter_config.json", "adapter config")
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scaling = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
    tensors = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    prefix, suffix = "base_model.model.", ".lora_A.weight"
    a = {k[len(prefix):-len(suffix)]: v.float().numpy() for k, v in tensors.items() if k.endswith(suffix)}
    return a, scaling



def interval(values: Any) -> dict[str, float]:
    """``{"mean", "lo", "hi"}``: the mean over seeds and its 95% Student-t interval."""
    from gradlens.compare.tables import t_interval

    mean, lo, hi = t_interval(values)
    return {"mean": mean, "lo": lo, "hi": hi}


def write_result(path: Path, result: dict[str, Any], argv: list[str], wall: float, cpu: float) -> None:
    """``result`` with its provenance (the command, package versions, threads, wall and CPU seconds), atomically."""
    import datetime
    import os
    import sys

    from gradlens.fsio import json_dump
    from gradlens.provenance import package_versions

    provenance = {"command": " ".join(["python", sys.argv[0], *argv]), "versions": package_versions(),
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "wall_s": round(time.time() - wall, 1),
                  "cpu_s": round(cpu_seconds() - cpu, 1),
                  "note": "CPU seconds are user + system of this process and its children; the 2-core machine "
                          "was shared, so wall time is inflated"}
    path.parent.mkdir(parents=True, exist_ok=True)
    json_dump({**result, "provenance": provenance}, path)
