"""The TRL settings of a run: which config class a regime uses, and how a run's fields are layered.

Settings are layered (:func:`trl_settings`): CPU-safe defaults, then what the device and dtype need, then the task's
own defaults, then the user's TRL fields, then the gradlens flags (steps, seed, learning rate). Every TRL config field
can be overridden by name; an unknown name is an error rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Mapping
from typing import Any

from gradlens.config import REGIMES, RecordConfig
from gradlens.errors import GradlensError
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


def check_overrides(regime: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The user's TRL fields typed as TRL types them (:mod:`gradlens.training.trl_fields`); fails early, in one line,
    on unknown fields, wrong values, reporters that are not installed, and ``use_vllm`` without vLLM installed (TRL
    would raise its ImportError only when the trainer is built)."""
    from gradlens.training.trl_fields import check_reporters, typed_trl_fields

    typed = typed_trl_fields(config_class(regime), overrides)
    if "report_to" in typed:
        check_reporters(typed["report_to"])
    if typed.get("use_vllm") and importlib.util.find_spec("vllm") is None:
        raise GradlensError("--use_vllm true: vLLM is not installed in this environment (pip install vllm, or drop "
                            "--use_vllm to generate with transformers)")
    return typed


def build_trl_config(regime: str, output_dir: str, overrides: Mapping[str, Any] | None = None):
    """A TRL ``SFTConfig``/``GRPOConfig`` from the CPU-safe defaults updated by ``overrides``."""
    fields = config_fields(regime)
    overrides = check_overrides(regime, overrides or {})
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


def device_settings(device: str, dtype: str) -> dict[str, Any]:
    """TRL/Trainer settings that follow from device and dtype; the user's own TRL settings override them."""
    out: dict[str, Any] = {}
    if device == "cpu":
        out["use_cpu"] = True
    elif dtype == "bfloat16":
        out["bf16"] = True  # autocast for the float32 LoRA weights PEFT keeps next to bf16 base weights
    return out


def default_learning_rate(regime: str) -> float:
    """TRL's own default learning rate of a regime's config (what a run gets when neither task nor user sets one)."""
    return float(config_fields(regime)["learning_rate"].default)


def trl_settings(config: RecordConfig, task: Task, device: str = "cpu", model_dtype: str = "float32"
                 ) -> dict[str, Any]:
    """The TRL config fields of one run: device/dtype needs, the task's defaults, the user's TRL fields, then the
    gradlens flags (``max_steps``, ``seed`` and ``data_seed``, ``learning_rate`` when given)."""
    out = {**device_settings(device, model_dtype), **task.trl_defaults(config.regime),
           **check_overrides(config.regime, config.trl),
           "max_steps": config.max_steps, "seed": config.seed, "data_seed": config.seed}
    if config.learning_rate is not None:
        out["learning_rate"] = config.learning_rate
    return out
