"""Placement masks from the accumulators of a recorded run, written one file per selector and budget: what
``gradlens select`` does for a run already recorded (by ``gradlens record``, ``gradlens train --record``, a probe, or a
``GradientRecorder`` in your own Trainer), without training anything, and what a probe does after its short run."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradlens.config import SelectConfig
from gradlens.errors import GradlensError
from gradlens.fsio import check_unused_out, json_dump
from gradlens.placement.diagnose import locate_run
from gradlens.provenance import package_versions
from gradlens.store.runstate import announce, require_space, run_space

if TYPE_CHECKING:
    from gradlens.store import Run

SELECT_FILE = "select.json"


def mask_file(out: Path, method: str, budget: str) -> Path:
    """Where a probe keeps the mask of one selector and budget (``%`` spelled ``pct`` for portable names)."""
    return out / "masks" / f"{method}-{budget.replace('%', 'pct')}.safetensors"


def adapter_metadata(run: Run) -> dict[str, Any]:
    """The adapter ``run`` was recorded on, as :data:`~gradlens.sparse.masks.ADAPTER_METADATA`: model, rank, alpha
    and the seed of LoRA A (the run's ``--seed``, which ``attach_lora`` draws A with), from the ``config.record``
    that ``gradlens record``, probe and train store; empty for a run recorded by a user's own Trainer."""
    record = run.meta.get("config", {}).get("record")
    if not isinstance(record, dict) or not {"model", "lora_r", "lora_alpha", "seed"} <= set(record):
        return {}
    from gradlens.lora import default_alpha

    alpha = default_alpha(record["lora_r"], record["lora_alpha"])
    return {"model": record["model"], "lora_r": record["lora_r"], "lora_alpha": alpha, "lora_seed": record["seed"]}


def write_masks(run: Run, out: Path, methods: Sequence[str], budgets: Sequence[str], scope: str, seed: int,
                metadata: dict[str, Any] | None = None) -> tuple[dict[tuple[str, str], Path], dict[str, float]]:
    """Score ``run``'s accumulators with each selector and write one mask per budget to :func:`mask_file`.

    Returns the mask files by ``(method, budget)`` and the scoring seconds by ``method/budget``; each mask's metadata
    names the selector, budget, scope, seed, source run and scoring time, the adapter it was scored on
    (:func:`adapter_metadata`) and ``metadata``.
    """
    from gradlens.budget import Budget
    from gradlens.placement.selectors import select
    from gradlens.sparse.masks import save_mask

    adapter = {**adapter_metadata(run), "space": run_space(run.meta)}
    acc = run.accumulators()
    shapes = {s.name: s.shape for s in run.specs}
    masks: dict[tuple[str, str], Path] = {}
    scoring: dict[str, float] = {}
    for method in methods:
        for text in budgets:
            budget = Budget.parse(text, scope)
            t0 = time.perf_counter()
            mask = select(method, budget, shapes, accumulators=acc, seed=seed)
            scoring[f"{method}/{budget}"] = time.perf_counter() - t0
            masks[(method, str(budget))] = save_mask(mask_file(out, method, str(budget)), mask, {
                "selector": method, "budget": str(budget), "scope": scope, "seed": seed, "source_run": str(run.path),
                "scoring_seconds": scoring[f"{method}/{budget}"], **adapter, **(metadata or {})})
    return masks, scoring


def select_masks(run_dir: str | Path, config: SelectConfig) -> tuple[dict[tuple[str, str], Path], dict[str, float]]:
    """Masks per selector and budget in ``OUT/masks`` (see :func:`write_masks`), plus ``OUT/select.json`` (config,
    run, its state, versions). ``run_dir`` is a run directory or a probe directory (its ``run``, as ``diagnose``
    reads it). A used ``OUT`` is refused unless ``config.overwrite``, which removes its old masks first, so the masks
    of two runs never sit side by side."""
    from gradlens.store import open_run

    out = Path(config.out)
    check_unused_out(out, config.overwrite)
    run_path, probe = locate_run(Path(run_dir))
    run = open_run(run_path)
    require_space(run_space(run.meta), config.space, str(run.path))
    if not run.steps:
        raise GradlensError(f"{run.path}: the run holds no recorded steps, so there is nothing to score")
    state = announce(run.meta, str(run.path), doing="scoring")
    for old in (out / "masks").glob("*.safetensors") if config.overwrite else ():
        old.unlink()
    masks, scoring = write_masks(run, out, config.methods, config.budgets, config.scope, config.seed,
                                 {"source_steps": len(run.steps)})
    json_dump({"tool": "gradlens select", "config": asdict(config), "run": str(run.path), "steps": len(run.steps),
               "probe": probe, **state,
               "run_seed": run.meta.get("seed"), "scoring_seconds": scoring,
               "masks": {f"{m}/{b}": str(p) for (m, b), p in masks.items()}, "versions": package_versions()},
              out / SELECT_FILE)
    return masks, scoring
