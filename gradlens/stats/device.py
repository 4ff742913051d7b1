"""The per-step update of the streaming statistics, in torch, on the device that holds the gradients.

One step adds its float32 gradient, cast once to float64, into per-entry sums (g, g^2, |g|, sign g and the count of
non-zero steps) and appends the per-module squared norm and dot product with the previous step. On a GPU the sums stay
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
        self.sumsign: list[torch.Tensor] = []
        self.nonzero: list[torch.Tensor] = []

    @property
    def on_host(self) -> bool:
        """Whether the sums live in host memory (so :meth:`host` shares them instead of copying)."""
        return self.device is None or self.device.type == "cpu"

    def _allocate(self, device: torch.device) -> None:
        self.device = device
        zeros = [lambda s, dt=dt: torch.zeros(s.shape, dtype=dt, device=device) for dt in (torch.float64, torch.int32)]
        self.sums = [{k: zeros[0](s) for k in SUMS} for s in self.specs]
        self.sumsign = [zeros[1](s) for s in self.specs]
        self.nonzero = [zeros[1](s) for s in self.specs]
        self.prev = [None if p is None else torch.as_tensor(p).to(device, torch.float64) for p in self._prev_host]

    def add(self, step: int, grads: Sequence[torch.Tensor]) -> bool:
        """Add one step's gradients (module order, any float dtype, all on one device); returns False, adding
        nothing, if any entry is NaN or infinite: such a step carries no usable statistics.

        Two host syncs (the squared norms, which also tell whether the step is finite, and the dot products with the
        previous step): run it off the training thread, as the background writer does.
        """
        if len(grads) != len(self.specs):
            raise GradlensError(f"DeviceStats: step {step} has {len(grads)} gradients, expected {len(self.specs)}")
        if self.device is None:
            self._allocate(grads[0].device)
        with torch.no_grad():
            xs = [g.detach().to(self.device, torch.float64).reshape(s.shape) for g, s in zip(grads, self.specs,
                                                                                             strict=True)]
            squares = [x * x for x in xs]
            # Reductions as sums, not BLAS dot products: those would start BLAS threads next to the training's.
            # float64 squares of float32 values cannot overflow: the norm is finite exactly when every entry is.
            sq = torch.stack([xx.sum() for xx in squares]).tolist()
            if not all(np.isfinite(sq)):
                return False
            nan = torch.full((), np.nan, dtype=torch.float64, device=self.device)
            dots = torch.stack([(x * p).sum() if p is not None else nan for x, p in zip(xs, self.prev, strict=True)])
            for i, (x, xx) in enumerate(zip(xs, squares, strict=True)):
                sums = self.sums[i]
                sums["sum"].add_(x)
                sums["sumsq"].add_(xx)
                sums["sumabs"].add_(x.abs())
                self.sumsign[i].add_(x.sign().to(torch.int32))
                self.nonzero[i].add_(x != 0)
                self.prev[i] = x  # float64, exactly the float32 gradient; a new tensor, so callers may reuse theirs
                self.sqnorm[i].append(sq[i])
            for i, d in enumerate(dots.tolist()):
                self.dot_prev[i].append(d)
        self.steps.append(int(step))
        return True

    def host(self) -> StreamingStats:
        """These steps as a numpy partial; on CPU it shares the sums (do not add to this object afterwards)."""
        part = StreamingStats(self.specs)
        part.steps = list(self.steps)
        part.sqnorm = [list(s) for s in self.sqnorm]
        part.dot_prev = [list(d) for d in self.dot_prev]
        if self.device is None:  # nothing added: zero sums, the prev it was given
            part.prev = list(self._prev_host)
            return part
        part.sums = [{k: t.cpu().numpy() for k, t in sums.items()} for sums in self.sums]
        for i in range(len(self.specs)):  # int32 counts: exact, and merged into the float64/int64 totals as they are
            part.sums[i]["sumsign"] = self.sumsign[i].cpu().numpy()
        part.nonzero = [t.cpu().numpy() for t in self.nonzero]
        part.prev = [None if p is None else p.to(torch.float32).cpu().numpy() for p in self.prev]
        return part
