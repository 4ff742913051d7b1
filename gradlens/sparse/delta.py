"""What a weight-space run trained, written without the model: ``sparse_delta.safetensors`` (per module, trained
minus base, exactly 0 outside the mask) and, where the mask has SHiRA's per-module count, a PEFT SHiRA adapter that
``PeftModel.from_pretrained`` loads onto the base model."""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradlens.errors import GradlensError
from gradlens.fsio import atomic_write, safetensors_metadata
from gradlens.models import unwrap

DELTA_FILE = "sparse_delta.safetensors"


def weight_delta(params: Mapping[str, torch.Tensor], anchors: Mapping[str, torch.Tensor],
                 mask: Mapping[str, np.ndarray] | None, where: str) -> dict[str, torch.Tensor]:
    """Per module (every module of ``mask``, else every trained one): trained minus base, float32 on the CPU.

    An entry outside the mask that moved is an error (the sparse training did not hold), never written silently.
    """
    delta = {}
    for name in (mask if mask is not None else params):
        d = params[name].detach().float().cpu() - anchors[name].float().cpu()
        if mask is not None:
            stray = int(torch.count_nonzero(d[~torch.from_numpy(np.asarray(mask[name], bool))]))
            if stray:
                raise GradlensError(f"{where}: {name} moved at {stray} entries outside the mask")
        delta[name] = d.contiguous()
    return delta


def save_delta(path: str | os.PathLike[str], delta: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> Path:
    """Write the delta atomically as safetensors, ``metadata`` JSON-encoded in its string metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = safetensors_metadata(metadata, path, "sparse delta")
    atomic_write(path, lambda tmp: save_file(dict(delta), tmp, metadata=meta))
    return path


def shira_rank(mask: Mapping[str, np.ndarray], r: int) -> int | None:
    """``r`` when every module's count is SHiRA's ``r * (d_out + d_in)``, else None (no SHiRA adapter of rank r)."""
    ok = all(int(np.count_nonzero(m)) == r * (m.shape[0] + m.shape[1]) for m in mask.values())
    return r if ok and mask else None


def export_shira(model: torch.nn.Module, anchors: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor],
                 mask: Mapping[str, np.ndarray], r: int, out_dir: str | os.PathLike[str]) -> Path:
    """Save a PEFT SHiRA adapter of rank ``r`` (``mask_type="custom"``) whose support is ``mask`` and whose values
    are ``delta`` on it, built on a copy of ``model`` with its base weights (``anchors``) restored.

    SHiRA stores its indices with the adapter, so ``PeftModel.from_pretrained(base, out_dir)`` needs no mask_fn.
    """
    from peft import ShiraConfig, get_peft_model
    from peft.tuners.shira import ShiraLayer

    if shira_rank(mask, r) is None:
        raise GradlensError(f"{out_dir}: a SHiRA adapter of rank {r} needs r * (d_out + d_in) entries in every module")
    base = copy.deepcopy(unwrap(model))
    layers = dict(base.named_modules())
    with torch.no_grad():
        for name, anchor in anchors.items():
            layers[name].weight.copy_(anchor)
    support = {layers[name]: torch.from_numpy(np.asarray(m, np.float32)) for name, m in mask.items()}

    def mask_fn(base_layer: torch.nn.Module, r: int, **kwargs: Any) -> torch.Tensor:
        return support[base_layer].to(base_layer.weight.device, base_layer.weight.dtype)

    with warnings.catch_warnings():  # PEFT warns that "custom" is no built-in mask type: the mask_fn below is ours
        warnings.simplefilter("ignore", UserWarning)
        config = ShiraConfig(r=r, target_modules=list(mask), mask_type="custom")
    config.mask_fn = mask_fn
    shira = get_peft_model(base, config)
    with torch.no_grad():
        for name, layer in shira.named_modules():
            if isinstance(layer, ShiraLayer):
                key = name.removeprefix("base_model.model.")
                values = delta[key][torch.from_numpy(np.asarray(mask[key], bool))]  # row-major, as SHiRA's indices
                layer.shira_weight["default"].copy_(values.to(layer.shira_weight["default"].dtype))
    out = Path(out_dir)
    shira.save_pretrained(out)
    return out


def moved_entries(params: Mapping[str, torch.Tensor], anchors: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(entries that moved from the base, all entries) of the trained base weights."""
    moved = sum(int(torch.count_nonzero(params[n].detach() != anchors[n].to(params[n].device))) for n in anchors)
    return moved, sum(a.numel() for a in anchors.values())


def save_weight_space(model: torch.nn.Module, anchors: Mapping[str, torch.Tensor],
                      mask: Mapping[str, np.ndarray] | None, metadata: Mapping[str, Any], out: Path,
                      adapter_dir: Path, r: int) -> Path:
    """Write ``out/``:data:`DELTA_FILE` and, where every module of ``mask`` holds ``r * (d_out + d_in)`` entries, a
    SHiRA adapter in ``adapter_dir``; the delta's metadata says whether, and why not. Returns the delta file."""
    from gradlens.sparse.space import weight_parameters

    params = dict(weight_parameters(model))
    delta = weight_delta(params, anchors, mask, str(out / DELTA_FILE))
    rank = shira_rank(mask, r) if mask is not None else None
    shira = str(export_shira(model, anchors, delta, mask, r, adapter_dir)) if rank is not None else None
    why = None if shira else ("no mask: dense fine-tuning of the chosen weights" if mask is None else
                              f"not every module holds r * (d_out + d_in) entries for r={r}")
    k = None if mask is None else sum(int(np.count_nonzero(m)) for m in mask.values())
    return save_delta(out / DELTA_FILE, delta, {**metadata, "space": "weight", "k": k, "shira_adapter": shira,
                                                "shira_rank": rank, "shira_not_exported": why})
