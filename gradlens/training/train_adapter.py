"""``train``: one run of a LoRA-FA adapter, full-B or sparse-B, for any model and task that ``record`` takes.

The library behind ``gradlens train``. With ``mask`` (a probe's or select's mask file) only the mask's entries of B
train, and the adapter is exported with the mask; a mask that does not fit the adapter (modules, shapes, rank, the
seed that drew A, the space) is refused before anything is trained or written. With ``space="weight"`` the target
modules' base weights train instead (all of them, or the mask's entries), and ``OUT/sparse_delta.safetensors`` holds
trained minus base (:mod:`gradlens.sparse.delta`); the drift guard, which checks that base weights stay frozen, is
off. A :class:`~gradlens.drift.DriftGuard` checks
that the base weights stayed frozen, ``record`` also records every B gradient into ``OUT/run``, ``n_eval`` ends the
run with held-out greedy accuracy. ``OUT/train.json`` holds the provenance.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradlens.config import TrainConfig
from gradlens.errors import GradlensError, GradlensWarning
from gradlens.training.run import TrainingResult

RUN_DIR = "run"


def read_mask(config: TrainConfig) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """The mask of ``--mask`` with its metadata, refused when it was scored in another space than ``--space``, or
    (space ``lora_b``) on another rank or LoRA-A seed; the warnings of
    :func:`~gradlens.sparse.masks.check_mask_adapter`."""
    from gradlens.lora import default_alpha
    from gradlens.sparse.masks import check_mask_adapter, load_mask
    from gradlens.store.runstate import require_space

    path = Path(config.mask)
    if not path.is_file():
        raise GradlensError(f"--mask {path}: no such file")
    mask, meta = load_mask(path)
    if require_space(meta.get("space") or "lora_b", config.space, f"--mask {path}") == "weight":
        return mask, meta, []  # W has no A: the rank and A seed the mask was scored with do not bear on it
    notes = check_mask_adapter(meta, {"model": config.model, "lora_r": config.lora_r,
                                      "lora_alpha": default_alpha(config.lora_r, config.lora_alpha),
                                      "lora_seed": config.seed}, f"--mask {path}")
    return mask, meta, notes


def train(config: TrainConfig, *, progress: bool = True, callbacks: Sequence[Any] = ()) -> TrainingResult:
    """Train under ``config`` into ``config.out`` (a new or empty directory); see the module docstring.

    ``callbacks`` are extra TrainerCallbacks; ``progress=False`` drops the Trainer's progress bar and console logs.
    """
    from gradlens.drift import DriftGuard
    from gradlens.training.run import run_training
    from gradlens.training.settings import check_overrides

    check_overrides(config.regime, config.trl)
    out = Path(config.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GradlensError(f"{out} exists and is not an empty directory; choose a new --out")
    mask, meta, notes = read_mask(config) if config.mask else (None, {}, [])
    for note in notes:
        warnings.warn(note, GradlensWarning, stacklevel=2)
    return run_training(config, out=out, tool="gradlens train", mask=mask, mask_meta=meta, mask_path=config.mask,
                        record_dir=out / RUN_DIR if config.record else None,
                        drift_guard=DriftGuard() if config.drift_guard and config.space == "lora_b" else None,
                        callbacks=callbacks,
                        progress=progress, notes=notes)
