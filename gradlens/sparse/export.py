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
from gradlens.sparse.masks import REQUIRED_METADATA, SET_BY_SAVE, save_mask

MASK_FILE = "gradlens_mask.safetensors"


def export_adapter(model: torch.nn.Module, out_dir: str | os.PathLike[str], mask: Mapping[str, np.ndarray],
                   metadata: Mapping[str, Any] | None = None) -> Path:
    """Save a trained sparse adapter as a standard PEFT adapter directory, with the mask in :data:`MASK_FILE`.

    The masked-out entries must be exactly 0 (an error otherwise): then the plain LoRA adapter ``B @ A`` is exactly
    the sparse one, and ``PeftModel.from_pretrained`` / ``merge_and_unload`` reproduce the model. Only the active
    adapter is saved (not GRPO's ``ref``); PEFT puts a non-``default`` adapter in ``out_dir/<name>``, and that
    directory is returned. ``metadata`` is the mask's provenance (:data:`~gradlens.sparse.masks.REQUIRED_METADATA`,
    e.g. as :func:`~gradlens.sparse.masks.load_mask` returned it); keys it lacks are stored as null (unknown).
    """
    from peft import PeftModel

    out = Path(out_dir)
    model = unwrap(model)
    if not isinstance(model, PeftModel):
        raise GradlensError(f"{out}: cannot export a {type(model).__name__}; export_adapter needs a PEFT PeftModel")
    for name, p, keep in fit_mask(model, mask, str(out)):
        stray = int(torch.count_nonzero(p.detach()[~keep]))
        if stray:
            raise GradlensError(f"{out}: lora_B of {name} has {stray} non-zero entries outside the mask; train with "
                                "SparseBCallback or call SparseB.enforce() first")
    adapter = model.active_adapter
    model.save_pretrained(out, selected_adapters=[adapter])
    adapter_dir = out if adapter == "default" else out / adapter
    provenance = {key: None for key in REQUIRED_METADATA}
    provenance.update({k: v for k, v in (metadata or {}).items() if k not in SET_BY_SAVE})
    save_mask(adapter_dir / MASK_FILE, mask, provenance)
    return adapter_dir
