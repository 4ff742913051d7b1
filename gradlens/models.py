"""Real models for ``gradlens record``: where to train, in which dtype, and whether prompts go through a chat template.

Defaults follow the hardware: bf16 weights on a GPU that supports it (and the Trainer's bf16 autocast with them),
float32 on a CPU, where bf16 matmuls are slow and lossy. The toy models always load in float32 so that toy runs
stay reproducible on any machine. Every choice can be overridden from :class:`gradlens.config.RecordConfig`.
"""

from __future__ import annotations

import re
from typing import Any

from transformers import PreTrainedTokenizerBase

from gradlens.config import TOY_PREFIX
from gradlens.errors import GradlensError

# Instruct/chat checkpoints by the usual naming: Qwen2.5-7B-Instruct, Llama-3.1-8B-Instruct, gemma-2-2b-it, *-chat.
_INSTRUCT_NAME = re.compile(r"instruct|chat|[-_]it(?![a-z])", re.IGNORECASE)


def resolve_device(device: str) -> str:
    """``cpu`` or ``cuda``; ``auto`` is the GPU if there is one. Asking for a missing GPU is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise GradlensError("--device cuda: no CUDA GPU is available to this process")
    if device not in ("cpu", "cuda"):
        raise GradlensError(f"unknown device {device!r}; choose auto, cpu or cuda")
    return device


def resolve_dtype(model_dtype: str, device: str, model: str) -> str:
    """The dtype to load ``model`` in: ``auto`` is bfloat16 on a bf16-capable GPU, else float32 (always for toys)."""
    import torch

    if model_dtype != "auto":
        return model_dtype
    if model.startswith(TOY_PREFIX) or device != "cuda":
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"


def trainer_overrides(device: str, dtype: str) -> dict[str, Any]:
    """TRL/Trainer settings that follow from device and dtype; the user's own TRL settings override them."""
    out: dict[str, Any] = {}
    if device == "cpu":
        out["use_cpu"] = True
    elif dtype == "bfloat16":
        out["bf16"] = True  # autocast for the float32 LoRA weights PEFT keeps next to bf16 base weights
    return out


def uses_chat_template(prompt_format: str, model: str, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether prompts go through the tokenizer's chat template.

    ``auto`` uses it for instruct models only: base checkpoints such as Qwen2.5-1.5B ship a chat template too, but
    were never trained on it, so a plain prompt suits them better. The model name tells the two apart.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "chat":
        if not has_template:
            raise GradlensError(f"--prompt_format chat: the tokenizer of {model} has no chat template")
        return True
    if prompt_format == "plain":
        return False
    return has_template and bool(_INSTRUCT_NAME.search(model.rstrip("/").rsplit("/", 1)[-1]))
