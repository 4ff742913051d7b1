"""A sparse-B mask in PEFT's SHiRA (sparse high-rank adapter) convention, for a comparison at the same support."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from gradlens.errors import GradlensError
from gradlens.models import unwrap
from gradlens.sparse.hooks import fit_mask


def shira_mask_fn(mask: Mapping[str, np.ndarray], model: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """A PEFT SHiRA ``mask_fn(base_layer, r, **kwargs)`` with the support of the sparse-B adapter ``mask`` describes.

    The sparse-B update of a module is ``Delta W = (B * M) @ A`` (``A`` frozen): row ``i`` can change only if
    ``M[i, :]`` selects some entry, and then its column ``j`` changes by at most ``max|B| * s[i, j]`` with
    ``s[i, j] = sum over selected c of |A[c, j]|``. The SHiRA mask therefore takes, among the entries of those rows,
    the ``r * (d_out + d_in)`` with the largest ``s`` (SHiRA's count for rank ``r``, which PEFT requires exactly).
    If the selected rows hold fewer entries than that, no honest SHiRA mask of rank ``r`` exists and the function
    raises (naming the largest ``r`` that fits) instead of spreading entries into rows the adapter cannot change.

    ``model`` is the LoRA model the mask belongs to; its ``A`` is read now. SHiRA must be built on the same module
    objects (e.g. ``get_peft_model(lora_model.unload(), config)``): base layers are recognised by identity, and a
    target the mask does not cover is an error. Usage: ``config = ShiraConfig(r=..., target_modules=[...])``,
    ``config.mask_fn = shira_mask_fn(mask, lora_model)``.
    """
    from peft.tuners.lora import LoraLayer

    model = unwrap(model)
    owner = {id(layer.lora_B[a].weight): (layer, a) for layer in model.modules() if isinstance(layer, LoraLayer)
             for a in layer.lora_B}
    # Keyed by the base layer itself (nn.Module hashes by identity), which also keeps it alive, so no id is reused.
    plan: dict[torch.nn.Module, tuple[str, torch.Tensor, int]] = {}
    for name, p, keep in fit_mask(model, mask, "shira_mask_fn"):
        layer, adapter = owner[id(p)]
        a = layer.lora_A[adapter].weight.detach().abs().float()
        scores = keep.float() @ a.to(keep.device)
        rows = keep.any(dim=1)
        scores[~rows] = -torch.inf  # never chosen: the sparse-B update cannot change these rows
        plan[layer.get_base_layer()] = (name, scores, int(rows.sum()))

    def mask_fn(base_layer: torch.nn.Module, r: int, **kwargs: Any) -> torch.Tensor:
        if base_layer not in plan:
            raise GradlensError(f"shira_mask_fn: SHiRA target {base_layer} is not the base layer of a module the mask "
                                "covers (build SHiRA on the LoRA model's unloaded base, targeting those modules)")
        name, scores, rows = plan[base_layer]
        d_out, d_in = scores.shape
        n = r * (d_out + d_in)
        if n > rows * d_in:
            raise GradlensError(f"shira_mask_fn: SHiRA r={r} needs {n} entries of {name}, but its sparse-B update "
                                f"only reaches {rows} rows x {d_in} = {rows * d_in}; use r <= "
                                f"{rows * d_in // (d_out + d_in)}")
        weight = base_layer.weight
        chosen = torch.argsort(scores.flatten(), descending=True, stable=True)[:n].to(weight.device)
        out = torch.zeros(d_out * d_in, dtype=weight.dtype, device=weight.device)
        out[chosen] = 1
        return out.view(d_out, d_in)

    return mask_fn
