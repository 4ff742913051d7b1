"""Reading a run directory: :func:`open_run` validates the manifest and every shard's framing up front, then
:class:`Run` reads gradients lazily, one module and one shard at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import safetensors

from gradlens.errors import GradlensError
from gradlens.modules import ModuleSpec
from gradlens.stats.streaming import Accumulators, ModuleAccumulator
from gradlens.store.format import MANIFEST, check_shard, load_accumulator_tensors, load_manifest, public_manifest


class Run:
    """A recorded run opened for reading; gradients are read lazily, one module and one shard at a time."""

    def __init__(self, path: Path, manifest: dict[str, Any], skipped: list[tuple[str, str]]) -> None:
        self.path = path
        self.specs: list[ModuleSpec] = manifest["_specs"]
        self.meta = public_manifest(manifest)
        self.skipped = skipped
        self._manifest = manifest
        bad = {file for file, _ in skipped}
        self.step_records: list[dict[str, Any]] = [r for r in manifest["steps"] if r.get("shard") not in bad]
        self.steps: list[int] = [r["step"] for r in self.step_records]
        self._where = {r["step"]: (r["shard"], r["offset"]) for r in self.step_records}
        self._shards = [s for s in manifest["shards"] if s["file"] not in bad]

    @property
    def modules(self) -> list[str]:
        return [s.name for s in self.specs]

    def _module_index(self, module: str) -> int:
        try:
            return self.modules.index(module)
        except ValueError:
            raise GradlensError(f"{self.path / MANIFEST}: no module named {module!r}") from None

    def _require_raw(self) -> None:
        if not self._manifest["save_raw"]:
            raise GradlensError(f"{self.path / MANIFEST}: raw shards were not saved (save_raw=False); "
                                "only accumulators are available")

    def _read(self, file: str, keys: list[str], offsets: list[int] | None = None) -> list[np.ndarray]:
        """Read tensors of one shard as float32: whole, or only the given step offsets (reading just their span)."""
        import torch  # here, not at import: bf16 shards need torch to read, the report's import must not

        path = self.path / file
        try:
            with safetensors.safe_open(path, framework="pt") as f:
                if offsets is None:
                    tensors = [f.get_tensor(k) for k in keys]
                else:
                    lo, hi = min(offsets), max(offsets) + 1
                    rel = [o - lo for o in offsets]
                    tensors = [f.get_slice(k)[lo:hi][rel] for k in keys]
        except (OSError, safetensors.SafetensorError) as e:
            raise GradlensError(f"{path}: cannot read shard ({e})") from None
        return [t.to(torch.float32).numpy() for t in tensors]

    def gradients(self, module: str, steps: Sequence[int] | None = None) -> np.ndarray:
        """Float32 ``(T, d_out, r)`` gradients of one module for ``steps`` (default: all), read shard by shard."""
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
            (out[rows],) = self._read(file, [f"m{i}"], [self._where[steps[row]][1] for row in rows])
        return out

    def iter_steps(self, modules: Sequence[str] | None = None) -> Iterator[tuple[list[int], list[np.ndarray]]]:
        """Yield ``(steps, arrays)`` shard by shard, one float32 ``(n, d_out, r)`` array per selected module.

        For out-of-core passes: at most one shard of the selected modules is in memory at a time.
        """
        self._require_raw()
        idx = [self._module_index(m) for m in modules] if modules is not None else list(range(len(self.specs)))
        for shard in self._shards:
            yield list(shard["steps"]), self._read(shard["file"], [f"m{i}" for i in idx])

    def step_vector(self, step: int) -> np.ndarray:
        """All modules' gradients at one step, flattened and concatenated in manifest order (float32)."""
        self._require_raw()
        if step not in self._where:
            raise GradlensError(f"{self.path / MANIFEST}: step {step} is not among the run's readable steps")
        file, offset = self._where[step]
        arrays = self._read(file, [f"m{i}" for i in range(len(self.specs))], [offset])
        return np.concatenate([a.ravel() for a in arrays])

    def accumulators(self) -> Accumulators:
        """The float64 accumulators consistent with the manifest (finite steps only)."""
        found, t = load_accumulator_tensors(self.path, self._manifest)
        modules = {
            spec.name: ModuleAccumulator(
                count=int(t[f"m{i}.count"]), sum=t[f"m{i}.sum"], sumsq=t[f"m{i}.sumsq"], sumabs=t[f"m{i}.sumabs"],
                sumsign=t[f"m{i}.sumsign"], nonzero=t[f"m{i}.nonzero"], sqnorm=t[f"m{i}.sqnorm"],
                dot_prev=t[f"m{i}.dot_prev"])
            for i, spec in enumerate(self.specs)
        }
        return Accumulators(path=found, steps=t["steps"], modules=modules)


def open_run(path: str | os.PathLike[str], *, skip_bad: bool = False) -> Run:
    """Open a run directory for reading, validating every listed shard's framing up front.

    With ``skip_bad`` a missing or corrupt shard does not raise: its steps are dropped and ``(file, reason)`` is
    recorded in ``Run.skipped``. Accumulators cover all committed steps either way.
    """
    run_dir = Path(path)
    manifest = load_manifest(run_dir)
    skipped: list[tuple[str, str]] = []
    for shard in manifest["shards"]:
        try:
            check_shard(run_dir, shard, manifest["_specs"], manifest["dtype"])
        except GradlensError as e:
            if not skip_bad:
                raise
            skipped.append((shard["file"], str(e)))
    return Run(run_dir, manifest, skipped)
