"""LoRA-FA adapters: PEFT LoRA with every ``lora_A`` frozen, so only ``lora_B`` trains.

Freezing A makes the trainable update of each adapted weight ``B @ A`` linear in B, which is what lets a sparse mask
over the entries of B stand for a sparse weight update. This module is the one place that owns the adapter's defaults
(:func:`default_alpha`, the ``all-linear`` targets) and the one "no LoRA adapter" error (:func:`require_lora`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from transformers import PreTrainedModel

from gradlens.dtensors import is_sharded, local, sum_over_processes
from gradlens.errors import GradlensError
from gradlens.modules import ALL_PROJECTIONS

ALL_LINEAR = "all-linear"  # PEFT's name for every linear projection but the output head


def default_alpha(r: int, alpha: int | None = None) -> int:
    """LoRA alpha: ``alpha`` when given, else ``2 * r`` (the one place this default is written)."""
    return alpha if alpha is not None else 2 * r


def require_lora(model: torch.nn.Module, where: str = "model") -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, lora_B weight)`` of the active adapter, or the one-line error saying the model has no LoRA adapter."""
    found = list(lora_b_parameters(model))
    if not found:
        raise GradlensError(f"{where} has no PEFT LoRA adapter (no LoraLayer found); attach one with attach_lora()")
    return found


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
                target_modules: Sequence[str] | None = None, dropout: float = 0.0, use_dora: bool = False,
                use_rslora: bool = False):
    """A PEFT ``LoraConfig`` for a causal LM, checking that every target names a linear layer of ``model``.

    ``target_modules=None`` or ``["all-linear"]`` adapts every linear projection of the architecture
    (:func:`default_lora_targets`, resolved to names here, so the recorded config lists them).
    """
    from peft import LoraConfig

    if r < 1:
        raise GradlensError(f"LoRA rank must be >= 1, got {r}")
    targets = list(target_modules) if target_modules is not None else [ALL_LINEAR]
    if targets == [ALL_LINEAR]:
        targets = default_lora_targets(model)
    if not targets:
        raise GradlensError("no LoRA target modules given")
    available = _linear_names(model)
    unknown = [t for t in targets if t not in available]
    if unknown:
        raise GradlensError(f"{type(model).__name__} has no LoRA target module(s) {', '.join(unknown)}; "
                            f"its linear layers are: {', '.join(sorted(available))}")
    return LoraConfig(r=r, lora_alpha=default_alpha(r, alpha), target_modules=targets,
                      lora_dropout=dropout, use_dora=use_dora, use_rslora=use_rslora, bias="none",
                      task_type="CAUSAL_LM")


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
                target_modules: Sequence[str] | None = None, dropout: float = 0.0, use_dora: bool = False,
                use_rslora: bool = False, seed: int = 0):
    """Wrap ``model`` in a PEFT LoRA adapter (LoRA-FA): every ``lora_A`` frozen, only ``lora_B`` requires grad.

    B starts at zero as in standard LoRA; A keeps PEFT's (seeded) Kaiming init and never changes. With ``use_dora``
    DoRA's magnitude vector stays frozen too, so B is still the only thing that trains.
    """
    from peft import get_peft_model

    config = lora_config(model, r=r, alpha=alpha, target_modules=target_modules, dropout=dropout, use_dora=use_dora,
                         use_rslora=use_rslora)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    freeze_lora_a(peft_model)
    return peft_model


def freeze_lora_a(model: torch.nn.Module) -> None:
    """Set ``requires_grad`` so that exactly the ``lora_B`` weights of the LoRA layers train."""
    trainable = {id(p) for _, p in require_lora(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)




def b_nonzero(model: torch.nn.Module) -> tuple[int, int]:
    """(non-zero entries, all entries) of the active adapter's B: B starts at 0, so the first counts what moved."""
    params = [p.detach() for _, p in lora_b_parameters(model)]
    entries = sum(p.numel() for p in params)
    if any(is_sharded(p) for p in params):  # FSDP2: every process counts its blocks (every process must call this)
        return round(sum_over_processes([torch.count_nonzero(local(p)) for p in params], params)), entries
    return sum(int(torch.count_nonzero(p)) for p in params), entries
