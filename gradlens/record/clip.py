"""The pre-clip gradient norm, read from the Trainer's own clipping rather than recomputed.

The Trainer clips through ``accelerator.clip_grad_norm_`` (with ``max_norm=inf`` when ``max_grad_norm`` is 0, for
the logged norm), which unscales fp16 AMP gradients first and returns the global norm over every trainable gradient
of every process. :class:`ClipWatch` wraps that method on the Trainer's accelerator for the run and keeps what it
returned, so the recorder needs no gradient hooks, no local copy and no collective of its own: the clip coefficient
is the factor ``torch.nn.utils.clip_grad_norm_`` applied, computed from that norm the way it computes it.
"""

from __future__ import annotations

from typing import Any

import torch

from gradlens.dtensors import is_sharded

CLIP_EPS = 1e-6  # the eps of torch.nn.utils.clip_grad_norm_: the factor is max_norm / (norm + eps), at most 1


class ClipWatch:
    """Keeps the norm and factor of the last ``clip_grad_norm_`` call of an accelerator, while installed."""

    def __init__(self) -> None:
        self._accelerator: Any = None
        self._seen: tuple[torch.Tensor, torch.Tensor] | None = None

    def install(self, trainer: Any) -> bool:
        """Wrap ``trainer.accelerator.clip_grad_norm_``; False if the trainer has none to wrap."""
        accelerator = getattr(trainer, "accelerator", None)
        original = getattr(accelerator, "clip_grad_norm_", None)
        if original is None:
            return False

        def clip_grad_norm_(parameters: Any, max_norm: float, *args: Any, **kwargs: Any) -> Any:
            norm = original(parameters, max_norm, *args, **kwargs)
            if isinstance(norm, torch.Tensor):  # None where accelerate clips elsewhere (DeepSpeed)
                norm = norm.detach()
                if is_sharded(norm):  # FSDP2: clip_grad_norm_ of DTensors gives a DTensor; every process is here
                    norm = norm.full_tensor()
                factor = (float(max_norm) / (norm + CLIP_EPS)).clamp(max=1.0)  # as clip_grad_norm_, same dtype
                self._seen = (norm, factor)
            return norm

        accelerator.clip_grad_norm_ = clip_grad_norm_
        self._accelerator = accelerator
        return True

    def remove(self) -> None:
        """Give the accelerator its own method back."""
        accelerator, self._accelerator = self._accelerator, None
        if accelerator is not None and "clip_grad_norm_" in vars(accelerator):
            del accelerator.clip_grad_norm_

    def take(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(pre-clip global norm, the factor the gradients were multiplied by) of the clipping since the last call,
        both 0-dim tensors on the gradients' device; None if there was none."""
        seen, self._seen = self._seen, None
        return seen


def clip_statistics(max_norm: float | None, clipped: tuple[float, float] | None, b_sq: float,
                    others_sq: float = 0.0) -> tuple[float | None, float | None, float | None, float | None]:
    """(clip coefficient, pre-clip global norm, post-clip global norm, pre-clip B norm) of one step.

    ``clipped``: (pre-clip global norm, factor) from :class:`ClipWatch`, or None if the step's clipping was not seen;
    ``b_sq``: squared norm of the recorded gradients as the optimizer gets them, ``others_sq`` of every other
    trainable gradient (used only without ``clipped``). Without a seen clipping and with ``max_norm`` set, the factor
    is unknown: the coefficient and the pre-clip norms are None.
    """
    if clipped is not None:
        norm, factor = clipped
        b_pre = b_sq**0.5 / factor if factor > 0 else float("nan")
        return factor, norm, norm * factor, b_pre
    post = (b_sq + others_sq) ** 0.5
    if max_norm is None or max_norm <= 0:
        return 1.0, post, post, b_sq**0.5
    return None, None, post, None
