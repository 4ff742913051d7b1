"""Reading a run directory: :func:`open_run` validates the manifest and every shard's framing up front, then
:class:`Run` reads gradients lazily, one module and one shard at a time, checking each tensor's crc32 as it loads it.
:func:`accumulator_state` merges the statistics (base + journal); :func:`verify_run` checks every byte.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

from gradlens.errors import GradlensError
from gradlens.fsio import safetensors_header
from gradlens.modules import ModuleSpec
from gradlens.stats.streaming import Accumulators, StreamingStats
from gradlens.store.format import (
    ACCUMULATORS,
    MANIFEST,
    Manifest,
    TensorFile,
    check_accumulators,
    check_crc,
    check_shard,
    find_base,
    load_accumulator_file,
    parse_manifest,
    read_manifest_json,
)


def read_shard_tensors(run_dir: Path, shard: TensorFile, specs: list[ModuleSpec], indices: Iterable[int],
                       dtype: str) -> list[np.ndarray]:
    """Whole tensors ``m{i}`` of one shard as float32 ``(n, d_out, r)``, each checked against its crc32.

    ``dtype``: the run's storage dtype (the manifest's, which :func:`check_shard` holds every tensor to). float32 and
    float16 shards are read with numpy; only bfloat16 ones need torch, whose import would otherwise be most of a small
    analysis's fixed cost.
    """
    indices = list(indices)
    path = run_dir / shard.file
    numpy_dtypes = dtype != "bfloat16"
    try:
        if numpy_dtypes:
            with safetensors.safe_open(path, framework="np") as f:
                tensors = [f.get_tensor(f"m{i}") for i in indices]
        else:
            import torch  # here, not at import: bf16 shards need torch to read, the report's import must not

            with safetensors.safe_open(path, framework="pt") as f:
                tensors = [f.get_tensor(f"m{i}") for i in indices]
    except (OSError, safetensors.SafetensorError) as e:
        raise GradlensError(f"{path}: cannot read shard ({e})") from None
    out = []
    for i, t in zip(indices, tensors, strict=True):
        raw = t.view(np.uint8) if numpy_dtypes else t.view(torch.uint8).numpy()
        check_crc(path, f"m{i}", raw, shard.crc32, f"module {specs[i].name}, {shard.span}")
        out.append(t.astype(np.float32, copy=False) if numpy_dtypes else t.to(torch.float32).numpy())
    return out


def accumulator_state(run_dir: Path, manifest: Manifest) -> tuple[Path, StreamingStats]:
    """The statistics of every committed step: the base, then each commit of the journal merged in order (from its
    partials file, or summed again from its float32 shard). Returns the base's path and the merged state."""
    specs = manifest.modules
    path, state = run_dir / ACCUMULATORS, StreamingStats(specs)
    if manifest.base is not None:
        path = find_base(run_dir, manifest.base)
        state = StreamingStats.from_tensors(specs, load_accumulator_file(path, specs, manifest.base.bytes,
                                                                         manifest.base.crc32))
    nonfinite = set(manifest.nonfinite_steps)
    for entry in manifest.journal_files():
        if manifest.journal == "partials":
            tensors = load_accumulator_file(run_dir / entry.file, specs, entry.bytes, entry.crc32)
            part = StreamingStats.from_tensors(specs, tensors)
        else:
            check_shard(run_dir, entry, specs, manifest.dtype)
            import torch

            from gradlens.stats.device import DeviceStats  # torch, as the writer: the same sums, bitwise

            arrays = read_shard_tensors(run_dir, entry, specs, range(len(specs)), manifest.dtype)
            summed = DeviceStats(specs, prev=state.prev)
            for j, step in enumerate(entry.steps):
                if step not in nonfinite:
                    summed.add(step, [torch.from_numpy(a[j]) for a in arrays])
            part = summed.host()
        state.merge(part)
    return path, state


class Run:
    """A recorded run opened for reading; gradients are read lazily, one module and one shard at a time.

    ``meta`` is the manifest's JSON as a plain dict; ``manifest`` the validated :class:`Manifest`.
    """

    def __init__(self, path: Path, manifest: Manifest, meta: dict[str, Any], skipped: list[tuple[str, str]]) -> None:
        self.path = path
        self.manifest = manifest
        self.specs: list[ModuleSpec] = manifest.modules
        self.meta = meta
        self.skipped = skipped
        bad = {file for file, _ in skipped}
        self.step_records: list[dict[str, Any]] = [r for r in manifest.steps if r.get("shard") not in bad]
        self.steps: list[int] = [r["step"] for r in self.step_records]
        self._where = {r["step"]: (r["shard"], r["offset"]) for r in self.step_records}
        self._shards = {s.file: s for s in manifest.shards if s.file not in bad}

    @property
    def modules(self) -> list[str]:
        return [s.name for s in self.specs]

    def _module_index(self, module: str) -> int:
        try:
            return self.modules.index(module)
        except ValueError:
            raise GradlensError(f"{self.path / MANIFEST}: no module named {module!r}") from None

    def _require_raw(self) -> None:
        if not self.manifest.save_raw:
            raise GradlensError(f"{self.path / MANIFEST}: raw shards were not saved (save_raw=False); "
                                "only accumulators are available")

    def gradients(self, module: str, steps: Sequence[int] | None = None) -> np.ndarray:
        """Float32 ``(T, d_out, r)`` gradients of one module for ``steps`` (default: all), read shard by shard (each
        shard's whole tensor, so its checksum can be checked)."""
        self._require_raw()
        i = self._module_index(module)
        steps = self.steps if steps is None else [int(s) for s in steps]
        missing = [s for s in steps if s not in self._where]
        if missing:
            raise GradlensError(f"{self.path / MANIFEST}: step(s) {missing[:5]} not among the run's readable steps")
        out = np.empty((len(steps), *self.specs[i].shape), np.float32)
        rows_by_shard: dict[str, list[int]] = {}
        for row, s in enumerate(steps):
            rows_by_shard.setdefault(self._where[s][0], []).append(row)
        for file, rows in rows_by_shard.items():
            (array,) = read_shard_tensors(self.path, self._shards[file], self.specs, [i], self.manifest.dtype)
            out[rows] = array[[self._where[steps[row]][1] for row in rows]]
        return out

    def iter_steps(self, modules: Sequence[str] | None = None) -> Iterator[tuple[list[int], list[np.ndarray]]]:
        """Yield ``(steps, arrays)`` shard by shard, one float32 ``(n, d_out, r)`` array per selected module.

        For out-of-core passes: at most one shard of the selected modules is in memory at a time.
        """
        self._require_raw()
        idx = [self._module_index(m) for m in modules] if modules is not None else list(range(len(self.specs)))
        for shard in self._shards.values():
            yield list(shard.steps), read_shard_tensors(self.path, shard, self.specs, idx, self.manifest.dtype)

    def step_vector(self, step: int) -> np.ndarray:
        """All modules' gradients at one step, flattened and concatenated in manifest order (float32)."""
        self._require_raw()
        if step not in self._where:
            raise GradlensError(f"{self.path / MANIFEST}: step {step} is not among the run's readable steps")
        file, offset = self._where[step]
        arrays = read_shard_tensors(self.path, self._shards[file], self.specs, range(len(self.specs)),
                                    self.manifest.dtype)
        return np.concatenate([a[offset].ravel() for a in arrays])

    def accumulators(self) -> Accumulators:
        """The float64 accumulators of every committed step (finite steps only), merged from base and journal."""
        path, state = accumulator_state(self.path, self.manifest)
        return state.accumulators(path)


def open_run(path: str | os.PathLike[str], *, skip_bad: bool = False) -> Run:
    """Open a run directory for reading, validating every listed shard's framing up front.

    With ``skip_bad`` a missing or corrupt shard does not raise: its steps are dropped and ``(file, reason)`` is
    recorded in ``Run.skipped``. (Checksums are checked as tensors are read: :func:`verify_run` reads them all.)
    """
    run_dir = Path(path)
    meta = read_manifest_json(run_dir)
    manifest = parse_manifest(meta, run_dir)
    skipped: list[tuple[str, str]] = []
    for shard in manifest.shards:
        try:
            check_shard(run_dir, shard, manifest.modules, manifest.dtype)
        except GradlensError as e:
            if not skip_bad:
                raise
            skipped.append((shard.file, str(e)))
    return Run(run_dir, manifest, meta, skipped)


@dataclass
class Checked:
    """One tensor (or, where a whole file failed its framing, one file: ``tensor`` "*") that :func:`verify_run`
    read: ``checksum`` says whether a crc32 was there to compare (format-1 runs have none); ``error`` is None if ok."""

    file: str
    tensor: str
    bytes: int
    checksum: bool
    error: str | None = None


def verify_run(path: str | os.PathLike[str]) -> tuple[Manifest, list[Checked]]:
    """Read every byte of every shard and accumulator file the manifest lists, checking every tensor's crc32."""
    run_dir = Path(path)
    manifest = parse_manifest(read_manifest_json(run_dir), run_dir)
    checked: list[Checked] = []
    for shard in manifest.shards:
        try:
            header = check_shard(run_dir, shard, manifest.modules, manifest.dtype)
        except GradlensError as e:
            checked.append(Checked(shard.file, "*", 0, False, str(e)))
            continue
        for i in range(len(manifest.modules)):
            size = header[f"m{i}"]["data_offsets"][1] - header[f"m{i}"]["data_offsets"][0]
            try:
                read_shard_tensors(run_dir, shard, manifest.modules, [i], manifest.dtype)
                checked.append(Checked(shard.file, f"m{i}", size, shard.crc32 is not None))
            except GradlensError as e:
                checked.append(Checked(shard.file, f"m{i}", size, True, str(e)))
    files: list[tuple[Path | None, int | None, dict[str, int] | None]] = []
    if manifest.base is not None:
        try:
            files.append((find_base(run_dir, manifest.base), manifest.base.bytes, manifest.base.crc32))
        except GradlensError as e:
            checked.append(Checked(ACCUMULATORS, "*", 0, False, str(e)))
    files += [(run_dir / p.file, p.bytes, p.crc32) for p in manifest.partials]
    for file, size, crcs in files:
        checked += _verify_accumulator_file(run_dir, file, manifest.modules, size, crcs)
    return manifest, checked


def _verify_accumulator_file(run_dir: Path, path: Path, specs: list[ModuleSpec], size: int | None,
                             crcs: dict[str, int] | None) -> list[Checked]:
    name = str(path.relative_to(run_dir))
    try:
        safetensors_header(path, "accumulators")
        if size is not None and path.stat().st_size != size:
            raise GradlensError(f"{path}: size {path.stat().st_size} bytes differs from the manifest's {size}")
        tensors = safetensors.numpy.load_file(path)
    except (GradlensError, safetensors.SafetensorError, OSError) as e:
        return [Checked(name, "*", 0, False, str(e))]
    out = []
    for key, array in tensors.items():
        try:
            check_crc(path, key, array, crcs, "accumulators")
            out.append(Checked(name, key, array.nbytes, crcs is not None))
        except GradlensError as e:
            out.append(Checked(name, key, array.nbytes, True, str(e)))
    try:
        missing = sorted(set(crcs or ()) - set(tensors))
        if missing:
            raise GradlensError(f"{path}: tensor(s) {missing[:3]} the manifest lists are missing")
        check_accumulators(path, tensors, specs)
    except GradlensError as e:
        out.append(Checked(name, "*", 0, False, str(e)))
    return out
