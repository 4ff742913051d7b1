"""The per-step update of the streaming statistics, in torch, on the device that holds the gradients.

One step adds its float32 gradient into per-entry float64 sums (g, g^2, |g|, sign g and the count of non-zero
steps) and appends the per-module squared norm and dot product with the previous
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
    operations however many modules there are, and the per-module norms are sums over its stretches. ``prev``: each
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
        self.sumsign: torch.Tensor | None = None
        self.nonzero: torch.Tensor | None = None

    @property
    def on_host(self) -> bool:
        """Whether the sums live in host memory (so :meth:`host` shares them instead of copying)."""
        return self.device is None or self.device.type == "cpu"

    def _allocate(self, device: torch.device) -> None:
        """The sums, and scratch vectors reused at every step: a fresh multi-megabyte temporary per operation costs
        more in page faults than the operation itself (a float64 cast of 10M entries: 41 ms fresh, 5 ms reused)."""
        self.device = device
        f64 = dict(dtype=torch.float64, device=device)
        self.sums = {k: torch.zeros(self.size, **f64) for k in SUMS}
        # the sign sums and non-zero counts too: float64 holds them exactly (to 2^53 steps), and same-dtype adds run
        # 3-6x faster on CPU than adding a bool or int mask into an integer sum
        self.sumsign, self.nonzero = torch.zeros(self.size, **f64), torch.zeros(self.size, **f64)
        self._x, self._tmp = torch.empty(self.size, **f64), torch.empty(self.size, **f64)
        self._lengths = torch.tensor(self.sizes, device=device)
        if self._prev_host is not None:
            self.prev = torch.cat([torch.as_tensor(p).reshape(-1) for p in self._prev_host]).to(**f64)

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

        One host sync (the squared norms, which say whether the step is finite, and the dot products with the
        previous step): run it off the training thread, as the background writer does.
        """
        g = self.flatten(grads)
        if self.device is None:
            self._allocate(g.device)
        g = g.to(self.device)
        x, tmp = self._x, self._tmp
        with torch.no_grad():
            x.copy_(g)  # exactly the float32 values
            # Per-module sums, not BLAS dot products, which would start BLAS threads next to the training's.
            sq = self._module_sums(torch.mul(x, x, out=tmp))
            dots = torch.full_like(sq, np.nan) if self.prev is None else \
                self._module_sums(torch.mul(x, self.prev, out=tmp))
            values = torch.cat([sq, dots]).tolist()
            # float64 squares of float32 values cannot overflow: the norm is finite exactly when every entry is
            if not all(np.isfinite(values[: len(self.specs)])):
                return False
            self.sums["sum"].add_(x)
            self.sums["sumsq"].add_(torch.mul(x, x, out=tmp))
            self.sums["sumabs"].add_(torch.abs(x, out=tmp))
            self.sumsign.add_(torch.sign(x, out=tmp))
            self.nonzero.add_(torch.ne(x, 0, out=tmp))
            # this step becomes the previous one; the old previous buffer is the next step's scratch
            self._x = self.prev if self.prev is not None else torch.empty_like(x)
            self.prev = x
        for i in range(len(self.specs)):
            self.sqnorm[i].append(values[i])
            self.dot_prev[i].append(values[len(self.specs) + i])
        self.steps.append(int(step))
        return True

    def _module_sums(self, flat: torch.Tensor) -> torch.Tensor:
        """The sum over each module's stretch of ``flat``: on a GPU one segmented reduction (a kernel per module
        would take the GIL back from the training thread hundreds of times a step), on CPU one sum per stretch (5x
        faster there than ``torch.segment_reduce``)."""
        if flat.device.type == "cuda":
            return torch.segment_reduce(flat, "sum", lengths=self._lengths)
        return torch.stack([v.sum() for v in flat.split(self.sizes)])

    def _modules(self, flat: np.ndarray) -> list[np.ndarray]:
        """Per-module views of a flat host array."""
        ends = np.cumsum(self.sizes).tolist()
        return [flat[end - s.size : end].reshape(s.shape) for end, s in zip(ends, self.specs, strict=True)]

    def host(self, prev: bool = True) -> StreamingStats:
        """These steps as a numpy partial; on CPU it shares the sums (do not add to this object afterwards).
        ``prev=False`` leaves out the last gradient (a copy), which only a commit needs."""
        part = StreamingStats(self.specs, zeros=self.device is None)
        part.steps = list(self.steps)
        part.sqnorm = [list(s) for s in self.sqnorm]
        part.dot_prev = [list(d) for d in self.dot_prev]
        if self.device is None:  # nothing added: zero sums, the prev it was given
            part.prev = list(self._prev_host) if self._prev_host is not None else [None] * len(self.specs)
            return part
        sums = {k: self._modules(t.cpu().numpy()) for k, t in self.sums.items()}
        sumsign = self._modules(self.sumsign.cpu().numpy())
        part.sums = [{**{k: sums[k][i] for k in SUMS}, "sumsign": sumsign[i]} for i in range(len(self.specs))]
        part.nonzero = self._modules(self.nonzero.cpu().numpy().astype(np.int64))
        part.prev = [None] * len(self.specs) if self.prev is None or not prev else \
            self._modules(self.prev.to(torch.float32).cpu().numpy())
        return part
