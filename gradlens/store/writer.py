"""Writing a run directory: :class:`RunWriter` commits shards, statistics and manifest in crash-safe order, and
:class:`AsyncRunWriter` feeds it from a background thread so disk I/O and float64 accumulation stay off the training
step.

Every file is replaced atomically, in the order shard -> accumulators -> manifest, so a process killed at any moment
leaves a directory that reads back fully up to its last manifest.
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy
import safetensors.torch
import torch

from gradlens.errors import GradlensError
from gradlens.fsio import ITEMSIZE, atomic_write, json_dump
from gradlens.modules import ModuleSpec
from gradlens.provenance import package_versions
from gradlens.stats.streaming import StreamingStats
from gradlens.store.format import (
    ACCUMULATORS,
    ACCUMULATORS_PREV,
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    LOCK,
    MANIFEST,
    RESERVED_META,
    SHARD_DIR,
    SHARD_FORMAT,
    load_accumulator_tensors,
    load_manifest,
    public_manifest,
    spec_to_json,
    write_failure,
)

# A shard is committed with the whole float64 accumulators file (44 bytes per B entry), so shards must be large
# against it (256 MiB: at most ~2x write amplification for a 1.5B adapter) yet bounded, since the steps of a shard
# are buffered in host memory and a hard kill loses them: at most this many steps and this many bytes.
MAX_STEPS_PER_SHARD = 64
SHARD_BYTES = 256 * 2**20


def default_steps_per_shard(modules: list[ModuleSpec], dtype: str, shard_bytes: int = SHARD_BYTES) -> int:
    """Steps buffered per shard: as many as fit ``shard_bytes``, at most :data:`MAX_STEPS_PER_SHARD` (what a kill
    can lose), at least one."""
    bytes_per_step = sum(s.size for s in modules) * ITEMSIZE[DTYPES[dtype]]
    return max(1, min(MAX_STEPS_PER_SHARD, shard_bytes // max(1, bytes_per_step)))


class RunWriter:
    """Synchronous writer of one run directory; holds ``.lock`` for its lifetime so two writers never interleave.

    ``add_step`` buffers a step and folds it into the float64 accumulators; every ``steps_per_shard`` steps the buffer
    becomes a shard and the accumulators and manifest are committed. With ``resume=True`` an existing run is continued
    and steps it already holds are skipped, so a trainer restarted from an older checkpoint can replay them.
    """

    def __init__(self, path: str | os.PathLike[str], modules: list[ModuleSpec], *, dtype: str = "float32",
                 save_raw: bool = True, steps_per_shard: int | None = None, shard_bytes: int = SHARD_BYTES,
                 config: dict[str, Any] | None = None, seed: int | None = None, resume: bool = False) -> None:
        if dtype not in DTYPES:
            raise GradlensError(f"RunWriter: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if not modules:
            raise GradlensError("RunWriter: no modules to record")
        if len({m.name for m in modules}) != len(modules):
            raise GradlensError("RunWriter: module names are not unique")
        self.path = Path(path)
        self.specs = list(modules)
        self.dtype = dtype
        self.save_raw = save_raw
        self.steps_per_shard = steps_per_shard or default_steps_per_shard(modules, dtype, shard_bytes)
        if self.steps_per_shard < 1:
            raise GradlensError(f"RunWriter: steps_per_shard must be >= 1, got {steps_per_shard}")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fd = acquire_lock(self.path)
        self._closed = False
        self._broken = False  # a commit failed: the directory is as a kill would leave it, so write nothing more
        self._pending: list[tuple[dict[str, Any], list[torch.Tensor] | None]] = []  # (step record, stored grads)
        try:
            if (self.path / MANIFEST).exists():
                self._resume(resume, config, seed)
            else:
                self._start(config, seed)
        except BaseException:
            self._release_lock()
            raise

    def _start(self, config: dict[str, Any] | None, seed: int | None) -> None:
        self._acc = StreamingStats(self.specs)
        self._resumed_through: int | None = None
        self._manifest: dict[str, Any] = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "modules": [spec_to_json(s) for s in self.specs], "dtype": self.dtype, "save_raw": self.save_raw,
            "steps_per_shard": self.steps_per_shard, "shards": [], "steps": [], "nonfinite_steps": [],
            "accumulators": {"file": ACCUMULATORS, "generation": 0},
            "config": config or {}, "seed": seed, "versions": package_versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "complete": False,
        }
        self._write_accumulators(0)
        json_dump(self._manifest, self.path / MANIFEST)

    def _resume(self, resume: bool, config: dict[str, Any] | None, seed: int | None) -> None:
        if not resume:
            raise GradlensError(f"{self.path}: already holds a run; pass --resume or choose another --out")
        manifest = load_manifest(self.path)
        self._check_compatible(manifest)
        found, tensors = load_accumulator_tensors(self.path, manifest)
        if found.name == ACCUMULATORS_PREV:  # killed mid-commit: make the committed file current again
            os.replace(found, self.path / ACCUMULATORS)
        self._acc = StreamingStats.from_tensors(self.specs, tensors)
        self._manifest = public_manifest(manifest)
        self._manifest.update(steps_per_shard=self.steps_per_shard, complete=False, versions=package_versions())
        if config is not None:
            self._manifest["config"] = config
        if seed is not None:
            self._manifest["seed"] = seed
        steps = self._manifest["steps"]
        self._resumed_through = steps[-1]["step"] if steps else None

    def _check_compatible(self, manifest: dict[str, Any]) -> None:
        where = self.path / MANIFEST
        old: list[ModuleSpec] = manifest["_specs"]
        if len(old) != len(self.specs):
            raise GradlensError(f"{where}: run has {len(old)} modules, this writer {len(self.specs)}; cannot resume")
        for i, (a, b) in enumerate(zip(old, self.specs, strict=True)):
            if (a.name, a.shape) != (b.name, b.shape):
                raise GradlensError(f"{where}: module {i} is {a.name} {a.shape} in the run but {b.name} {b.shape} "
                                    "in this writer; cannot resume")
        if manifest["dtype"] != self.dtype:
            raise GradlensError(f"{where}: run stores {manifest['dtype']}, this writer {self.dtype}; cannot resume")
        if bool(manifest["save_raw"]) != self.save_raw:
            raise GradlensError(f"{where}: run has save_raw={manifest['save_raw']}, this writer {self.save_raw}; "
                                "cannot resume")


    @property
    def last_step(self) -> int | None:
        """The last step added (buffered or committed), or None before the first."""
        if self._pending:
            return self._pending[-1][0]["step"]
        steps = self._manifest["steps"]
        return steps[-1]["step"] if steps else None

    def live_summary(self) -> dict[str, float]:
        """Whole-adapter diagnostics of the steps added so far (see :meth:`StreamingStats.live_summary`)."""
        return self._acc.live_summary()

    def add_step(self, step: int, grads: list[np.ndarray], meta: dict[str, Any]) -> None:
        """Record one optimizer step: ``grads`` in module order, float32 ``(d_out, r)``; ``meta`` must be JSON-able."""
        if self._closed or self._broken:
            state = "closed" if self._closed else "broken by an earlier write error (resume to continue)"
            raise GradlensError(f"{self.path}: writer is {state}; cannot add step {step}")
        step = int(step)
        if self._resumed_through is not None and step <= self._resumed_through:
            return  # replayed by a trainer resumed from an older checkpoint: already recorded
        last = self.last_step
        if last is not None and step <= last:
            raise GradlensError(f"{self.path}: step {step} is not after the last recorded step {last}")
        grads = self._check_grads(step, grads)
        record = self._check_meta(step, meta)
        nonfinite = not all(np.isfinite(g).all() for g in grads)
        record["nonfinite"] = nonfinite
        if not nonfinite:
            self._acc.add(step, grads)
        torch_dtype = getattr(torch, self.dtype)
        stored = [torch.from_numpy(g).to(torch_dtype, copy=True) for g in grads] if self.save_raw else None
        self._pending.append((record, stored))
        if len(self._pending) >= self.steps_per_shard:
            self._commit()

    def flush(self) -> None:
        """Commit the buffered steps as a (short) shard, then accumulators and manifest."""
        if self._pending and not self._broken:
            self._commit()

    def close(self) -> None:
        """Flush, mark the run complete and release the lock; closing twice is harmless."""
        if self._closed:
            return
        try:
            if not self._broken:
                self.flush()
                self._manifest["complete"] = True
                json_dump(self._manifest, self.path / MANIFEST)
        finally:
            self._closed = True
            self._release_lock()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_grads(self, step: int, grads: list[np.ndarray]) -> list[np.ndarray]:
        if len(grads) != len(self.specs):
            raise GradlensError(f"{self.path}: step {step} has {len(grads)} gradients, expected {len(self.specs)}")
        out = []
        for spec, g in zip(self.specs, grads, strict=True):
            g = np.asarray(g, dtype=np.float32)
            if g.shape != spec.shape:
                raise GradlensError(f"{self.path}: step {step}, module {spec.name}: gradient shape {g.shape}, "
                                    f"expected {spec.shape}")
            out.append(g)
        return out

    def _check_meta(self, step: int, meta: dict[str, Any]) -> dict[str, Any]:
        clash = [k for k in meta if k in RESERVED_META]
        if clash:
            raise GradlensError(f"{self.path}: step {step} meta uses reserved key(s) {', '.join(clash)}")
        record = {"step": step, "shard": None, "offset": None}
        record.update({k: v.item() if isinstance(v, np.generic) else v for k, v in meta.items()})
        try:
            json.dumps(record)
        except (TypeError, ValueError) as e:
            raise GradlensError(f"{self.path}: step {step} meta is not JSON-serialisable ({e})") from None
        return record

    def _commit(self) -> None:
        """Write shard -> accumulators -> manifest, each atomically; the manifest rename is the commit point.

        The in-memory manifest changes only after all three writes succeed; if one fails the writer stops writing,
        leaving the directory exactly as a kill at that moment would (readable, resumable).
        """
        records = [dict(rec) for rec, _ in self._pending]
        steps = [rec["step"] for rec in records]
        shards = list(self._manifest["shards"])
        generation = self._manifest["accumulators"]["generation"] + 1
        target = ""
        try:
            if self.save_raw:
                target = f"{SHARD_DIR}/shard-{len(shards):06d}.safetensors"
                shards.append({"file": target, "steps": steps, "bytes": self._write_shard(self.path / target)})
                for offset, rec in enumerate(records):
                    rec.update(shard=target, offset=offset)
            target = ACCUMULATORS
            self._write_accumulators(generation)
            manifest = {**self._manifest, "shards": shards, "steps": self._manifest["steps"] + records,
                        "nonfinite_steps": self._manifest["nonfinite_steps"] + [r["step"] for r in records
                                                                                if r["nonfinite"]],
                        "accumulators": {"file": ACCUMULATORS, "generation": generation}}
            target = MANIFEST
            json_dump(manifest, self.path / MANIFEST)
        except (OSError, safetensors.SafetensorError) as e:
            self._broken = True
            committed = self._manifest["steps"]
            kept = f"through step {committed[-1]['step']}" if committed else "none yet"
            raise GradlensError(f"{self.path / target}: cannot write it: {write_failure(e)}; recording stopped at "
                                f"step {steps[0]}, the run keeps its {len(committed)} committed step(s) ({kept}); "
                                "free space and continue with --resume") from e
        except BaseException:
            self._broken = True
            raise
        self._manifest = manifest
        self._pending.clear()

    def _write_shard(self, path: Path) -> int:
        path.parent.mkdir(exist_ok=True)
        tensors = {f"m{i}": torch.stack([stored[i] for _, stored in self._pending]) for i in range(len(self.specs))}
        meta = {"format": SHARD_FORMAT, "steps": json.dumps([rec["step"] for rec, _ in self._pending])}
        atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=meta))
        return path.stat().st_size

    def _write_accumulators(self, generation: int) -> None:
        """Replace the accumulators, keeping the committed ones as the fallback until the manifest names the new."""
        meta = {"format": "gradlens-accumulators", "generation": str(generation)}
        tensors = self._acc.to_tensors()
        current = self.path / ACCUMULATORS
        if current.exists():
            os.replace(current, self.path / ACCUMULATORS_PREV)
        atomic_write(current, lambda tmp: safetensors.numpy.save_file(tensors, tmp, metadata=meta))

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None


def acquire_lock(run_dir: Path) -> int:
    """Take an exclusive, non-blocking flock on ``run_dir/.lock`` and write our pid into it."""
    path = run_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise GradlensError(f"{run_dir}: is locked by another writer (pid {holder}) via {path}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


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
