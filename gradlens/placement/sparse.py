"""Sparse-B training and export: with A frozen (LoRA-FA), only the entries of B that a placement mask selects train.

The mask acts on the gradient, not on the optimizer: :func:`apply_mask` registers a tensor hook on every ``lora_B``
weight, which autograd runs on each micro-batch's gradient *before* it is accumulated into ``.grad``. Everything that
reads ``.grad`` afterwards therefore sees only the trainable entries: gradient accumulation, the DDP all-reduce, the
Trainer's gradient clipping (so the clip norm is the norm of the masked gradient), the recorder, the optimizer.
:class:`SparseBCallback` also re-zeroes the masked entries after every optimizer step, so they stay exactly 0 whatever
the optimizer does (weight decay, momentum carried over from earlier training, noise).

Because the masked entries are exact zeros, the trained adapter *is* an ordinary LoRA adapter: :func:`export_adapter`
saves it with PEFT's ``save_pretrained`` and puts the mask next to it. :func:`shira_mask_fn` maps the mask to PEFT's
SHiRA (sparse high-rank adapter) convention, for a comparison at the same support.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from gradlens.errors import GradlensError
from gradlens.models import lora_b_parameters, unwrap
from gradlens.placement.masks import REQUIRED_METADATA, SET_BY_SAVE, check_mask_fits, save_mask

MASK_FILE = "gradlens_mask.safetensors"


def _fit(model: torch.nn.Module, mask: Mapping[str, np.ndarray], where: str
         ) -> list[tuple[str, torch.nn.Parameter, torch.Tensor]]:
    """``(name, lora_B weight, bool mask on its device)`` of every LoRA module, after checking the mask fits them."""
    params = list(lora_b_parameters(model))
    if not params:
        raise GradlensError(f"{where}: model has no PEFT LoRA adapter (no LoraLayer found); attach one with "
                            "attach_lora()")
    check_mask_fits(mask, {name: tuple(p.shape) for name, p in params}, where)
    fitted = []
    for name, p in params:
        m = np.asarray(mask[name])
        if m.dtype != np.bool_:
            raise GradlensError(f"{where}: mask of module {name} is {m.dtype}, not bool")
        fitted.append((name, p, torch.from_numpy(m.copy()).to(p.device)))
    return fitted


class SparseB:
    """Handle on a mask applied to a model's ``lora_B`` weights (see :func:`apply_mask`).

    ``params`` and ``masks`` are keyed by module name; a mask is a bool tensor on its parameter's device, ``True``
    where the entry trains.
    """

    def __init__(self, fitted: list[tuple[str, torch.nn.Parameter, torch.Tensor]]) -> None:
        self.params: dict[str, torch.nn.Parameter] = {name: p for name, p, _ in fitted}
        self.masks: dict[str, torch.Tensor] = {name: keep for name, _, keep in fitted}
        # masked_fill rather than multiplying by the mask: exact zeros even where a gradient is inf or NaN.
        self._frozen = {name: ~keep for name, keep in self.masks.items()}
        self.enforce()
        self._hooks = [p.register_hook(self._gradient_hook(self._frozen[name])) for name, p in self.params.items()]

    @staticmethod
    def _gradient_hook(frozen: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(grad: torch.Tensor) -> torch.Tensor:
            return grad.masked_fill(frozen, 0)

        return hook

    def enforce(self) -> None:
        """Set every masked-out entry to exactly 0 (after an optimizer step, or when the mask is applied)."""
        with torch.no_grad():
            for name, p in self.params.items():
                p.masked_fill_(self._frozen[name], 0)

    def remove(self) -> None:
        """Remove the gradient hooks: the whole of B trains again. Safe to call twice."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


def apply_mask(model: torch.nn.Module, mask: Mapping[str, np.ndarray]) -> SparseB:
    """Train only the selected entries of the active adapter's ``lora_B`` weights from now on.

    ``mask`` maps every LoRA module name (as :func:`gradlens.models.lora_b_parameters` yields them) to a bool
    ``(d_out, r)`` array; a missing or extra module, a wrong shape or dtype is an error. The masked-out entries are
    set to 0: on a fresh LoRA-FA adapter B is all zeros, so this changes nothing, and on a trained one it makes the
    model the sparse adapter the mask describes. Other adapters (e.g. GRPO's frozen ``ref``) are left alone.
    """
    fitted = _fit(unwrap(model), mask, "apply_mask")
    frozen = [name for name, p, _ in fitted if not p.requires_grad]
    if frozen:
        raise GradlensError(f"apply_mask: lora_B of {frozen[0]} does not require grad; attach the adapter with "
                            "attach_lora()")
    return SparseB(fitted)


class SparseBCallback(TrainerCallback):
    """Sparse-B training in any (TRL) Trainer: applies ``mask`` at train begin, keeps masked entries 0, cleans up.

    The hooks mask each micro-batch's gradient inside ``backward``, so where this callback sits among the others does
    not change what the Trainer clips or what a :class:`~gradlens.record.recorder.GradientRecorder` records (it reads
    ``.grad`` at ``on_pre_optimizer_step``, after every backward). If ``train`` raises, the hooks stay on the model
    (they still only mask); call ``sparse.remove()`` to lift them.
    """

    def __init__(self, mask: Mapping[str, np.ndarray]) -> None:
        self.mask = mask
        self.sparse: SparseB | None = None

    @classmethod
    def attach(cls, trainer: Any, mask: Mapping[str, np.ndarray]) -> SparseBCallback:
        """Create the callback and add it *first*, so any other callback already sees the sparse model at train
        begin and the re-zeroed weights after each optimizer step."""
        callback = cls(mask)
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.sparse is not None:  # a second train() call
            self.sparse.remove()
        self.sparse = apply_mask(model, self.mask)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.sparse.enforce()

    def on_train_end(self, args, state, control, **kwargs):
        self.sparse.remove()


def export_adapter(model: torch.nn.Module, out_dir: str | os.PathLike[str], mask: Mapping[str, np.ndarray],
                   metadata: Mapping[str, Any] | None = None) -> Path:
    """Save a trained sparse adapter as a standard PEFT adapter directory, with the mask in :data:`MASK_FILE`.

    The masked-out entries must be exactly 0 (an error otherwise): then the plain LoRA adapter ``B @ A`` is exactly
    the sparse one, and ``PeftModel.from_pretrained`` / ``merge_and_unload`` reproduce the model. Only the active
    adapter is saved (not GRPO's ``ref``); PEFT puts a non-``default`` adapter in ``out_dir/<name>``, and that
    directory is returned. ``metadata`` is the mask's provenance (:data:`~gradlens.placement.masks.REQUIRED_METADATA`,
    e.g. as :func:`~gradlens.placement.masks.load_mask` returned it); keys it lacks are stored as null (unknown).
    """
    from peft import PeftModel

    out = Path(out_dir)
    model = unwrap(model)
    if not isinstance(model, PeftModel):
        raise GradlensError(f"{out}: cannot export a {type(model).__name__}; export_adapter needs a PEFT PeftModel")
    for name, p, keep in _fit(model, mask, str(out)):
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
    for name, p, keep in _fit(model, mask, "shira_mask_fn"):
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
