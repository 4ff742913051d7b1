"""The two spaces placement can work over: ``lora_b`` (the entries of LoRA's B, A frozen) and ``weight`` (the entries
of the chosen modules' base weights W, ``d_out x d_in``, trained without an adapter, as arXiv 2602.01599 trains a
random 1% of the full weights).

Everything downstream (recorder, store, selectors, masks, gradient hooks) sees a space only as ``(module name,
trainable 2-D parameter)`` pairs from :func:`space_parameters`, so it works on either unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gradlens.config import SPACES
from gradlens.dtensors import is_sharded
from gradlens.errors import GradlensError
from gradlens.lora import lora_config, require_lora
from gradlens.models import unwrap

WEIGHT = "weight"
LORA_B = "lora_b"
WHAT = {LORA_B: "LoRA-B", WEIGHT: "base-weight"}


def is_peft(model: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in unwrap(model).modules())


def weight_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """``(module name, weight)`` of every linear layer whose weight trains (the output head excluded), in model
    order: the weight space of a model prepared by :func:`attach_weight_space`."""
    from transformers.pytorch_utils import Conv1D

    model = unwrap(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(name, m.weight) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear | Conv1D) and m is not head and m.weight.requires_grad]


def space_parameters(model: torch.nn.Module, space: str, where: str = "model") -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable 2-D parameters of ``space``, by module name, or a one-line error when the model has none."""
    if space not in SPACES:
        raise GradlensError(f"{where}: space {space!r} is not one of {', '.join(SPACES)}")
    if space == LORA_B:
        return require_lora(model, where)
    if is_peft(model):
        raise GradlensError(f"{where} carries a PEFT adapter, but space 'weight' trains the base weights without one")
    found = weight_parameters(model)
    if not found:
        raise GradlensError(f"{where}: no linear weight requires grad, so space 'weight' has nothing to train; "
                            "prepare the model with attach_weight_space()")
    if any(is_sharded(p) for _, p in found):
        raise GradlensError(f"{where}: space 'weight' is not supported under FSDP2 (its base weights are sharded and "
                            "only LoRA-B blocks are gathered); use space lora_b, or DDP for space weight")
    return found


def attach_weight_space(model: torch.nn.Module, target_modules: Sequence[str] | None = None) -> torch.nn.Module:
    """Make exactly the weights of the target linear layers trainable (everything else, biases too, frozen).

    ``target_modules`` is read as for a LoRA adapter (:func:`gradlens.lora.lora_config`: last name components,
    default every linear projection but the output head), so ``--lora_target_modules`` chooses the same modules in
    both spaces.
    """
    targets = set(lora_config(model, target_modules=target_modules).target_modules)
    chosen = {id(m.weight) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    return model
