"""Models: loading (the toy base models and any ``from_pretrained`` causal LM), where to train and in which dtype,
and LoRA-FA adapters: LoRA with every ``lora_A`` frozen, so only ``lora_B`` trains.

Freezing A makes the trainable update of each adapted weight ``B @ A`` linear in B, which is what lets a sparse mask
over the entries of B stand for a sparse weight update. Defaults follow the hardware: bf16 weights on a GPU that
supports it (and the Trainer's bf16 autocast with them), float32 on a CPU, where bf16 matmuls are slow and lossy. The
toy models always load in float32 so that toy runs stay reproducible on any machine.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gradlens.config import TOY_PREFIX
from gradlens.errors import GradlensError
from gradlens.modules import ALL_PROJECTIONS

# Instruct/chat checkpoints by the usual naming: Qwen2.5-7B-Instruct, Llama-3.1-8B-Instruct, gemma-2-2b-it, *-chat.
_INSTRUCT_NAME = re.compile(r"instruct|chat|[-_]it(?![a-z])", re.IGNORECASE)


def load_model(spec: str, dtype: str = "float32", *, progress: bool = True
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) for ``toy:PRESET`` (always float32, built on first use) or a ``from_pretrained`` path or
    hub id in ``dtype``."""
    if spec.startswith(TOY_PREFIX):
        from gradlens.toy.model import ensure_base_model

        return load_model_and_tokenizer(ensure_base_model(spec[len(TOY_PREFIX) :], progress=progress))
    return load_model_and_tokenizer(spec, dtype=dtype)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP/accelerate wrappers (what callbacks receive may be wrapped)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def load_model_and_tokenizer(name_or_path: str | os.PathLike[str], *, dtype: str | torch.dtype = "float32",
                             **model_kwargs) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Any HF causal LM and its tokenizer through ``from_pretrained`` (a local directory or a hub id).

    Errors name the path or id and the cause in one line. Pad token falls back to eos, as TRL expects one.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    looks_local = os.path.sep in name or name.startswith(".") or Path(name).exists()
    if looks_local and not Path(name).is_dir():
        raise GradlensError(f"model path {name!r} does not exist or is not a directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **model_kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GradlensError(f"cannot load model {name!r}: {first}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _linear_layers(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """Every linear layer (``nn.Linear``/``Conv1D``, or one PEFT already adapted) by full name, in model order,
    skipping the adapters' own parts (``base_layer``, ``lora_A.default``, ...)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers.pytorch_utils import Conv1D

    inside_adapters = {f"{name}.{sub}" for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)
                       for sub, _ in m.named_modules() if sub}
    for name, m in model.named_modules():
        if isinstance(m, BaseTunerLayer | torch.nn.Linear | Conv1D) and name not in inside_adapters:
            yield name, m


def _linear_names(model: torch.nn.Module) -> set[str]:
    """Last name component of every linear layer, including those already wrapped by a LoRA layer."""
    return {name.rsplit(".", 1)[-1] for name, _ in _linear_layers(model)}


def default_lora_targets(model: torch.nn.Module) -> list[str]:
    """Every linear projection of the architecture, by the rule of PEFT's ``target_modules="all-linear"``.

    That is every ``nn.Linear``/``Conv1D`` except the output embedding (the LM head), given by last name component
    in model order: ``q_proj ... down_proj`` on Llama, Qwen2/3, Mistral and Gemma, ``c_attn c_proj c_fc`` on GPT-2.
    Names, not full paths, so the targets read like a recipe and ``--modules`` can select among them.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None  # PeftModel forwards it
    names = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name, m in _linear_layers(model) if m is not head))
    if not names:
        raise GradlensError(f"{type(model).__name__} has no linear projection to adapt besides its output head "
                            f"(expected nn.Linear/Conv1D layers such as {', '.join(ALL_PROJECTIONS)})")
    return names


def lora_config(model: torch.nn.Module, *, r: int = 8, alpha: int | None = None,
                target_modules: Sequence[str] | None = None, dropout: float = 0.0):
    """A PEFT ``LoraConfig`` for a causal LM, checking that every target names a linear layer of ``model``.

    ``target_modules=None`` adapts every linear projection of the architecture (:func:`default_lora_targets`).
    """
    from peft import LoraConfig

    if r < 1:
        raise GradlensError(f"LoRA rank must be >= 1, got {r}")
    targets = default_lora_targets(model) if target_modules is None else list(target_modules)
    if not targets:
        raise GradlensError("no LoRA target modules given")
    available = _linear_names(model)
    unknown = [t for t in targets if t not in available]
    if unknown:
        raise GradlensError(f"{type(model).__name__} has no LoRA target module(s) {', '.join(unknown)}; "
                            f"its linear layers are: {', '.join(sorted(available))}")
    return LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r, target_modules=targets,
                      lora_dropout=dropout, bias="none", task_type="CAUSAL_LM")


def lora_b_parameters(model: torch.nn.Module, adapter: str | None = None) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """``(module name, lora_B weight)`` of every PEFT LoRA layer, found by module type, for one adapter.

    ``adapter`` defaults to each layer's active adapter; other adapters (e.g. GRPO's frozen ``ref``) are skipped.
    Module names drop PEFT's ``base_model.model.`` prefix so they match the base model's own names.
    """
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        active = module.active_adapters
        names = [adapter] if adapter is not None else active
        for a in names:
            if a in module.lora_B:
                yield name.removeprefix("base_model.model."), module.lora_B[a].weight


def attach_lora(model: PreTrainedModel, *, r: int = 8, alpha: int | None = None,
                target_modules: Sequence[str] | None = None, dropout: float = 0.0, seed: int = 0):
    """Wrap ``model`` in a PEFT LoRA adapter (LoRA-FA): every ``lora_A`` frozen, only ``lora_B`` requires grad.

    B starts at zero as in standard LoRA; A keeps PEFT's (seeded) Kaiming init and never changes.
    """
    from peft import get_peft_model

    config = lora_config(model, r=r, alpha=alpha, target_modules=target_modules, dropout=dropout)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    freeze_lora_a(peft_model)
    return peft_model


def freeze_lora_a(model: torch.nn.Module) -> None:
    """Set ``requires_grad`` so that exactly the ``lora_B`` weights of the LoRA layers train."""
    trainable = {id(p) for _, p in lora_b_parameters(model)}
    if not trainable:
        raise GradlensError("model has no PEFT LoRA adapter (no LoraLayer found); attach one with attach_lora()")
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)


def resolve_device(device: str) -> str:
    """``cpu`` or ``cuda``; ``auto`` is the GPU if there is one. Asking for a missing GPU is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise GradlensError("--device cuda: no CUDA GPU is available to this process")
    if device not in ("cpu", "cuda"):
        raise GradlensError(f"unknown device {device!r}; choose auto, cpu or cuda")
    return device


def resolve_dtype(model_dtype: str, device: str, model: str) -> str:
    """The dtype to load ``model`` in: ``auto`` is bfloat16 on a bf16-capable GPU, else float32 (always for toys)."""
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
