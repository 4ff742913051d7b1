"""The on-disk store for recorded LoRA-B gradients: this module alone owns the run-directory format.

A run directory holds ``manifest.json`` (the commit point: only what it lists exists), raw gradient shards under
``shards/`` and ``accumulators.safetensors`` (float64 running sums, so analyses that need only moments never read the
shards). Every file is replaced atomically, in the order shard -> accumulators -> manifest, so a process killed at any
moment leaves a directory that reads back fully up to its last manifest. Nothing is ever pickled.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy
import safetensors.torch
import torch

from gradlens.errors import GradlensError
from gradlens.provenance import package_versions

FORMAT = "gradlens-run"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ACCUMULATORS = "accumulators.safetensors"
# The accumulators of the previous commit: the manifest may still point at them if a kill lands between the two writes.
ACCUMULATORS_PREV = "accumulators.prev.safetensors"
SHARD_DIR = "shards"
SHARD_FORMAT = "gradlens-shard"
LOCK = ".lock"
MAX_HEADER_BYTES = 100 * 2**20
# What a writer killed before its first manifest leaves behind; without a manifest none of it holds a step.
_WRITER_LEFTOVERS = (LOCK, ACCUMULATORS, ACCUMULATORS_PREV, f".{ACCUMULATORS}.tmp", f".{MANIFEST}.tmp")

# Storage dtype name -> (torch dtype, safetensors header dtype).
DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float32": (torch.float32, "F32"),
    "bfloat16": (torch.bfloat16, "BF16"),
    "float16": (torch.float16, "F16"),
}
_ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_PROJ = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
         "down_proj": "down"}
_LAYER_CONTAINERS = ("layers", "layer", "h", "blocks")
_RESERVED_META = ("step", "shard", "offset", "nonfinite")
_ACC_SUMS = ("sum", "sumsq", "sumabs", "sumsign")


@dataclass(frozen=True)
class ModuleSpec:
    """One recorded LoRA-B weight: its name, its ``(d_out, r)`` shape and where it sits in the model."""

    name: str
    shape: tuple[int, int]
    proj: str
    layer: int | None

    @classmethod
    def from_name(cls, name: str, shape: Sequence[int]) -> ModuleSpec:
        """Derive ``proj`` and ``layer`` from a dotted module name such as ``model.layers.3.mlp.up_proj``."""
        parts = name.split(".")
        pairs = zip(parts, parts[1:], strict=False)
        layer = next((int(nxt) for part, nxt in pairs if part in _LAYER_CONTAINERS and nxt.isdigit()), None)
        if len(shape) != 2:
            raise GradlensError(f"{name}: lora_B shape {tuple(shape)} is not (d_out, r)")
        d_out, r = (int(n) for n in shape)
        return cls(name=name, shape=(d_out, r), proj=_PROJ.get(parts[-1], parts[-1]), layer=layer)

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass
class ModuleAccumulator:
    """Float64 moments of one module's gradients over the ``count`` finite steps recorded so far.

    ``sqnorm[t]`` is the squared norm of accumulated step t and ``dot_prev[t]`` its dot product with the previous
    accumulated step (NaN for the first): the raw material for gradient-noise and autocorrelation estimates.
    """

    count: int
    sum: np.ndarray
    sumsq: np.ndarray
    sumabs: np.ndarray
    sumsign: np.ndarray
    nonzero: np.ndarray
    sqnorm: np.ndarray
    dot_prev: np.ndarray


@dataclass
class Accumulators:
    """All modules' accumulators; ``steps`` are the accumulated (finite) steps the per-step series refer to."""

    path: Path
    steps: np.ndarray
    modules: dict[str, ModuleAccumulator]

    def __getitem__(self, name: str) -> ModuleAccumulator:
        if name not in self.modules:
            raise GradlensError(f"{self.path}: no module named {name!r}")
        return self.modules[name]


# --------------------------------------------------------------------------------------------------------------------
# Small file helpers


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through ``write(tmp)`` into a temp file next to ``path``, fsync it and rename it over ``path``.

    A failed write removes its temp file (on a full disk it would only hold space) and leaves ``path`` untouched.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def _write_failure(e: BaseException) -> str:
    """Why a write failed, in words: a full disk is named as such whichever layer (OS or safetensors) reported it."""
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    if getattr(e, "errno", None) == errno.ENOSPC or f"os error {errno.ENOSPC})" in text:
        return "disk full (no space left on device)"
    return text.splitlines()[0] if text else type(e).__name__


def writer_leftovers_only(path: str | os.PathLike[str], also: Sequence[str] = ()) -> bool:
    """True if ``path`` has no manifest and holds only what a writer killed before its first commit leaves behind
    (lock, accumulators, temp files) and the names in ``also``: such a directory holds no step and may be reused."""
    run_dir = Path(path)
    if not run_dir.exists():
        return True
    if not run_dir.is_dir() or (run_dir / MANIFEST).exists():
        return False
    return all(p.name in (*_WRITER_LEFTOVERS, *also) for p in run_dir.iterdir())


def _json_dump(obj: Any, path: Path) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1) + "\n"))


def _safe_relpath(run_dir: Path, name: Any, where: Path) -> Path:
    """Resolve a file name from the manifest, refusing anything that could point outside the run directory."""
    pure = PurePosixPath(name) if isinstance(name, str) else None
    if pure is None or not name or pure.is_absolute() or ".." in pure.parts or "\\" in name:
        raise GradlensError(f"{where}: shard file name {name!r} is not a relative path inside the run directory")
    path = run_dir / pure
    if not path.resolve().is_relative_to(run_dir.resolve()):
        raise GradlensError(f"{where}: shard file name {name!r} resolves outside the run directory")
    return path


def _safetensors_header(path: Path, what: str) -> dict[str, Any]:
    """Validate a safetensors file's framing before any tensor is read; returns its parsed header.

    The header length is checked against a sane bound and the file size must equal 8 + header + data exactly, so a
    truncated write, a corrupt header or a foreign file (a pickle) is refused without allocating or deserialising.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise GradlensError(f"{path}: {what} file missing") from None
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise GradlensError(f"{path}: truncated {what} file ({size} bytes)")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES:
            raise GradlensError(f"{path}: not a safetensors file (header length {n} bytes is absurd)")
        if 8 + n > size:
            raise GradlensError(f"{path}: truncated {what} file (header needs {8 + n} bytes, file has {size})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        raise GradlensError(f"{path}: not a safetensors file (header is not valid JSON)") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise GradlensError(f"{path}: not a safetensors file (header is not a JSON object of tensors)")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            start, stop = (int(x) for x in info["data_offsets"])
            nbytes = math.prod(int(d) for d in info["shape"]) * _ITEMSIZE[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise GradlensError(f"{path}: corrupt safetensors header (bad entry for {key!r})") from None
        if start < 0 or stop - start != nbytes:
            raise GradlensError(f"{path}: corrupt safetensors header ({key!r} has {stop - start} bytes, not {nbytes})")
        end = max(end, stop)
    if size != 8 + n + end:
        raise GradlensError(f"{path}: truncated or corrupt {what} file ({size} bytes, header says {8 + n + end})")
    return header


# --------------------------------------------------------------------------------------------------------------------
# Manifest


def _spec_to_json(spec: ModuleSpec) -> dict[str, Any]:
    return {"name": spec.name, "shape": list(spec.shape), "proj": spec.proj, "layer": spec.layer}


def _load_manifest(run_dir: Path) -> dict[str, Any]:
    """Read and check ``manifest.json``; every problem becomes a one-line GradlensError naming the file."""
    if not run_dir.is_dir():
        raise GradlensError(f"{run_dir}: run directory does not exist")
    path = run_dir / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise GradlensError(f"{path}: manifest missing (not a gradlens run directory)") from None
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise GradlensError(f"{path}: manifest is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise GradlensError(f"{path}: not a gradlens run manifest (format is not {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise GradlensError(f"{path}: format_version {manifest.get('format_version')!r} is not supported "
                            f"(this gradlens reads {FORMAT_VERSION})")
    try:
        manifest["_specs"] = [ModuleSpec(m["name"], (int(m["shape"][0]), int(m["shape"][1])), m["proj"], m["layer"])
                              for m in manifest["modules"]]
        if manifest["dtype"] not in DTYPES:
            raise ValueError(f"unknown dtype {manifest['dtype']!r}")
        for shard in manifest["shards"]:
            _safe_relpath(run_dir, shard["file"], path)
            shard["steps"] = [int(s) for s in shard["steps"]]
            shard["bytes"] = int(shard["bytes"])
        shard_steps = {shard["file"]: shard["steps"] for shard in manifest["shards"]}
        for rec in manifest["steps"]:
            rec["step"] = int(rec["step"])
            if manifest["save_raw"] and (rec["offset"] < 0 or shard_steps[rec["shard"]][rec["offset"]] != rec["step"]):
                raise ValueError(f"step {rec['step']} is not at offset {rec['offset']} of {rec['shard']}")
        int(manifest["accumulators"]["generation"])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise GradlensError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None
    return manifest


def _public_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in manifest.items() if not k.startswith("_")}


# --------------------------------------------------------------------------------------------------------------------
# Accumulators


class _AccumulatorState:
    """Running float64 sums per module, fed the float32 gradient before any cast to the storage dtype."""

    def __init__(self, specs: list[ModuleSpec]) -> None:
        self.specs = specs
        self.steps: list[int] = []
        self.sums = [{k: np.zeros(s.shape, np.float64) for k in _ACC_SUMS} for s in specs]
        self.nonzero = [np.zeros(s.shape, np.int64) for s in specs]
        self.sqnorm: list[list[float]] = [[] for _ in specs]
        self.dot_prev: list[list[float]] = [[] for _ in specs]
        self.prev: list[np.ndarray | None] = [None for _ in specs]

    def add(self, step: int, grads: list[np.ndarray]) -> None:
        self.steps.append(step)
        for i, g in enumerate(grads):
            g64 = g.astype(np.float64)
            sums = self.sums[i]
            sums["sum"] += g64
            sums["sumsq"] += g64 * g64
            sums["sumabs"] += np.abs(g64)
            sums["sumsign"] += np.sign(g64)
            self.nonzero[i] += g64 != 0
            flat = g64.ravel()
            self.sqnorm[i].append(float(flat @ flat))
            prev = self.prev[i]
            self.dot_prev[i].append(math.nan if prev is None else float(flat @ prev.astype(np.float64).ravel()))
            self.prev[i] = g.copy()

    def to_tensors(self) -> dict[str, np.ndarray]:
        out = {"steps": np.asarray(self.steps, np.int64)}
        for i in range(len(self.specs)):
            out[f"m{i}.count"] = np.asarray(len(self.steps), np.int64)
            out.update({f"m{i}.{k}": v for k, v in self.sums[i].items()})
            out[f"m{i}.nonzero"] = self.nonzero[i]
            out[f"m{i}.sqnorm"] = np.asarray(self.sqnorm[i], np.float64)
            out[f"m{i}.dot_prev"] = np.asarray(self.dot_prev[i], np.float64)
            if self.prev[i] is not None:
                out[f"m{i}.prev"] = self.prev[i]
        return out

    @classmethod
    def from_tensors(cls, specs: list[ModuleSpec], t: dict[str, np.ndarray]) -> _AccumulatorState:
        state = cls(specs)
        state.steps = [int(s) for s in t["steps"]]
        for i in range(len(specs)):
            state.sums[i] = {k: t[f"m{i}.{k}"].copy() for k in _ACC_SUMS}
            state.nonzero[i] = t[f"m{i}.nonzero"].copy()
            state.sqnorm[i] = t[f"m{i}.sqnorm"].tolist()
            state.dot_prev[i] = t[f"m{i}.dot_prev"].tolist()
            state.prev[i] = t[f"m{i}.prev"].copy() if f"m{i}.prev" in t else None
        return state


def _load_accumulator_tensors(run_dir: Path, manifest: dict[str, Any]) -> tuple[Path, dict[str, np.ndarray]]:
    """Load the accumulators whose generation the manifest names (the previous file survives a mid-commit kill)."""
    want = str(manifest["accumulators"]["generation"])
    path = run_dir / ACCUMULATORS
    for candidate in (path, run_dir / ACCUMULATORS_PREV):
        if not candidate.exists():
            continue
        header = _safetensors_header(candidate, "accumulators")
        if header.get("__metadata__", {}).get("generation") == want:
            try:
                tensors = safetensors.numpy.load_file(candidate)
            except (safetensors.SafetensorError, TypeError, ValueError) as e:
                raise GradlensError(f"{candidate}: cannot read accumulators ({e})") from None
            _check_accumulators(candidate, tensors, manifest["_specs"])
            return candidate, tensors
    raise GradlensError(f"{path}: accumulators missing or not of generation {want} named in the manifest")


def _check_accumulators(path: Path, t: dict[str, np.ndarray], specs: list[ModuleSpec]) -> None:
    if "steps" not in t:
        raise GradlensError(f"{path}: accumulators lack the 'steps' series")
    n = len(t["steps"])
    for i, spec in enumerate(specs):
        expect = {**{k: spec.shape for k in (*_ACC_SUMS, "nonzero")}, "count": (), "sqnorm": (n,), "dot_prev": (n,)}
        if n:
            expect["prev"] = spec.shape
        for key, shape in expect.items():
            if f"m{i}.{key}" not in t or t[f"m{i}.{key}"].shape != shape:
                raise GradlensError(f"{path}: accumulator m{i}.{key} of module {spec.name} is missing or not {shape}")
        if int(t[f"m{i}.count"]) != n:
            raise GradlensError(f"{path}: m{i}.count is {int(t[f'm{i}.count'])} but {n} steps are listed")


# --------------------------------------------------------------------------------------------------------------------
# Writing


class RunWriter:
    """Synchronous writer of one run directory; holds ``.lock`` for its lifetime so two writers never interleave.

    ``add_step`` buffers a step and folds it into the float64 accumulators; every ``steps_per_shard`` steps the buffer
    becomes a shard and the accumulators and manifest are committed. With ``resume=True`` an existing run is continued
    and steps it already holds are skipped, so a trainer restarted from an older checkpoint can replay them.
    """

    def __init__(self, path: str | os.PathLike[str], modules: list[ModuleSpec], *, dtype: str = "float32",
                 save_raw: bool = True, steps_per_shard: int | None = None, shard_bytes: int = 256 * 2**20,
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
        bytes_per_step = sum(s.size for s in modules) * torch.empty((), dtype=DTYPES[dtype][0]).element_size()
        self.steps_per_shard = steps_per_shard or max(1, shard_bytes // bytes_per_step)
        if self.steps_per_shard < 1:
            raise GradlensError(f"RunWriter: steps_per_shard must be >= 1, got {steps_per_shard}")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _acquire_lock(self.path)
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
        self._acc = _AccumulatorState(self.specs)
        self._resumed_through: int | None = None
        self._manifest: dict[str, Any] = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "modules": [_spec_to_json(s) for s in self.specs], "dtype": self.dtype, "save_raw": self.save_raw,
            "steps_per_shard": self.steps_per_shard, "shards": [], "steps": [], "nonfinite_steps": [],
            "accumulators": {"file": ACCUMULATORS, "generation": 0},
            "config": config or {}, "seed": seed, "versions": package_versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "complete": False,
        }
        self._write_accumulators(0)
        _json_dump(self._manifest, self.path / MANIFEST)

    def _resume(self, resume: bool, config: dict[str, Any] | None, seed: int | None) -> None:
        if not resume:
            raise GradlensError(f"{self.path}: already holds a run; pass --resume or choose another --out")
        manifest = _load_manifest(self.path)
        self._check_compatible(manifest)
        found, tensors = _load_accumulator_tensors(self.path, manifest)
        if found.name == ACCUMULATORS_PREV:  # killed mid-commit: make the committed file current again
            os.replace(found, self.path / ACCUMULATORS)
        self._acc = _AccumulatorState.from_tensors(self.specs, tensors)
        self._manifest = _public_manifest(manifest)
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
        """Whole-adapter diagnostics of the steps added so far, cheap enough to compute after every step.

        ``cos_prev``: cosine between the last two added steps; ``sign_stability``: mean over entries of
        ``|sum sign(g)| / count`` (1: every entry kept one sign, ~0: random signs); ``b_grad_norm``: the last norm.
        """
        acc = self._acc
        if not acc.steps:
            return {}
        sq = sum(s[-1] for s in acc.sqnorm)
        out = {"step": float(acc.steps[-1]), "b_grad_norm": math.sqrt(sq), "cos_prev": math.nan}
        if len(acc.steps) >= 2:
            denom = math.sqrt(sq * sum(s[-2] for s in acc.sqnorm))
            out["cos_prev"] = sum(d[-1] for d in acc.dot_prev) / denom if denom > 0 else math.nan
        total = sum(spec.size for spec in self.specs) * len(acc.steps)
        out["sign_stability"] = float(sum(np.abs(s["sumsign"]).sum() for s in acc.sums) / total)
        return out

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
        torch_dtype = DTYPES[self.dtype][0]
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
                _json_dump(self._manifest, self.path / MANIFEST)
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
        clash = [k for k in meta if k in _RESERVED_META]
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
            _json_dump(manifest, self.path / MANIFEST)
        except (OSError, safetensors.SafetensorError) as e:
            self._broken = True
            committed = self._manifest["steps"]
            kept = f"through step {committed[-1]['step']}" if committed else "none yet"
            raise GradlensError(f"{self.path / target}: cannot write it: {_write_failure(e)}; recording stopped at "
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
        _atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=meta))
        return path.stat().st_size

    def _write_accumulators(self, generation: int) -> None:
        """Replace the accumulators, keeping the committed ones as the fallback until the manifest names the new."""
        meta = {"format": "gradlens-accumulators", "generation": str(generation)}
        tensors = self._acc.to_tensors()
        current = self.path / ACCUMULATORS
        if current.exists():
            os.replace(current, self.path / ACCUMULATORS_PREV)
        _atomic_write(current, lambda tmp: safetensors.numpy.save_file(tensors, tmp, metadata=meta))

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None


def _acquire_lock(run_dir: Path) -> int:
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


# --------------------------------------------------------------------------------------------------------------------
# Reading


class Run:
    """A recorded run opened for reading; gradients are read lazily, one module and one shard at a time."""

    def __init__(self, path: Path, manifest: dict[str, Any], skipped: list[tuple[str, str]]) -> None:
        self.path = path
        self.specs: list[ModuleSpec] = manifest["_specs"]
        self.meta = _public_manifest(manifest)
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
        found, t = _load_accumulator_tensors(self.path, self._manifest)
        modules = {
            spec.name: ModuleAccumulator(
                count=int(t[f"m{i}.count"]), sum=t[f"m{i}.sum"], sumsq=t[f"m{i}.sumsq"], sumabs=t[f"m{i}.sumabs"],
                sumsign=t[f"m{i}.sumsign"], nonzero=t[f"m{i}.nonzero"], sqnorm=t[f"m{i}.sqnorm"],
                dot_prev=t[f"m{i}.dot_prev"])
            for i, spec in enumerate(self.specs)
        }
        return Accumulators(path=found, steps=t["steps"], modules=modules)


def _check_shard(run_dir: Path, shard: dict[str, Any], specs: list[ModuleSpec], dtype: str) -> None:
    """Check a shard's framing, tensors and step list against the manifest before anything is read from it."""
    path = _safe_relpath(run_dir, shard["file"], run_dir / MANIFEST)
    header = _safetensors_header(path, "shard")
    if path.stat().st_size != shard["bytes"]:
        raise GradlensError(f"{path}: size {path.stat().st_size} bytes differs from the manifest's {shard['bytes']}")
    n = len(shard["steps"])
    st_dtype = DTYPES[dtype][1]
    for i, spec in enumerate(specs):
        info = header.get(f"m{i}")
        if info is None or info["shape"] != [n, *spec.shape] or info["dtype"] != st_dtype:
            raise GradlensError(f"{path}: tensor m{i} ({spec.name}) is missing or not {st_dtype} {[n, *spec.shape]}")
    meta = header.get("__metadata__", {})
    if meta.get("format") != SHARD_FORMAT:
        raise GradlensError(f"{path}: not a gradlens shard (metadata format is {meta.get('format')!r})")
    try:
        steps = json.loads(meta.get("steps", "null"))
    except (TypeError, ValueError):
        steps = None
    if steps != shard["steps"]:
        raise GradlensError(f"{path}: shard steps do not match the manifest")


def open_run(path: str | os.PathLike[str], *, skip_bad: bool = False) -> Run:
    """Open a run directory for reading, validating every listed shard's framing up front.

    With ``skip_bad`` a missing or corrupt shard does not raise: its steps are dropped and ``(file, reason)`` is
    recorded in ``Run.skipped``. Accumulators cover all committed steps either way.
    """
    run_dir = Path(path)
    manifest = _load_manifest(run_dir)
    skipped: list[tuple[str, str]] = []
    for shard in manifest["shards"]:
        try:
            _check_shard(run_dir, shard, manifest["_specs"], manifest["dtype"])
        except GradlensError as e:
            if not skip_bad:
                raise
            skipped.append((shard["file"], str(e)))
    return Run(run_dir, manifest, skipped)
