"""FSDP2's ``DTensor`` parameters seen from one process: whether a tensor is one, which block of it this process
holds (shape and offset in the full tensor), and how many processes hold each entry. Used by the recorder to gather
gradients and by sparse-B training to slice a mask to the local block."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradlens.errors import GradlensError


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (an FSDP2 parameter or gradient)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's block of ``t``: its local tensor for a ``DTensor``, ``t`` itself otherwise."""
    return t.to_local() if is_sharded(t) else t


def local_block(t: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local shape, global offset) of this process's block of the ``DTensor`` ``t``.

    Follows DTensor's own split (``torch.chunk`` along the sharded dimension, per mesh dimension in order);
    placements other than ``Shard``/``Replicate`` (strided shards of FSDP2 + tensor parallelism, partial sums) are
    refused, and the result is checked against the local tensor's real shape.
    """
    from torch.distributed.tensor import Replicate, Shard

    shape, offset = list(t.shape), [0] * t.ndim
    coordinate = t.device_mesh.get_coordinate()
    if coordinate is None:  # this process is not in the tensor's mesh: it holds nothing
        return tuple(0 for _ in shape), tuple(offset)
    for mesh_dim, placement in enumerate(t.placements):
        if type(placement) is Replicate:
            continue
        if type(placement) is not Shard:
            raise GradlensError(f"a LoRA-B weight is a DTensor placed as {t.placements}; gradlens records FSDP2's "
                                "Shard/Replicate placements only (no tensor parallelism)")
        d, parts, c = placement.dim, t.device_mesh.size(mesh_dim), coordinate[mesh_dim]
        chunk = -(-shape[d] // parts)
        start = min(c * chunk, shape[d])
        offset[d] += start
        shape[d] = min(chunk, shape[d] - start)
    local = tuple(t.to_local().shape)
    if local != tuple(shape):
        raise GradlensError(f"a LoRA-B DTensor of shape {tuple(t.shape)} placed as {t.placements} holds a local block "
                            f"of shape {local} here, not the {tuple(shape)} DTensor's split gives; cannot rebuild it")
    return tuple(shape), tuple(offset)


def holders(t: torch.Tensor) -> int:
    """How many processes hold each entry of ``t``: for a ``DTensor`` the product of its replicated mesh dimensions,
    for a plain tensor every process."""
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate

    if not is_sharded(t):
        return dist.get_world_size() if dist.is_initialized() else 1
    n = 1
    for mesh_dim, placement in enumerate(t.placements):
        if type(placement) is Replicate:
            n *= t.device_mesh.size(mesh_dim)
    return n


@dataclass(frozen=True)
class Block:
    """One process's block of a tensor: its shape and its offset in the full tensor."""

    shape: tuple[int, ...]
    offset: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def index(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + s) for o, s in zip(self.offset, self.shape, strict=True))


def block_of(t: torch.Tensor) -> Block:
    """This process's :class:`Block` of ``t``: all of it for a plain tensor."""
    if not is_sharded(t):
        return Block(tuple(t.shape), (0,) * t.ndim)
    return Block(*local_block(t))


def sum_over_processes(values: list[torch.Tensor], tensors: list[torch.Tensor]) -> float:
    """The sum of ``values`` (one per tensor, each taken over this process's block of it) over every process: each
    divided by how many processes hold that block (:func:`holders`), then all-reduced. Every process must call it."""
    import torch.distributed as dist

    device = values[0].device if values else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for v, t in zip(values, tensors, strict=True):
        total += v.to(device, torch.float64) / holders(t)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return float(total)
