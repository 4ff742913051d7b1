"""FSDP2 (``fully_shard``): where each process's shard of a ``DTensor`` parameter lies, and one gather of every
sharded gradient to the main process.

Under FSDP2 a ``lora_B`` weight and its gradient are ``DTensor``\\ s: each process holds a block of rows
(``Shard(0)``; torch.chunk's split, so uneven sizes give a smaller last block and no padding in ``to_local()``), and
under HSDP the blocks are replicated across a second mesh dimension. :class:`ShardedGather` learns every process's
block (shape and offset) once, at train begin, and then gathers all the recorded gradients of a step in ONE
collective: each process flattens its local blocks into one buffer (padded to the longest process's length), one
``gather`` brings the buffers to the main process, which copies each block into full tensors it reuses every step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gradlens.dtensors import Block, block_of, holders, is_sharded, local
from gradlens.errors import GradlensError


class ShardedGather:
    """Gathers the full gradients of FSDP2 ``DTensor`` parameters to the main process, one collective per step (a
    plain tensor among them is taken as held whole by every process).

    Made on every process at train begin (it exchanges every process's blocks once, a collective). ``extra``: how
    many float scalars each process appends to its buffer (summed over processes by :meth:`gather`).
    """

    def __init__(self, params: Sequence[torch.Tensor], extra: int = 0) -> None:
        import torch.distributed as dist

        self.params = list(params)
        self.shapes = [tuple(p.shape) for p in self.params]
        self.extra = extra
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        mine = [block_of(p) for p in self.params]
        everyone: list[list[Block]] = [mine]
        if self.world > 1:
            everyone = [None] * self.world  # type: ignore[list-item]
            dist.all_gather_object(everyone, mine)
        self.blocks = everyone
        self.length = max(sum(b.numel for b in rank) for rank in self.blocks) + extra
        self._full: list[torch.Tensor] | None = None
        self._received: list[torch.Tensor] | None = None
        self._check_covered()

    def _check_covered(self) -> None:
        """Every entry of every parameter lies in some process's block (else a gathered gradient would be partial)."""
        for i, shape in enumerate(self.shapes):
            seen = torch.zeros(shape, dtype=torch.bool)
            for rank in self.blocks:
                seen[rank[i].index()] = True
            if not bool(seen.all()):
                raise GradlensError(f"the processes' blocks of a LoRA-B DTensor of shape {shape} do not cover it; "
                                    "cannot rebuild the full gradient")

    def gather(self, grads: Sequence[torch.Tensor | None], extra: Sequence[float] | torch.Tensor = ()
               ) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        """On the main process: (full gradients in parameter order, ``extra`` summed over processes); None elsewhere.

        ``grads``: this process's gradients of the parameters (``DTensor``\\ s, or None for no gradient: zeros). Every
        process must call it at the same step; the buffer has the gradients' dtype and device.
        """
        import torch.distributed as dist

        blocks = [None if g is None else local(g) for g in grads]
        ref = next((g for g in blocks if g is not None), local(self.params[0]))
        dtype, device = torch.promote_types(ref.dtype, torch.float32), ref.device
        buffer = torch.zeros(self.length, dtype=dtype, device=device)
        pos = 0
        for g, block in zip(blocks, self.blocks[self.rank], strict=True):
            if g is not None:
                buffer[pos:pos + block.numel].copy_(g.reshape(-1))
            pos += block.numel
        if self.extra:
            tail = torch.stack([torch.as_tensor(e, dtype=dtype) for e in extra])
            buffer[self.length - self.extra:] = tail.to(device)
        if self.world == 1:
            received = [buffer]
        else:
            if self.rank == 0 and self._received is None:
                self._received = [torch.empty_like(buffer) for _ in range(self.world)]
            dist.gather(buffer, self._received if self.rank == 0 else None, dst=0)
            received = self._received
        if self.rank != 0:
            return None
        if self._full is None:
            self._full = [torch.zeros(shape, dtype=dtype, device=device) for shape in self.shapes]
        for rank, flat in zip(self.blocks, received, strict=True):
            pos = 0
            for full, block in zip(self._full, rank, strict=True):
                full[block.index()] = flat[pos:pos + block.numel].view(block.shape)
                pos += block.numel
        summed = torch.stack([flat[self.length - self.extra:] for flat in received]).sum(0)
        return self._full, summed


def squares_held_here(grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """The float64 sum of squares of this process's part of ``grads``, each entry divided by how many processes hold
    it, so that the sum over processes is the global sum of squares (a plain tensor is held by every process)."""
    total = torch.zeros((), dtype=torch.float64)
    for g in grads:
        if g is not None:
            total += local(g).detach().to(torch.float64).square().sum().cpu() / holders(g)
    return total


def gather_lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """FSDP2: the LoRA entries (keys with ``lora_``, as PEFT saves them) of ``model.state_dict()`` as full CPU tensors
    on the main process, an empty dict elsewhere; None when none of them is a ``DTensor`` (nothing to gather).

    Every process must call it; one collective (:class:`ShardedGather`). PEFT's ``save_pretrained(state_dict=...)``
    then writes the whole adapter, readable by ``PeftModel.from_pretrained``.
    """
    state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    if not any(is_sharded(v) for v in state.values()):
        return None
    tensors = [v.detach() for v in state.values()]
    gathered = ShardedGather(tensors).gather(tensors)
    if gathered is None:
        return {}
    return {k: full.to("cpu", v.dtype, copy=True) for (k, v), full in zip(state.items(), gathered[0], strict=True)}
