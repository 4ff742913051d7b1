"""A run's setup: the base model on its device and in its dtype, its LoRA-FA adapter (A drawn with the run's seed),
the task with its prompt format decided for this model, and the task's rows.

A :class:`LoadedBase` can be loaded once and shared: compare keeps one in memory and gives every run (probes too) a
fresh copy of it, so a comparison loads its base model once.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from gradlens.config import ModelTaskConfig, RecordConfig
from gradlens.tasks.base import Task


@dataclass(frozen=True)
class LoadedBase:
    """A base model (no adapter), its tokenizer, and the device and dtype it was loaded for."""

    model: Any
    tokenizer: Any
    device: str
    model_dtype: str


@dataclass(frozen=True)
class RunSetup:
    """What one run trains: its LoRA-FA model, tokenizer, task, training rows and held-out rows (or None)."""

    model: Any
    tokenizer: Any
    task: Task
    data: Any
    eval_data: Any
    device: str
    model_dtype: str


def load_base(config: ModelTaskConfig, *, progress: bool = True) -> LoadedBase:
    """The config's base model on the resolved device, in the resolved dtype (``auto``: bf16 on a bf16 GPU)."""
    from gradlens.models import load_model, resolve_device, resolve_dtype

    device = resolve_device(config.device)
    model_dtype = resolve_dtype(config.dtype, device, config.model)
    extra = {"attn_implementation": config.attn_implementation} if config.attn_implementation else {}
    model, tokenizer = load_model(config.model, model_dtype, progress=progress, revision=config.model_revision,
                                  **extra)
    return LoadedBase(model.to(device), tokenizer, device, model_dtype)


def setup_run(config: RecordConfig, *, base: LoadedBase | None = None, task: Task | None = None,
              data: Any = None) -> RunSetup:
    """Seed everything, then the model with its LoRA-FA adapter (space ``weight``: the base model with only the
    target modules' weights trainable), the task and its rows.

    ``base``: a base model already in memory, copied (so it stays a base model for the next run) instead of loaded;
    ``task`` and ``data``: the task and training rows when the caller holds them (compare). Held-out rows are loaded
    when ``n_eval > 0``, now, so a bad split fails before training.
    """
    from transformers import set_seed

    from gradlens.lora import attach_lora
    from gradlens.tasks import load_task_for

    set_seed(config.seed)
    base = LoadedBase(copy.deepcopy(base.model), base.tokenizer, base.device, base.model_dtype) if base else (
        load_base(config))
    if config.space == "weight":  # no adapter: the target modules' base weights train
        from gradlens.sparse.space import attach_weight_space

        model = attach_weight_space(base.model, config.lora_target_modules)
    else:
        model = attach_lora(base.model, **config.lora_kwargs(), seed=config.seed)
    task = task or load_task_for(config, model, base.tokenizer)
    data = data if data is not None else task.dataset(task.train_split, config.n_train)
    eval_data = task.dataset(task.eval_split, config.n_eval) if config.n_eval > 0 else None
    return RunSetup(model, base.tokenizer, task, data, eval_data, base.device, base.model_dtype)
