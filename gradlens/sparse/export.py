"""Export of a trained sparse adapter: because the masked entries are exact zeros, it *is* an ordinary LoRA adapter,
so :func:`export_adapter` saves it with PEFT's ``save_pretrained`` and puts the mask next to it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradlens.errors import GradlensError
from gradlens.models import unwrap
from gradlens.sparse.hooks import fit_mask
from gradlens.sparse.masks import REQUIRED_METADATA, SET_BY_SAVE, check_mask_fits, save_mask

MASK_FILE = "gradlens_mask.safetensors"


def export_adapter(model: torch.nn.Module, out_dir: str | os.PathLike[str], mask: Mapping[str, np.ndarray],
                   metadata: Mapping[str, Any] | None = None, state: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Save a trained sparse adapter as a standard PEFT adapter directory, with the mask in :data:`MASK_FILE`.

    The masked-out entries must be exactly 0 (an error otherwise): then the plain LoRA adapter ``B @ A`` is exactly
    the sparse one, and ``PeftModel.from_pretrained`` / ``merge_and_unload`` reproduce the model. Only the active
    adapter is saved (not GRPO's ``ref``); PEFT puts a non-``default`` adapter in ``out_dir/<name>``, and that
    directory is returned. ``metadata`` is the mask's provenance (:data:`~gradlens.sparse.masks.REQUIRED_METADATA`,
    e.g. as :func:`~gradlens.sparse.masks.load_mask` returned it); keys it lacks are stored as null (unknown).
    ``state``: the model's LoRA tensors by ``state_dict`` key when the model's own are FSDP2 blocks (the full ones,
    gathered); they are checked and saved instead.
    """
    from peft import PeftModel

    out = Path(out_dir)
    model = unwrap(model)
    if not isinstance(model, PeftModel):
        raise GradlensError(f"{out}: cannot export a {type(model).__name__}; export_adapter needs a PEFT PeftModel")
    adapter = model.active_adapter
    if state is None:
        b_weights = [(name, p.detach(), keep) for name, p, keep in fit_mask(model, mask, str(out))]
    else:
        suffix = f".lora_B.{adapter}.weight"
        full = {k.removeprefix("base_model.model.").removesuffix(suffix): v for k, v in state.items()
                if k.endswith(suffix)}
        check_mask_fits(mask, {name: tuple(v.shape) for name, v in full.items()}, str(out))
        b_weights = [(name, v, torch.from_numpy(np.asarray(mask[name], dtype=bool))) for name, v in full.items()]
    for name, b, keep in b_weights:
        stray = int(torch.count_nonzero(b[~keep.to(b.device)]))
        if stray:
            raise GradlensError(f"{out}: lora_B of {name} has {stray} non-zero entries outside the mask; train with "
                                "SparseBCallback or call SparseB.enforce() first")
    model.save_pretrained(out, selected_adapters=[adapter], state_dict=None if state is None else dict(state))
    adapter_dir = out if adapter == "default" else out / adapter
    provenance = {key: None for key in REQUIRED_METADATA}
    provenance.update({k: v for k, v in (metadata or {}).items() if k not in SET_BY_SAVE})
    save_mask(adapter_dir / MASK_FILE, mask, provenance)
    return adapter_dir
