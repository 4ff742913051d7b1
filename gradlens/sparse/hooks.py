"""Sparse-B training: with A frozen (LoRA-FA), only the entries of B that a placement mask selects train.

The mask acts on the gradient, not on the optimizer: :func:`apply_mask` registers a tensor hook on every ``lora_B``
weight, which autograd runs on each micro-batch's gradient *before* it is accumulated into ``.grad``. Everything that
reads ``.grad`` afterwards therefore sees only the trainable entries: gradient accumulation, the DDP all-reduce, the
Trainer's gradient clipping (so the clip norm is the norm of the masked gradient), the recorder, the optimizer.
:meth:`SparseB.enforce` re-zeroes the masked entries, so they stay exactly 0 whatever the optimizer does.

Under FSDP2 each process holds a block of rows of B (a ``DTensor``) and the module computes with a gathered copy, so a
tensor hook on the sharded weight never runs; the mask is sliced to the process's block instead, and a
post-accumulate-grad hook (which FSDP2 runs after it reduce-scatters each micro-batch's gradient into the block, before
clipping) zeroes the block's masked entries; :meth:`SparseB.enforce` zeroes the block's masked weights.

The same works over the base weights (``space="weight"``, :mod:`gradlens.sparse.space`): there the masked entries are
not 0 but the base model's values, so :class:`SparseB` keeps them (``anchors``) and :meth:`SparseB.enforce` restores
them, exactly, after every optimizer step (AdamW's decoupled weight decay moves an entry whose gradient is 0).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

from gradlens.dtensors import block_of, is_sharded, local
from gradlens.errors import GradlensError
from gradlens.models import unwrap
from gradlens.sparse.masks import check_mask_fits
from gradlens.sparse.space import LORA_B, WEIGHT, space_parameters


def fit_mask(model: torch.nn.Module, mask: Mapping[str, np.ndarray], where: str, space: str = LORA_B
         ) -> list[tuple[str, torch.nn.Parameter, torch.Tensor]]:
    """``(name, parameter, bool mask on its device)`` of every module of ``space`` (LoRA's B, or the base weights),
    after checking the mask fits them; for an FSDP2 weight the mask of this process's block."""
    params = space_parameters(model, space, where)
    check_mask_fits(mask, {name: tuple(p.shape) for name, p in params}, where)
    fitted = []
    for name, p in params:
        m = np.asarray(mask[name])
        if m.dtype != np.bool_:
            raise GradlensError(f"{where}: mask of module {name} is {m.dtype}, not bool")
        fitted.append((name, p, torch.from_numpy(m[block_of(p).index()].copy()).to(p.device)))
    return fitted


class SparseB:
    """Handle on a mask applied to a model's ``lora_B`` weights, or base weights (see :func:`apply_mask`).

    ``params`` and ``masks`` are keyed by module name; a mask is a bool tensor on its parameter's device, ``True``
    where the entry trains. ``anchors``: the values the masked-out entries keep (the base weights); None keeps them 0.
    """

    def __init__(self, fitted: list[tuple[str, torch.nn.Parameter, torch.Tensor]],
                 anchors: Mapping[str, torch.Tensor] | None = None) -> None:
        self.params: dict[str, torch.nn.Parameter] = {name: p for name, p, _ in fitted}
        self.masks: dict[str, torch.Tensor] = {name: keep for name, _, keep in fitted}
        self.anchors = None if anchors is None else {name: anchors[name].to(p.device) for name, p in
                                                     self.params.items()}
        # masked_fill rather than multiplying by the mask: exact zeros even where a gradient is inf or NaN.
        self._frozen = {name: ~keep for name, keep in self.masks.items()}
        self.enforce()
        self._hooks = [p.register_post_accumulate_grad_hook(self._block_hook(self._frozen[name])) if is_sharded(p)
                       else p.register_hook(self._gradient_hook(self._frozen[name]))
                       for name, p in self.params.items()]

    @staticmethod
    def _gradient_hook(frozen: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(grad: torch.Tensor) -> torch.Tensor:
            return grad.masked_fill(frozen, 0)

        return hook

    @staticmethod
    def _block_hook(frozen: torch.Tensor) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            with torch.no_grad():
                param.grad.to_local().masked_fill_(frozen, 0)

        return hook

    def enforce(self) -> None:
        """Set every masked-out entry to exactly 0, or its anchor (after an optimizer step, or when the mask is
        applied)."""
        with torch.no_grad():
            for name, p in self.params.items():
                if self.anchors is None:
                    local(p).masked_fill_(self._frozen[name], 0)
                else:
                    local(p).copy_(torch.where(self._frozen[name], local(self.anchors[name]), local(p)))

    def remove(self) -> None:
        """Remove the gradient hooks: the whole of B trains again. Safe to call twice."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


def apply_mask(model: torch.nn.Module, mask: Mapping[str, np.ndarray], space: str = LORA_B,
               anchors: Mapping[str, torch.Tensor] | None = None) -> SparseB:
    """Train only the selected entries of the active adapter's ``lora_B`` weights (or, ``space="weight"``, of the
    trainable base weights) from now on.

    ``mask`` maps every module name of the space (as :func:`gradlens.lora.lora_b_parameters` or
    :func:`gradlens.sparse.space.weight_parameters` yield them) to a bool array of the parameter's shape; a missing
    or extra module, a wrong shape or dtype is an error. In ``lora_b`` the masked-out entries are set to 0: on a
    fresh LoRA-FA adapter B is all zeros, so this changes nothing, and on a trained one it makes the model the sparse
    adapter the mask describes. Other adapters (e.g. GRPO's frozen ``ref``) are left alone. In ``weight`` they keep
    ``anchors`` (default: their values now, the base model's).
    """
    fitted = fit_mask(unwrap(model), mask, "apply_mask", space)
    frozen = [name for name, p, _ in fitted if not p.requires_grad]
    if frozen:
        raise GradlensError(f"apply_mask: lora_B of {frozen[0]} does not require grad; attach the adapter with "
                            "attach_lora()")
    if space == WEIGHT and anchors is None:
        anchors = {name: p.detach().clone() for name, p, _ in fitted}
    return SparseB(fitted, anchors if space == WEIGHT else None)
