"""Background writing: :class:`AsyncRunWriter` feeds a :class:`~gradlens.store.writer.RunWriter` from a daemon
thread through a bounded queue, so disk I/O and float64 accumulation stay off the training step."""

from __future__ import annotations

import queue
import threading
from typing import Any

import numpy as np

from gradlens.errors import GradlensError
from gradlens.store.writer import RunWriter

_STOP = object()


class AsyncRunWriter:
    """Feeds a :class:`RunWriter` from a daemon thread through a bounded queue (``submit`` blocks when it is full).

    ``submit`` takes ownership of the arrays: do not modify them afterwards. An error in the thread is re-raised as a
    GradlensError on the next ``submit`` or on ``close``. ``latest`` holds :meth:`RunWriter.live_summary` as of the
    last step written, for live logging without touching the writer from the training thread.
    """

    def __init__(self, run_writer: RunWriter, max_queue: int = 4) -> None:
        self.run_writer = run_writer
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._error: BaseException | None = None
        self._closed = False
        self.latest: dict[str, float] = run_writer.live_summary()
        self._thread = threading.Thread(target=self._work, name="gradlens-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            if self._error is None:  # after a failure keep draining, so submit never blocks forever
                try:
                    self.run_writer.add_step(*item)
                    self.latest = self.run_writer.live_summary()
                except BaseException as e:  # handed to the training thread
                    self._error = e

    def _raise_if_failed(self) -> None:
        if self._error is not None:  # a GradlensError already names its file (the run's, or one inside it)
            where = "" if isinstance(self._error, GradlensError) else f"{self.run_writer.path}: "
            raise GradlensError(f"{where}background gradient writer failed: {self._error}") from self._error

    def submit(self, step: int, grads: list[np.ndarray], meta: dict[str, Any]) -> None:
        """Queue one step for :meth:`RunWriter.add_step`."""
        if self._closed:
            raise GradlensError(f"{self.run_writer.path}: background writer is closed; cannot submit step {step}")
        self._raise_if_failed()
        self._queue.put((step, grads, meta))

    def close(self) -> None:
        """Drain the queue, close the RunWriter (releasing its lock) and re-raise any error from the thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join()
        try:
            self.run_writer.close()
        finally:
            self._raise_if_failed()

    def __enter__(self) -> AsyncRunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
