"""FSDP2 blocks of awkward shapes gathered by ``ShardedGather``, against ``DTensor.full_tensor()``; launched on CPU
processes (gloo) by ``tests/test_fsdp.py``.

``fully_shard`` splits rows as ``torch.chunk`` does: 5 rows on 3 processes are 2 + 2 + 1, one row is 1 + 0 + 0
(empty blocks). Each process computes a loss on its own input, backward gives the
reduce-scattered DTensor gradients; rank 0 writes what it gathered (gradients, the weights as a state dict) and what
``full_tensor()`` (every process) gave.

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node N gather_fsdp2.py OUT``
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from gradlens.dtensors import local_block
from gradlens.record.sharded import ShardedGather, gather_lora_state, squares_held_here

SHAPES = [(5, 3), (1, 4), (64, 8), (3, 2)]


class Blocks(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lora_B = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s)) for s in SHAPES])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum((p * x[: p.numel()].view(p.shape)).sin().sum() for p in self.lora_B)


def main() -> None:
    """Join, gather, and leave only once the sharded model (which holds the mesh's process group) is freed: a group
    torn down during interpreter shutdown aborts the process now and then."""
    dist.init_process_group("gloo")
    gather_and_write(Path(sys.argv[1]))
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def gather_and_write(out: Path) -> None:
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = Blocks()
    fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    params = list(model.lora_B)
    torch.manual_seed(1 + rank)  # each process its own input: the gradient is their average
    model(torch.randn(max(p.numel() for p in params))).backward()
    grads = [p.grad for p in params]
    gather = ShardedGather(params, extra=1)
    gathered = gather.gather(grads, [squares_held_here(grads)])
    full = [g.full_tensor() for g in grads]  # a collective: every process
    weights = [p.detach().full_tensor() for p in params]
    state = gather_lora_state(model)
    blocks = [local_block(p) for p in params]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, blocks)
    if rank == 0:
        got, summed = gathered
        torch.save({"gathered": [g.clone() for g in got], "full": full, "squares": summed,
                    "state": state, "weights": weights}, out / "gather.pt")
        (out / "blocks.json").write_text(json.dumps(every))
    else:
        assert gathered is None and state == {}


if __name__ == "__main__":
    main()
