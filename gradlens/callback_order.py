"""Where gradlens's callbacks sit among a Trainer's: first, in a written order, added through the public API only.

The order, which :func:`gradlens.training.run.run_training` follows and each ``attach`` classmethod keeps:

1. :class:`~gradlens.drift.DriftGuard`: its train-end report must be final before the recorder writes the manifest;
2. :class:`~gradlens.sparse.callback.SparseBCallback`: every later callback sees the sparse model at train begin and
   the re-zeroed weights after each optimizer step;
3. :class:`~gradlens.record.recorder.GradientRecorder`: the scalars it adds in ``on_log`` reach the reporting
   integrations (console, TensorBoard, W&B), which the Trainer added before any user callback;
4. any other gradlens or user callback (accuracy curves);
5. the Trainer's own callbacks, in the order the Trainer gave them.

``Trainer(callbacks=[...])`` and ``add_callback`` append after the reporting integrations, so a callback that must run
before them is put first by popping the Trainer's callbacks and adding them back after it (``pop_callback`` and
``add_callback``, both public): no code edits ``callback_handler.callbacks``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def add_first(trainer: Any, callbacks: Sequence[Any]) -> None:
    """Put ``callbacks`` (instances, in this order) ahead of every callback ``trainer`` already has."""
    existing = list(trainer.callback_handler.callbacks)
    for callback in existing:
        trainer.pop_callback(callback)
    for callback in [*callbacks, *existing]:
        trainer.add_callback(callback)
