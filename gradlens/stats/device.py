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

    ``prev``: each module's last gradient before these steps (host arrays, e.g. ``StreamingStats.prev``), so the
    first dot product with the previous step chains onto the last commit's.
    """

    def __init__(self, specs: list[ModuleSpec], prev: Sequence[np.ndarray | None] | None = None) -> None:
        self.specs = specs
        self.steps: list[int] = []
        self.sqnorm: list[list[float]] = [[] for _ in specs]
        self.dot_prev: list[list[float]] = [[] for _ in specs]
        self.device: torch.device | None = None
        self._prev_host = list(prev) if prev is not None else [None] * len(specs)
        self.prev: list[torch.Tensor | None] = []
        self.sums: list[dict[str, torch.Tensor]] = []
        self.positive: list[torch.Tensor] = []  # steps with g > 0; sum sign g = 2 * positive - nonzero
        self.nonzero: list[torch.Tensor] = []

    @property
    def on_host(self) -> bool:
        """Whether the sums live in host memory (so :meth:`host` shares them instead of copying)."""
        return self.device is None or self.device.type == "cpu"

    def _allocate(self, device: torch.device) -> None:
        self.device = device
        zeros = [lambda s, dt=dt: torch.zeros(s.shape, dtype=dt, device=device) for dt in (torch.float64, torch.int32)]
        self.sums = [{k: zeros[0](s) for k in SUMS} for s in self.specs]
        self.positive = [zeros[1](s) for s in self.specs]
        self.nonzero = [zeros[1](s) for s in self.specs]
        self.prev = [None if p is None else torch.as_tensor(p).to(device, torch.float64) for p in self._prev_host]

    def add(self, step: int, grads: Sequence[torch.Tensor]) -> bool:
        """Add one step's gradients (module order, any float dtype, all on one device); returns False, adding
        nothing, if any entry is NaN or infinite: such a step carries no usable statistics.

        Two host syncs (whether the step is finite; its squared norms and dot products with the previous step): run
        it off the training thread, as the background writer does.
        """
        if len(grads) != len(self.specs):
            raise GradlensError(f"DeviceStats: step {step} has {len(grads)} gradients, expected {len(self.specs)}")
        if self.device is None:
            self._allocate(grads[0].device)
        with torch.no_grad():
            flat = [g.detach().to(self.device, torch.float32).reshape(s.shape) for g, s in zip(grads, self.specs,
                                                                                               strict=True)]
            if not bool(torch.stack([torch.isfinite(g).all() for g in flat]).all()):
                return False
            nan = torch.full((), np.nan, dtype=torch.float64, device=self.device)
            sq, dots = [], []
            for i, g in enumerate(flat):
                x = g.to(torch.float64)  # a new tensor, exactly the float32 values: the caller may reuse its buffers
                # Reductions as sums, not BLAS dot products, which would start BLAS threads next to the training's.
                sq.append((x * x).sum())
                dots.append(nan if self.prev[i] is None else (x * self.prev[i]).sum())
                # float32 operands into float64 sums: each computed in float64 (a float32 product is exact there)
                sums = self.sums[i]
                sums["sum"].add_(g)
                sums["sumsq"].addcmul_(g, g)
                sums["sumabs"].add_(g.abs())
                self.positive[i].add_(g > 0)
                self.nonzero[i].add_(g != 0)
                self.prev[i] = x
            values = torch.stack(sq + dots).tolist()
        for i in range(len(self.specs)):
            self.sqnorm[i].append(values[i])
            self.dot_prev[i].append(values[len(self.specs) + i])
        self.steps.append(int(step))
        return True

    def host(self) -> StreamingStats:
        """These steps as a numpy partial; on CPU it shares the sums (do not add to this object afterwards)."""
        part = StreamingStats(self.specs, zeros=self.device is None)
        part.steps = list(self.steps)
        part.sqnorm = [list(s) for s in self.sqnorm]
        part.dot_prev = [list(d) for d in self.dot_prev]
        if self.device is None:  # nothing added: zero sums, the prev it was given
            part.prev = list(self._prev_host)
            return part
        part.sums = [{k: t.cpu().numpy() for k, t in sums.items()} for sums in self.sums]
        part.nonzero = [t.cpu().numpy() for t in self.nonzero]
        for i, pos in enumerate(self.positive):  # int32 counts: exact, merged into float64/int64 totals as they are
            part.sums[i]["sumsign"] = 2 * pos.cpu().numpy() - part.nonzero[i]
        part.prev = [None if p is None else p.to(torch.float32).cpu().numpy() for p in self.prev]
        return part
