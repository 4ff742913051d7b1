"""Writing a run directory: :class:`RunWriter` commits shards, statistics and manifest in crash-safe order
(:mod:`.background` feeds it from a thread, off the training step).

Every file is written atomically, in the order shard -> partial statistics (or a compacted base) -> manifest, so a
process killed at any moment leaves a directory that reads back fully up to its last manifest. A commit writes only
its own steps: the statistics of the whole run are rewritten (compacted into the base) only once the journal since the
last compaction outweighs them :data:`COMPACT_RATIO` times, and at close.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from collections.abc import Sequence
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
from gradlens.stats.device import DeviceStats
from gradlens.stats.streaming import StreamingStats
from gradlens.store.format import (
    ACC_FORMAT,
    ACCUMULATORS,
    ACCUMULATORS_PREV,
    DTYPES,
    FORMAT_VERSION,
    LOCK,
    MANIFEST,
    PARTIAL_DIR,
    RESERVED_META,
    SHARD_DIR,
    SHARD_FORMAT,
    Base,
    Manifest,
    TensorFile,
    crc32,
    find_base,
    load_manifest,
    write_failure,
)
from gradlens.store.reader import accumulator_state
from gradlens.store.runstate import COMPLETE, STOPPED, WRITING, stop_reason, writer_identity

# The steps of a shard are buffered in host memory and a hard kill loses them: at most this many steps and bytes.
MAX_STEPS_PER_SHARD = 64
SHARD_BYTES = 256 * 2**20
# Compaction rewrites the whole run's statistics (~36 bytes per B entry); it waits until the journal since the last
# one (float32 shards, or partial sums of half-precision shards) holds this many times that, which bounds both the
# extra bytes written per shard byte and what a reader of an unfinished run merges.
COMPACT_RATIO = 4
BASE_BYTES_PER_ENTRY = 36


def default_steps_per_shard(modules: list[ModuleSpec], dtype: str, shard_bytes: int = SHARD_BYTES) -> int:
    """Steps buffered per shard: as many as fit ``shard_bytes``, at most :data:`MAX_STEPS_PER_SHARD` (what a kill
    can lose), at least one."""
    bytes_per_step = sum(s.size for s in modules) * ITEMSIZE[DTYPES[dtype]]
    return max(1, min(MAX_STEPS_PER_SHARD, shard_bytes // max(1, bytes_per_step)))


class RunWriter:
    """Synchronous writer of one run directory; holds ``.lock`` for its lifetime so two writers never interleave.

    ``add_step`` folds a step into the float64 statistics of the pending commit (:class:`DeviceStats`, on the
    gradients' device) and casts it into a reusable shard buffer (pinned host memory when the gradients are on a GPU);
    every ``steps_per_shard`` steps the buffer becomes a shard and the commit's statistics and the manifest are
    committed. With ``resume=True``
    an existing run is continued and steps it already holds are skipped, so a trainer restarted from an older
    checkpoint can replay them.
    """

    def __init__(self, path: str | os.PathLike[str], modules: list[ModuleSpec], *, dtype: str = "float32",
                 save_raw: bool = True, steps_per_shard: int | None = None, shard_bytes: int = SHARD_BYTES,
                 config: dict[str, Any] | None = None, seed: int | None = None, resume: bool = False,
                 planned_steps: int | None = None,
                 resume_hint: str = "RunWriter(..., resume=True) continues it") -> None:
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
        self.planned_steps = planned_steps
        self.resume_hint = resume_hint  # how the caller's user continues a run, in the caller's words
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fd = acquire_lock(self.path)
        self._closed = False
        self._broken = False  # a commit failed: the directory is as a kill would leave it, so write nothing more
        self._pending: list[dict[str, Any]] = []  # step records of the buffered steps
        self._buffers: list[torch.Tensor] = []  # per module (steps_per_shard, d_out, r) in the storage dtype
        self._staging: torch.Tensor | None = None  # pinned host vector of one step, with the gradients on a GPU
        self._live: tuple[tuple[int, bool] | None, dict[str, float]] = (None, {})  # cached, on a GPU
        try:
            if (self.path / MANIFEST).exists():
                self._resume(resume, config, seed)
            else:
                self._start(config, seed)
        except BaseException:
            self._release_lock()
            raise
        self._part = DeviceStats(self.specs, prev=self._acc.prev)  # the statistics of the pending steps

    def _start(self, config: dict[str, Any] | None, seed: int | None) -> None:
        self._acc = StreamingStats(self.specs)  # the statistics of every committed step
        self._resumed_through: int | None = None
        # float32 shards hold the accumulators' exact input, so they are the journal; half precision needs partials
        journal = "shards" if self.save_raw and self.dtype == "float32" else "partials"
        self._manifest = Manifest(modules=self.specs, dtype=self.dtype, save_raw=self.save_raw,
                                  steps_per_shard=self.steps_per_shard, journal=journal, config=config or {},
                                  seed=seed, status=WRITING, planned_steps=self.planned_steps,
                                  writer=writer_identity())
        json_dump(self._manifest.to_json(), self.path / MANIFEST)

    def _resume(self, resume: bool, config: dict[str, Any] | None, seed: int | None) -> None:
        if not resume:
            raise GradlensError(f"{self.path}: already holds a run ({self.resume_hint}), or choose another "
                                "directory")
        manifest = load_manifest(self.path)
        if manifest.format_version != FORMAT_VERSION:
            raise GradlensError(f"{self.path / MANIFEST}: a format_version {manifest.format_version} run can be read "
                                f"but not resumed (this gradlens writes format {FORMAT_VERSION}); record a new run")
        self._check_compatible(manifest)
        self._tidy(manifest)
        _, self._acc = accumulator_state(self.path, manifest)
        manifest.steps_per_shard, manifest.complete = self.steps_per_shard, False
        manifest.versions = package_versions()
        if config is not None:
            manifest.config = config
        if seed is not None:
            manifest.seed = seed
        if self.planned_steps is not None:
            manifest.planned_steps = self.planned_steps
        manifest.status, manifest.stop_reason, manifest.writer = WRITING, None, writer_identity()
        json_dump(manifest.to_json(), self.path / MANIFEST)  # "being written" again, by this process
        self._manifest = manifest
        self._resumed_through = manifest.steps[-1]["step"] if manifest.steps else None

    def _check_compatible(self, manifest: Manifest) -> None:
        where = self.path / MANIFEST
        old = manifest.modules
        if len(old) != len(self.specs):
            raise GradlensError(f"{where}: run has {len(old)} modules, this writer {len(self.specs)}; cannot resume")
        for i, (a, b) in enumerate(zip(old, self.specs, strict=True)):
            if (a.name, a.shape) != (b.name, b.shape):
                raise GradlensError(f"{where}: module {i} is {a.name} {a.shape} in the run but {b.name} {b.shape} "
                                    "in this writer; cannot resume")
        if manifest.dtype != self.dtype:
            raise GradlensError(f"{where}: run stores {manifest.dtype}, this writer {self.dtype}; cannot resume")
        if manifest.save_raw != self.save_raw:
            raise GradlensError(f"{where}: run has save_raw={manifest.save_raw}, this writer {self.save_raw}; "
                                "cannot resume")

    def _tidy(self, manifest: Manifest) -> None:
        """Undo what a kill inside a commit or compaction left: make the committed base current again and remove
        base and partial files the manifest does not name."""
        current, prev = self.path / ACCUMULATORS, self.path / ACCUMULATORS_PREV
        if manifest.base is None:
            current.unlink(missing_ok=True)
        elif find_base(self.path, manifest.base) == prev:
            os.replace(prev, current)
        prev.unlink(missing_ok=True)
        listed = {p.file for p in manifest.partials}
        for path in (self.path / PARTIAL_DIR).glob("*"):
            if f"{PARTIAL_DIR}/{path.name}" not in listed:
                path.unlink()

    @property
    def last_step(self) -> int | None:
        """The last step added (buffered or committed), or None before the first."""
        if self._pending:
            return self._pending[-1]["step"]
        steps = self._manifest.steps
        return steps[-1]["step"] if steps else None

    def live_summary(self, signs: bool = True) -> dict[str, float]:
        """Whole-adapter diagnostics of the steps added so far (see :meth:`StreamingStats.live_summary`); with the
        statistics on an accelerator, of the committed steps (reading the device sums every step would copy them)."""
        if self._part.on_host:
            return self._acc.live_summary(self._part.host(prev=False), signs=signs)
        # the committed steps change only at a commit: the sign stability (a pass over every entry) once per commit
        key = (len(self._manifest.steps), signs)
        if self._live[0] != key:
            self._live = (key, self._acc.live_summary(None, signs=signs))
        return dict(self._live[1])

    def add_step(self, step: int, grads: Sequence[np.ndarray | torch.Tensor] | torch.Tensor,
                 meta: dict[str, Any]) -> None:
        """Record one optimizer step: ``grads`` in module order, ``(d_out, r)`` arrays or tensors, or one flat vector
        of all modules concatenated (on one device, taken as float32); ``meta`` must be JSON-able. The gradients are
        read, not kept: the caller may reuse them."""
        if self._closed or self._broken:
            state = "closed" if self._closed else "broken by an earlier write error (resume to continue)"
            raise GradlensError(f"{self.path}: writer is {state}; cannot add step {step}")
        step = int(step)
        if self._resumed_through is not None and step <= self._resumed_through:
            return  # replayed by a trainer resumed from an older checkpoint: already recorded
        last = self.last_step
        if last is not None and step <= last:
            raise GradlensError(f"{self.path}: step {step} is not after the last recorded step {last}")
        flat = self._flat_grads(step, grads)
        record = self._check_meta(step, meta)
        record["nonfinite"] = not self._part.add(step, flat)
        if self.save_raw:
            self._store(flat)
        self._pending.append(record)
        if len(self._pending) >= self.steps_per_shard:
            self._commit()

    def flush(self) -> None:
        """Commit the buffered steps as a (short) shard, with their statistics and the manifest."""
        if self._pending and not self._broken:
            self._commit()

    def close(self, stopped: str | None = None) -> None:
        """Flush, compact the statistics, mark the run complete (or, given a reason, ``stopped``: see
        :mod:`.runstate`) and release the lock; closing twice is harmless."""
        if self._closed:
            return
        try:
            if not self._broken:
                self._commit(final=True, stopped=stopped)
        finally:
            self._closed = True
            self._release_lock()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        self.close(stopped=stop_reason(exc) if exc is not None else None)

    def _store(self, flat: torch.Tensor) -> None:
        """Cast the step to the storage dtype where it lives and copy each module into its row of the shard buffer.
        From a GPU: one device-to-host copy into a pinned staging vector, waited for on this thread's stream (the
        background writer's side stream, not the training's), then one fused host copy into the rows (a copy per
        module to the host would be a transfer, and a trip through the GIL, per module)."""
        dtype, row = getattr(torch, self.dtype), len(self._pending)
        if not self._buffers:
            self._buffers = [torch.empty((self.steps_per_shard, *s.shape), dtype=dtype) for s in self.specs]
            cuda = flat.device.type == "cuda"
            self._staging = torch.empty(flat.numel(), dtype=dtype, pin_memory=True) if cuda else None
        source = flat.to(dtype)
        if self._staging is not None:
            self._staging.copy_(source, non_blocking=True)
            torch.cuda.current_stream(flat.device).synchronize()
            source = self._staging
        torch._foreach_copy_([buf[row].view(-1) for buf in self._buffers],
                             list(source.split([s.size for s in self.specs])))

    def _flat_grads(self, step: int, grads: Sequence[np.ndarray | torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """The step as one flat float32 vector (:meth:`DeviceStats.flatten`), after checking the count and shape of
        its gradients."""
        if isinstance(grads, torch.Tensor):
            total = sum(s.size for s in self.specs)
            if grads.dim() != 1 or grads.numel() != total:
                raise GradlensError(f"{self.path}: step {step} is a tensor of shape {tuple(grads.shape)}, expected "
                                    f"one gradient per module or a flat vector of {total}")
            return self._part.flatten(grads)
        if len(grads) != len(self.specs):
            raise GradlensError(f"{self.path}: step {step} has {len(grads)} gradients, expected {len(self.specs)}")
        tensors = [torch.as_tensor(g) for g in grads]
        for spec, g in zip(self.specs, tensors, strict=True):
            if tuple(g.shape) != spec.shape:
                raise GradlensError(f"{self.path}: step {step}, module {spec.name}: gradient shape {tuple(g.shape)}, "
                                    f"expected {spec.shape}")
        return self._part.flatten(tensors)

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

    def _commit(self, final: bool = False, stopped: str | None = None) -> None:
        """Write shard -> partial statistics or compacted base -> manifest, each atomically; the manifest rename is
        the commit point. ``final``: also compact and mark the run complete, or stopped for the reason ``stopped``.

        The in-memory manifest changes only after every write succeeds; if one fails the writer stops writing,
        leaving the directory exactly as a kill at that moment would (readable, resumable).
        """
        if self._part.device is not None and self._part.device.type == "cuda":
            # The statistics and the rows' copies were queued on this thread's stream (the background writer's side
            # stream): wait for it alone, not for the training stream's queue. The final commit runs on the thread
            # that closes the writer, after that thread waited for the side stream; it waits for the device anyway.
            if final:
                torch.cuda.synchronize(self._part.device)
            else:
                torch.cuda.current_stream(self._part.device).synchronize()
        records = [dict(rec) for rec in self._pending]
        steps = [rec["step"] for rec in records]
        old = self._manifest
        manifest = dataclasses.replace(old, shards=list(old.shards), steps=old.steps + records,
                                       partials=list(old.partials), complete=final and stopped is None)
        if final:
            manifest.status, manifest.stop_reason = (STOPPED, stopped) if stopped else (COMPLETE, None)
        target = ""
        try:
            if self.save_raw and records:
                target = f"{SHARD_DIR}/shard-{len(old.shards):06d}.safetensors"
                manifest.shards.append(self._write_shard(target, steps))
                for offset, rec in enumerate(records):
                    rec.update(shard=target, offset=offset)
            journal_bytes = sum(f.bytes for f in manifest.journal_files())
            compact = journal_bytes >= COMPACT_RATIO * BASE_BYTES_PER_ENTRY * sum(s.size for s in self.specs) or (
                final and (manifest.base is None or manifest.base.n_steps < len(manifest.steps)))
            part = self._part.host()
            if manifest.journal == "partials" and records and not compact:
                target = f"{PARTIAL_DIR}/partial-{steps[0]:09d}.accumulators.safetensors"
                manifest.partials.append(self._write_partial(target, steps, part))
            self._acc.merge(part)
            self._part = DeviceStats(self.specs, prev=self._acc.prev)
            if compact:
                target = ACCUMULATORS
                manifest.base, manifest.partials = self._write_base(manifest), []
            target = MANIFEST
            json_dump(manifest.to_json(), self.path / MANIFEST)
        except (OSError, safetensors.SafetensorError) as e:
            self._broken = True
            committed = old.steps
            kept = f"through step {committed[-1]['step']}" if committed else "none yet"
            stopped = f"recording stopped at step {steps[0]}, " if steps else ""
            raise GradlensError(f"{self.path / target}: cannot write it: {write_failure(e)}; {stopped}the run keeps "
                                f"its {len(committed)} committed step(s) ({kept}); free space, then "
                                f"{self.resume_hint}") from e
        except BaseException:
            self._broken = True
            raise
        self._manifest = manifest
        self._pending.clear()
        if manifest.base is not old.base:  # compacted: the previous base and the partials are no longer named
            for file in [ACCUMULATORS_PREV, *(p.file for p in old.partials)]:
                (self.path / file).unlink(missing_ok=True)

    def _write_shard(self, target: str, steps: list[int]) -> TensorFile:
        path = self.path / target
        path.parent.mkdir(exist_ok=True)
        n = len(self._pending)
        tensors = {f"m{i}": buf[:n] for i, buf in enumerate(self._buffers)}
        crcs = {key: crc32(t.view(torch.uint8).numpy()) for key, t in tensors.items()}
        meta = {"format": SHARD_FORMAT, "steps": json.dumps(steps)}
        atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=meta))
        return TensorFile(target, steps, path.stat().st_size, crcs)

    def _write_partial(self, target: str, steps: list[int], part: StreamingStats) -> TensorFile:
        """The pending commit's own sums (zero-based), its per-step series and its last gradient."""
        path = self.path / target
        path.parent.mkdir(exist_ok=True)
        tensors = part.to_tensors()
        meta = {"format": ACC_FORMAT, "steps": json.dumps(steps)}
        atomic_write(path, lambda tmp: safetensors.numpy.save_file(tensors, tmp, metadata=meta))
        return TensorFile(target, steps, path.stat().st_size, {key: crc32(a) for key, a in tensors.items()})

    def _write_base(self, manifest: Manifest) -> Base:
        """Write the statistics of every step of ``manifest`` as the next base; the committed base stays readable as
        ``.prev`` until the manifest names the new one."""
        generation = manifest.base.generation + 1 if manifest.base else 1
        tensors = self._acc.to_tensors()
        meta = {"format": ACC_FORMAT, "generation": str(generation)}
        current = self.path / ACCUMULATORS
        if current.exists():
            os.replace(current, self.path / ACCUMULATORS_PREV)
        atomic_write(current, lambda tmp: safetensors.numpy.save_file(tensors, tmp, metadata=meta))
        return Base(generation, len(manifest.steps), current.stat().st_size,
                    {key: crc32(a) for key, a in tensors.items()})

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
