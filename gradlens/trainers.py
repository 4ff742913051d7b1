"""The one training path: :func:`build_trainer` makes the TRL trainer (SFT or GRPO) of every gradlens run, for
record, train, probe and compare alike, from a LoRA-FA model, a task and the run's TRL settings.

Settings are layered (:func:`trl_settings`): CPU-safe defaults, then what the device and dtype need, then the task's
own defaults, then the user's TRL fields, then the gradlens flags (steps, seed, learning rate). Every TRL config field
can be overridden by name; an unknown name is an error rather than silently ignored.

Note on GRPO batch sizes: in ``GRPOConfig``, ``per_device_train_batch_size`` counts *completions*, not prompts. With
``num_generations=G``, one micro-batch of ``B`` completions covers ``B / G`` prompts, and ``B`` times the number of
processes (times ``steps_per_generation``) must be divisible by ``G``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from gradlens.config import REGIMES, ModelTaskConfig, RecordConfig
from gradlens.errors import GradlensError
from gradlens.models import lora_b_parameters, resolve_prompt_format, trainer_overrides
from gradlens.tasks import is_math_task, load_task
from gradlens.tasks.base import Task

# Safe everywhere, needed on a CPU: no mixed precision, no activation checkpointing, no reporting or checkpoints
# unless asked for. Everything here can be overridden.
CPU_SAFE_DEFAULTS: dict[str, Any] = {
    "bf16": False,
    "fp16": False,
    "gradient_checkpointing": False,
    "activation_checkpointing": False,
    "report_to": "none",
    "save_strategy": "no",
    "optim": "adamw_torch",
    "logging_steps": 5,
    "dataloader_num_workers": 0,
}


def config_class(regime: str) -> type:
    """The TRL config dataclass of a regime."""
    if regime == "sft":
        from trl import SFTConfig

        return SFTConfig
    if regime == "grpo":
        from trl import GRPOConfig

        return GRPOConfig
    raise GradlensError(f"unknown regime {regime!r}; choose one of: {', '.join(REGIMES)}")


def config_fields(regime: str) -> dict[str, dataclasses.Field]:
    """The settable fields of a regime's TRL config, by name."""
    return {f.name: f for f in dataclasses.fields(config_class(regime)) if f.init}


def check_overrides(regime: str, overrides: Mapping[str, Any]) -> None:
    """Fail early, in one line, on override keys that are not fields of the regime's TRL config, and on
    ``use_vllm`` without vLLM installed (TRL would raise its ImportError only when the trainer is built)."""
    unknown = sorted(set(overrides) - set(config_fields(regime)))
    if unknown:
        raise GradlensError(f"unknown {config_class(regime).__name__} field(s): {', '.join(unknown)}")
    if overrides.get("use_vllm") and importlib.util.find_spec("vllm") is None:
        raise GradlensError("--use_vllm true: vLLM is not installed in this environment (pip install vllm, or drop "
                            "--use_vllm to generate with transformers)")


def build_trl_config(regime: str, output_dir: str, overrides: Mapping[str, Any] | None = None):
    """A TRL ``SFTConfig``/``GRPOConfig`` from the CPU-safe defaults updated by ``overrides``."""
    fields = config_fields(regime)
    overrides = dict(overrides or {})
    check_overrides(regime, overrides)
    kwargs = {k: v for k, v in CPU_SAFE_DEFAULTS.items() if k in fields}
    import torch

    if not torch.cuda.is_available():  # pinned memory only helps host-to-GPU copies
        kwargs["dataloader_pin_memory"] = False
    for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                     ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
        if old in overrides and new not in overrides:  # transformers reads the old name only if the new one is unset
            kwargs.pop(new, None)
    kwargs.update(overrides)
    try:
        return config_class(regime)(output_dir=output_dir, **kwargs)
    except (ValueError, TypeError) as e:
        raise GradlensError(f"invalid {config_class(regime).__name__}: {e}") from e


def _require_trainable_lora(model: PreTrainedModel) -> None:
    if not any(True for _ in lora_b_parameters(model)):
        raise GradlensError("model has no PEFT LoRA adapter (no LoraLayer found); attach one with attach_lora()")


def load_task_for(config: ModelTaskConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Task:
    """The config's task, with the prompt format of math tasks decided for this model and tokenizer (printed, and
    kept with its reason in ``task.describe()``, the provenance of every result); other tasks are plain text."""
    if not is_math_task(config.task):
        return load_task(config)
    fmt, reason = resolve_prompt_format(config.prompt_format, config.model, model, tokenizer)
    return load_task(config, chat=fmt == "chat", format_reason=reason)


def default_learning_rate(regime: str) -> float:
    """TRL's own default learning rate of a regime's config (what a run gets when neither task nor user sets one)."""
    return float(config_fields(regime)["learning_rate"].default)


def trl_settings(config: RecordConfig, task: Task, device: str = "cpu", model_dtype: str = "float32"
                 ) -> dict[str, Any]:
    """The TRL config fields of one run: device/dtype needs, the task's defaults, the user's TRL fields, then the
    gradlens flags (``max_steps``, ``seed`` and ``data_seed``, ``learning_rate`` when given)."""
    out = {**trainer_overrides(device, model_dtype), **task.trl_defaults(config.regime), **config.trl,
           "max_steps": config.max_steps, "seed": config.seed, "data_seed": config.seed}
    if config.learning_rate is not None:
        out["learning_rate"] = config.learning_rate
    return out


def build_trainer(regime: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, train_dataset, task: Task,
                  *, output_dir: str, settings: Mapping[str, Any] | None = None,
                  callbacks: Sequence[TrainerCallback] = ()):
    """The ``SFTTrainer`` or ``GRPOTrainer`` of a LoRA model: SFT on the dataset's completions (prompt-completion
    format: the loss covers the completion only), GRPO with the task's reward functions.

    ``per_device_train_batch_size`` counts completions under GRPO (see the module docstring).
    """
    from trl import GRPOTrainer, SFTTrainer

    _require_trainable_lora(model)
    args = build_trl_config(regime, output_dir, settings)
    if regime == "sft":
        trainer = SFTTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer,
                             callbacks=list(callbacks))
        if len(trainer.train_dataset) == 0:  # TRL drops examples whose completion was truncated away
            raise GradlensError(f"no SFT example has a completion token within max_length={args.max_length}; "
                                "raise --max_length")
        return trainer
    return GRPOTrainer(model=model, reward_funcs=task.reward_functions(), args=args, train_dataset=train_dataset,
                       processing_class=tokenizer, callbacks=list(callbacks))
