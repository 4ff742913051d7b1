"""The per-step update of the streaming statistics, in torch, on the device that holds the gradients.

One step adds its float32 gradient into per-entry float64 sums (g, g^2, |g|) and integer counts (positive and
non-zero steps, which give the sign sum) and appends the per-module squared norm and dot product with the previous
step. On a GPU the sums stay
in device memory and cost microseconds a step; only a commit copies them to the host. Float64 is used throughout:
it is cheap wherever these memory-bound passes run, and it makes the sums exact to float64 rounding after any number
of steps (the float32 inputs are exact in float64, so each elementwise sum has one rounding per step).

:class:`DeviceStats` holds the steps of one commit, summed from zero; :meth:`DeviceStats.host` turns them into the
numpy :class:`~gradlens.stats.streaming.StreamingStats` partial the store persists and merges. The writer and the
reader (which sums a float32 shard again) both use this class, so on CPU a resumed run equals the uninterrupted one
bitwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from gradlens.errors import GradlensError
from gradlens.modules import ModuleSpec
from gradlens.stats.streaming import StreamingStats

SUMS = ("sum", "sumsq", "sumabs")


class DeviceStats:
    """Float64 sums of the steps added since it was created, on the device of the first gradients it is given.

    The adapter is held as one flat vector (modules concatenated in order), so a step costs a dozen whole-adapter
    operations however many modules there are, and the per-module norms are one segmented reduction. ``prev``: each
    module's last gradient before these steps (host arrays, e.g. ``StreamingStats.prev``), so the first dot product
    with the previous step chains onto the last commit's.
    """

    def __init__(self, specs: list[ModuleSpec], prev: Sequence[np.ndarray | None] | None = None) -> None:
        self.specs = specs
        self.sizes = [s.size for s in specs]
        self.size = sum(self.sizes)
        self.steps: list[int] = []
        self.sqnorm: list[list[float]] = [[] for _ in specs]
        self.dot_prev: list[list[float]] = [[] for _ in specs]
        self.device: torch.device | None = None
        given = list(prev) if prev is not None else [None] * len(specs)
        if any(p is None for p in given) and not all(p is None for p in given):
            raise GradlensError("DeviceStats: prev must hold a gradient for every module or for none")
        self._prev_host = None if given[0] is None else given
        self.prev: torch.Tensor | None = None  # flat float64
        self.sums: dict[str, torch.Tensor] = {}
        self.positive: torch.Tensor | None = None  # steps with g > 0; sum sign g = 2 * positive - nonzero
        self.nonzero: torch.Tensor | None = None

    @property
    def on_host(self) -> bool:
        """Whether the sums live in host memory (so :meth:`host` shares them instead of copying)."""
        return self.device is None or self.device.type == "cpu"

    def _allocate(self, device: torch.device) -> None:
        self.device = device
        self.sums = {k: torch.zeros(self.size, dtype=torch.float64, device=device) for k in SUMS}
        self.positive, self.nonzero = (torch.zeros(self.size, dtype=torch.int32, device=device) for _ in range(2))
        if self._prev_host is not None:
            self.prev = torch.cat([torch.as_tensor(p).reshape(-1) for p in self._prev_host]).to(device, torch.float64)
        self._lengths = torch.tensor(self.sizes, device=device)

    def flatten(self, grads: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """The gradients as one flat float32 vector: ``grads`` itself if it is one already, else concatenated."""
        if isinstance(grads, torch.Tensor):
            if grads.dim() != 1 or grads.numel() != self.size:
                raise GradlensError(f"DeviceStats: a flat gradient must have {self.size} entries, got shape "
                                    f"{tuple(grads.shape)}")
            return grads.detach().to(torch.float32)
        if len(grads) != len(self.specs):
            raise GradlensError(f"DeviceStats: {len(grads)} gradients, expected {len(self.specs)}")
        return torch.cat([g.detach().reshape(-1).to(torch.float32) for g in grads])

    def add(self, step: int, grads: Sequence[torch.Tensor] | torch.Tensor) -> bool:
        """Add one step's gradients (per module in module order, or one flat vector; any float dtype, one device);
        returns False, adding nothing, if any entry is NaN or infinite: such a step carries no usable statistics.

        Two host syncs (whether the step is finite; its squared norms and dot products with the previous step): run
        it off the training thread, as the background writer does.
        """
        g = self.flatten(grads)
        if self.device is None:
            self._allocate(g.device)
        g = g.to(self.device)
        with torch.no_grad():
            if not bool(torch.isfinite(g).all()):
                return False
            x = g.to(torch.float64)  # a new tensor, exactly the float32 values: the caller may reuse its buffers
            # Segmented sums, not BLAS dot products, which would start BLAS threads next to the training's.
            sq = torch.segment_reduce(x * x, "sum", lengths=self._lengths)
            if self.prev is None:
                dots = torch.full((len(self.specs),), np.nan, dtype=torch.float64, device=self.device)
            else:
                dots = torch.segment_reduce(x * self.prev, "sum", lengths=self._lengths)
            # float32 operands into float64 sums: each computed in float64 (a float32 product is exact there)
            self.sums["sum"].add_(g)
            self.sums["sumsq"].addcmul_(g, g)
            self.sums["sumabs"].add_(g.abs())
            self.positive.add_(g > 0)
            self.nonzero.add_(g != 0)
            self.prev = x
            values = torch.cat([sq, dots]).tolist()
        for i in range(len(self.specs)):
            self.sqnorm[i].append(values[i])
            self.dot_prev[i].append(values[len(self.specs) + i])
        self.steps.append(int(step))
        return True

    def _modules(self, flat: np.ndarray) -> list[np.ndarray]:
        """Per-module views of a flat host array."""
        ends = np.cumsum(self.sizes).tolist()
        return [flat[end - s.size : end].reshape(s.shape) for end, s in zip(ends, self.specs, strict=True)]

    def host(self) -> StreamingStats:
        """These steps as a numpy partial; on CPU it shares the sums (do not add to this object afterwards)."""
        part = StreamingStats(self.specs, zeros=self.device is None)
        part.steps = list(self.steps)
        part.sqnorm = [list(s) for s in self.sqnorm]
        part.dot_prev = [list(d) for d in self.dot_prev]
        if self.device is None:  # nothing added: zero sums, the prev it was given
            part.prev = list(self._prev_host) if self._prev_host is not None else [None] * len(self.specs)
            return part
        sums = {k: self._modules(t.cpu().numpy()) for k, t in self.sums.items()}
        nonzero = self.nonzero.cpu().numpy()
        sumsign = self._modules(2 * self.positive.cpu().numpy() - nonzero)  # int32: exact, merged as it is
        part.sums = [{**{k: sums[k][i] for k in SUMS}, "sumsign": sumsign[i]} for i in range(len(self.specs))]
        part.nonzero = self._modules(nonzero)
        part.prev = [None] * len(self.specs) if self.prev is None else \
            self._modules(self.prev.to(torch.float32).cpu().numpy())
        return part
