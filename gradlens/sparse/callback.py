"""The Trainer side of sparse-B training: :class:`SparseBCallback` applies a mask at train begin (see
:mod:`gradlens.sparse.hooks`), keeps the masked entries 0 after every optimizer step, and lifts the hooks at the
end."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from transformers import TrainerCallback

from gradlens.callback_order import add_first
from gradlens.engines import refuse_sharded
from gradlens.sparse.hooks import SparseB, apply_mask
from gradlens.sparse.space import LORA_B


class SparseBCallback(TrainerCallback):
    """Sparse-B training in any (TRL) Trainer: applies ``mask`` at train begin, keeps masked entries 0, cleans up.

    The hooks mask each micro-batch's gradient inside ``backward``, so where this callback sits among the others does
    not change what the Trainer clips or what a :class:`~gradlens.record.recorder.GradientRecorder` records (it reads
    ``.grad`` at ``on_pre_optimizer_step``, after every backward). If ``train`` raises, the hooks stay on the model
    (they still only mask); call ``sparse.remove()`` to lift them.
    """

    def __init__(self, mask: Mapping[str, np.ndarray], space: str = LORA_B,
                 anchors: Mapping[str, Any] | None = None) -> None:
        self.mask = mask
        self.space = space
        self.anchors = anchors  # space "weight": the values the masked-out entries keep (default: at train begin)
        self.sparse: SparseB | None = None

    @classmethod
    def attach(cls, trainer: Any, mask: Mapping[str, np.ndarray]) -> SparseBCallback:
        """Create the callback and add it *first*, so any other callback already sees the sparse model at train
        begin and the re-zeroed weights after each optimizer step."""
        callback = cls(mask)
        add_first(trainer, [callback])
        return callback

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        trainable = [p for p in model.parameters() if p.requires_grad]
        refuse_sharded("a sparse-B mask cannot be kept on it", args, None, trainable)
        if self.sparse is not None:  # a second train() call
            self.sparse.remove()
        self.sparse = apply_mask(model, self.mask, self.space, self.anchors)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.sparse.enforce()

    def on_train_end(self, args, state, control, **kwargs):
        self.sparse.remove()
