"""What the recorder's processes agree on under DDP: the step loss, and whether any of them failed.

Only the main process writes, so only it can fail in the writer; if it raised alone, the others would wait in the
next collective until the backend's timeout (30 minutes by default). So a failure on any process is kept and raised
only where every process raises together: the agreement each recorded step and at train end.
"""

from __future__ import annotations

import torch

from gradlens.errors import GradlensError

ELSEWHERE = "the gradient recorder failed on the main process; see its error"


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def uses_nccl(backend: str) -> bool:
    """Whether a process group's backend string includes NCCL: ``"nccl"``, or a multi-backend string such as
    ``"cuda:nccl,cpu:gloo"`` (what ``get_backend`` returns for a group made with one)."""
    return any(part.rsplit(":", 1)[-1] == "nccl" for part in backend.split(","))


def collective_device() -> torch.device:
    """Where the recorder's small collectives run: the current GPU when the default group's backend includes NCCL
    (then a CPU tensor would go through gloo, or fail), else the CPU."""
    if uses_nccl(str(torch.distributed.get_backend())):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(error: BaseException | None, values: torch.Tensor | None = None) -> torch.Tensor | None:
    """One all-reduce (sum) of whether this process failed, together with ``values`` (float64, summed over the
    processes and returned on their device). If any process failed, every process raises: ``error`` where it
    happened (an ``OSError`` as a one-line GradlensError), a GradlensError saying so elsewhere."""
    if distributed():
        device = collective_device()
        flag = torch.tensor([0.0 if error is None else 1.0], dtype=torch.float64, device=device)
        packed = flag if values is None else torch.cat([flag, values.to(device, torch.float64).reshape(-1)])
        torch.distributed.all_reduce(packed)
        if error is None and packed[0].item():
            raise GradlensError(ELSEWHERE)
        if values is not None:
            values = packed[1:].view_as(values).to(values.device)
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        raise GradlensError(f"gradient recorder: {where}{error.strerror or error}") from error
    if error is not None:
        raise error
    return values
