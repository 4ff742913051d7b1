"""DeepSpeed ZeRO-1/2/3: each recorded LoRA-B gradient read whole, before DeepSpeed clips, applies and zeroes it.

Under accelerate, DeepSpeed's ``engine.step()`` runs inside ``accelerator.backward()`` at the accumulation boundary,
so by the Trainer's ``on_pre_optimizer_step`` the gradients have been reduced, clipped, applied and zeroed (and
``accelerator.clip_grad_norm_`` returns None). :class:`ZeroRead` wraps the engine's ``step`` for the run instead: at a
recorded boundary, before the step, every process reads each recorded gradient whole with DeepSpeed's public
``deepspeed.utils.safe_get_full_grad``: a collective over the data-parallel group (under ZeRO-1/2 an all-reduce of the
parameter's slices of the partitioned, averaged gradient; under ZeRO-3 an all-gather of its partitions), so every
process calls it, one parameter at a time. After the step, the global norm DeepSpeed computed and its
``gradient_clipping`` give the factor DeepSpeed multiplied the gradients by, computed as DeepSpeed computes it; the
recorded gradient is the one read times that factor, what the optimizer used, as under DDP.

fp16 (loss-scaled gradients), bf16 and offload are refused: not tested.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from gradlens.errors import GradlensError

DS_CLIP_EPS = 1e-6  # DeepSpeed's unscale_and_clip_grads: the gradients are divided by max(1, (norm + eps) / clip)
ZERO_WAY = "record under ZeRO-1/2/3 without offload in fp32, or FSDP2, see docs/distributed.md"


class ZeroRead:
    """Wraps a DeepSpeed engine's ``step`` to read the recorded gradients whole at the steps ``wanted()`` says.

    ``main``: whether this process keeps what it read (the others take part in the collectives and drop it).
    """

    def __init__(self, engine: Any, params: Sequence[torch.nn.Parameter], wanted: Callable[[], bool],
                 main: bool) -> None:
        self.engine = engine
        self.params = list(params)
        self.wanted = wanted
        self.main = main
        self.name = f"DeepSpeed ZeRO-{engine.zero_optimization_stage()}"
        self._seen: tuple[list[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None

    def install(self) -> None:
        """Wrap ``engine.step`` (on this engine only) until :meth:`remove`."""
        from deepspeed.utils import safe_get_full_grad

        original = self.engine.step

        def step(*args: Any, **kwargs: Any) -> Any:
            if not (self.engine.is_gradient_accumulation_boundary() and self.wanted()):
                return original(*args, **kwargs)
            if any(p.grad is not None for p in self.params):  # ZeRO moved them to its partitions in backward
                raise GradlensError(f"{self.name}: a LoRA-B parameter still holds a local .grad at the step, so "
                                    f"safe_get_full_grad would not give the averaged gradient; {ZERO_WAY}")
            grads = [safe_get_full_grad(p) for p in self.params]  # collectives: every process reads
            out = original(*args, **kwargs)
            clipped = self.clip_factor()
            if self.main:
                self._seen = ([g.detach().mul(clipped[1]) for g in grads], clipped)
            return out

        self.engine.step = step

    def remove(self) -> None:
        """Give the engine its own ``step`` back."""
        if "step" in vars(self.engine):
            del self.engine.step

    def clip_factor(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the global pre-clip norm DeepSpeed computed at its last step, the factor it multiplied the gradients by),
        float32 0-dim tensors; the factor is computed as DeepSpeed's ``unscale_and_clip_grads`` computes it."""
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            raise GradlensError(f"{self.name} computed no gradient norm (compute_grad_norm off), so the clip "
                                f"coefficient is unknown; {ZERO_WAY}")
        norm = torch.as_tensor(norm, dtype=torch.float32).detach().reshape(())
        clip = float(self.engine.gradient_clipping() or 0.0)
        if clip <= 0.0:
            return norm, torch.ones((), dtype=torch.float32, device=norm.device)
        return norm, 1.0 / torch.clamp((norm + DS_CLIP_EPS) / clip, min=1.0)

    def take(self) -> tuple[list[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
        """(the full gradients as the optimizer used them, (pre-clip global norm, clip factor)) read at the last
        recorded step since the previous call, on the main process; None elsewhere or if none was read."""
        seen, self._seen = self._seen, None
        return seen


def full_shape(param: torch.nn.Parameter) -> tuple[int, ...]:
    """A parameter's whole shape: ZeRO-3 leaves an empty ``param`` and keeps the shape in ``ds_shape``."""
    return tuple(getattr(param, "ds_shape", param.shape))


def zero_read(trainer: Any, params: Sequence[torch.nn.Parameter], wanted: Callable[[], bool], main: bool) -> ZeroRead:
    """A :class:`ZeroRead` on the Trainer's DeepSpeed engine, or a one-line refusal of what it cannot read whole."""
    engine = getattr(trainer, "deepspeed", None) or getattr(trainer, "model_wrapped", None)
    if engine is None or not hasattr(engine, "zero_optimization_stage"):
        raise GradlensError("DeepSpeed is on but the recorder found no DeepSpeed engine on the Trainer at train begin "
                            "(attach it with GradientRecorder.attach(trainer, ...)); " + ZERO_WAY)
    stage = engine.zero_optimization_stage()
    if stage not in (1, 2, 3):  # 0: DeepSpeed without ZeRO keeps each process's gradient in param.grad
        raise GradlensError(f"DeepSpeed without ZeRO (zero_stage: {stage}) is not recorded; {ZERO_WAY}")
    offload = getattr(engine.zero_offload_param(), "device", "none")
    if engine.zero_use_cpu_optimizer() or offload != "none":  # to the CPU or NVMe: not tested
        raise GradlensError(f"DeepSpeed ZeRO-{stage} with offload is not recorded; {ZERO_WAY}")
    if engine.fp16_enabled() or engine.bfloat16_enabled():
        precision = "fp16" if engine.fp16_enabled() else "bf16"
        raise GradlensError(f"DeepSpeed ZeRO-{stage} with {precision} is not recorded (tested in fp32 only); "
                            + ZERO_WAY)
    return ZeroRead(engine, params, wanted, main)
