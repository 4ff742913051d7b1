"""Background writing: :class:`AsyncRunWriter` feeds a :class:`~gradlens.store.writer.RunWriter` from a daemon
thread, so the statistics, the cast to the storage dtype and the disk I/O all stay off the training step.

The training thread only copies each step's gradients into a free buffer of a small ring on their own device (one
fused copy; on a GPU, queued on its stream and marked with an event, so the step does not wait for it) and hands the
buffer to the thread. It blocks only when every buffer is still in flight. The thread computes the statistics where
the buffer lives, on a side stream on a GPU, copies the cast step into the writer's pinned shard buffer, and returns
the buffer to the ring.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from gradlens.errors import GradlensError
from gradlens.store.runstate import stop_reason
from gradlens.store.writer import RunWriter

_STOP = object()
NORM_CHUNK = 2**16  # entries per float32 norm (see Slot.squared_norm)


class Slot:
    """One reusable buffer of the ring: a float32 copy of every module's gradient, in one flat vector zero-padded to
    whole :data:`NORM_CHUNK`-entry rows (so its norm is one fused reduction). On a GPU two events on the buffer's
    device order the training stream's copy into it before the writer's reads, and those reads before the next copy;
    gradients spread over several GPUs are copied in on that device's stream too (a cross-device copy is ordered
    against both devices' current streams), so one pair of events covers them."""

    def __init__(self, like: Sequence[torch.Tensor]) -> None:
        size = sum(t.numel() for t in like)
        self.padded = torch.zeros(-(-size // NORM_CHUNK) * NORM_CHUNK, dtype=torch.float32, device=like[0].device)
        self.flat = self.padded[:size]
        self.tensors = [v.view(t.shape) for v, t in zip(self.flat.split([t.numel() for t in like]), like,
                                                         strict=True)]
        self.device = like[0].device if like[0].device.type == "cuda" else None
        self.filled = torch.cuda.Event() if self.device is not None else None
        self.read = torch.cuda.Event() if self.device is not None else None
        self.used = False  # whether self.read has been recorded (an unrecorded event must not be waited on)

    def fill(self, grads: Sequence[torch.Tensor]) -> None:
        """Copy ``grads`` in, on the current stream: after the writer's last reads of this slot, before its next."""
        stream = torch.cuda.current_stream(self.device) if self.device is not None else None
        if stream is not None and self.used:
            stream.wait_event(self.read)
        with torch.no_grad():
            torch._foreach_copy_(self.tensors, grads)
        if stream is not None:
            self.filled.record(stream)

    def squared_norm(self) -> torch.Tensor:
        """The float64 squared norm of the copy, on its device, without a host sync: float32 norms of the
        :data:`NORM_CHUNK`-entry rows (the float32 error stays that of one row's reduction), squared and summed in
        float64. Two kernels, whatever the number of modules."""
        rows = torch.linalg.vector_norm(self.padded.view(-1, NORM_CHUNK), dim=1)
        return rows.to(torch.float64).square().sum()


class AsyncRunWriter:
    """Feeds a :class:`RunWriter` from a daemon thread through a ring of ``max_queue`` reusable gradient buffers.

    ``submit`` copies the gradients (the caller keeps and may change its tensors) and returns at once unless every
    buffer is in flight. An error in the thread is re-raised as a GradlensError on the next ``submit`` or on
    ``close``. ``latest`` holds :meth:`RunWriter.live_summary` as of the last step written (its sign stability as of
    the last step after which nothing was queued), for live logging without touching the writer from the training
    thread.
    """

    def __init__(self, run_writer: RunWriter, max_queue: int = 4) -> None:
        if max_queue < 1:
            raise GradlensError(f"AsyncRunWriter: max_queue must be >= 1, got {max_queue}")
        self.run_writer = run_writer
        self.max_queue = max_queue
        self._queue: queue.Queue[Any] = queue.Queue()
        self._free: queue.Queue[Slot] = queue.Queue()
        self._slots = 0
        self._stream: torch.cuda.Stream | None = None
        self._error: BaseException | None = None
        self._closed = False
        self.latest: dict[str, float] = run_writer.live_summary()
        self._thread = threading.Thread(target=self._work, name="gradlens-writer", daemon=True)
        threads, self._pinned = torch.get_num_threads(), threading.Event()
        self._thread.start()
        self._pinned.wait()
        torch.set_num_threads(threads)  # the process default again; the writer's own thread keeps one

    def _work(self) -> None:
        # One intra-op thread for this thread's torch CPU work: two OpenMP teams on the same cores (the training's
        # and this one) spin against each other and slowed both several times over on 2 cores. torch fixes a
        # thread's count at its first parallel call, so take it first, then set 1 here; __init__ restores the
        # process-wide default for threads started later.
        torch.get_num_threads()
        torch.set_num_threads(1)
        self._pinned.set()
        while (item := self._queue.get()) is not _STOP:
            step, slot, grads, meta = item
            if self._error is None:  # after a failure keep draining, so submit never blocks forever
                try:
                    self._write(step, slot, grads, meta)
                except BaseException as e:  # handed to the training thread
                    self._error = e
            if slot is not None:
                self._free.put(slot)

    def _write(self, step: int, slot: Slot | None, grads: Sequence[torch.Tensor], meta: dict[str, Any]) -> None:
        stream = contextlib.nullcontext() if self._stream is None else torch.cuda.stream(self._stream)
        with stream:
            if slot is not None and slot.filled is not None:
                torch.cuda.current_stream().wait_event(slot.filled)
            try:
                self.run_writer.add_step(step, grads, meta)
            finally:
                if slot is not None and slot.read is not None:
                    slot.read.record()
                    slot.used = True
            # The sign stability reads every entry: only when the writer has time for it (nothing queued behind).
            fresh = self.run_writer.live_summary(signs=self._queue.empty())
            self.latest = {**self.latest, **fresh}

    def failure(self) -> GradlensError | None:
        """The thread's error, as the GradlensError the next :meth:`stage`, :meth:`submit` or :meth:`close` raises;
        None while it works. Raises nothing: processes that must stop together first agree on it."""
        if self._error is None:
            return None
        where = "" if isinstance(self._error, GradlensError) else f"{self.run_writer.path}: "  # else it names its file
        error = GradlensError(f"{where}background gradient writer failed: {self._error}")
        error.__cause__ = self._error
        return error

    def _raise_if_failed(self) -> None:
        if (error := self.failure()) is not None:
            raise error

    def _take_slot(self, grads: Sequence[torch.Tensor]) -> Slot:
        """A free buffer; a new one while the ring is not full, else wait for the writer to return one."""
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        if self._slots < self.max_queue:
            self._slots += 1
            if grads[0].device.type == "cuda" and self._stream is None:
                self._stream = torch.cuda.Stream(device=grads[0].device)
            return Slot(grads)
        return self._free.get()

    def stage(self, grads: Sequence[torch.Tensor]) -> Slot:
        """Copy one step's gradients (tensors of the modules' shapes, in module order) into a free buffer of the ring
        and return it, for :meth:`queue`; the caller may read it (e.g. its norm) on its stream in between."""
        if self._closed:
            raise GradlensError(f"{self.run_writer.path}: background writer is closed; cannot take a step")
        self._raise_if_failed()
        slot = self._take_slot(grads)
        try:
            slot.fill(grads)
        except BaseException:
            self._free.put(slot)
            raise
        return slot

    def queue(self, step: int, slot: Slot, meta: dict[str, Any]) -> None:
        """Hand a buffer from :meth:`stage` to the thread, for :meth:`RunWriter.add_step`."""
        self._queue.put((step, slot, slot.flat, meta))

    def submit(self, step: int, grads: Sequence[np.ndarray | torch.Tensor], meta: dict[str, Any]) -> None:
        """Queue one step for :meth:`RunWriter.add_step`: ``grads`` in module order, on one device."""
        if self._closed:
            raise GradlensError(f"{self.run_writer.path}: background writer is closed; cannot submit step {step}")
        self._raise_if_failed()
        tensors = [torch.as_tensor(g) for g in grads]
        if [tuple(t.shape) for t in tensors] != [s.shape for s in self.run_writer.specs]:
            self._queue.put((step, None, tensors, meta))  # the writer names the mismatch, in the step it belongs to
            return
        self.queue(step, self.stage(tensors), meta)

    def close(self, stopped: str | None = None) -> None:
        """Drain the queue, close the RunWriter (releasing its lock; ``stopped``: see :meth:`RunWriter.close`) and
        re-raise any error from the thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join()
        if self._stream is not None:  # the thread's last reads, before the final commit on this thread's stream
            self._stream.synchronize()
        try:
            self.run_writer.close(stopped=stopped)
        finally:
            self._raise_if_failed()

    def __enter__(self) -> AsyncRunWriter:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        self.close(stopped=stop_reason(exc) if exc is not None else None)
