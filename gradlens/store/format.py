"""The run-directory format: file names, the :class:`Manifest` and its validation, checksums, and the checks every
file passes before it is read. The writer (:mod:`.writer`) and the reader (:mod:`.reader`) both follow it; nothing
else knows it.

A run directory holds ``manifest.json`` (the commit point: only what it lists exists), raw gradient shards under
``shards/``, the compacted float64 statistics in ``accumulators.safetensors`` (the *base*) and, for the commits since
the last compaction, the *journal* the statistics are rebuilt from: the float32 shards themselves (which hold the exact
input), or one partial-sums file per commit under ``partials/`` (when the shards are half precision, or not saved).
Every shard and accumulator tensor has a crc32 in the manifest. Nothing is ever pickled.

Format 2 (this one) added the journal and the checksums; format 1 (one accumulators file rewritten at every commit,
no checksums) is still read, not resumed.
"""

from __future__ import annotations

import errno
import json
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

from gradlens.errors import GradlensError
from gradlens.fsio import safetensors_header
from gradlens.modules import ModuleSpec
from gradlens.provenance import package_versions
from gradlens.stats.streaming import ACC_SUMS, FLOAT_SUMS

FORMAT = "gradlens-run"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
ACCUMULATORS = "accumulators.safetensors"
# The base of the previous compaction: the manifest may still name it if a kill lands inside a compaction.
ACCUMULATORS_PREV = "accumulators.prev.safetensors"
SHARD_DIR = "shards"
PARTIAL_DIR = "partials"
SHARD_FORMAT = "gradlens-shard"
ACC_FORMAT = "gradlens-accumulators"
# What rebuilds the statistics of the commits after the base: their float32 shards, or their partial-sums files.
JOURNALS = ("shards", "partials")
LOCK = ".lock"
# What a writer killed before its first manifest leaves behind; without a manifest none of it holds a step.
WRITER_LEFTOVERS = (LOCK, ACCUMULATORS, ACCUMULATORS_PREV, f".{ACCUMULATORS}.tmp", f".{MANIFEST}.tmp")

# Storage dtype name -> safetensors header dtype (the torch dtype of the same name is used to write and read).
DTYPES: dict[str, str] = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
RESERVED_META = ("step", "shard", "offset", "nonfinite")


def write_failure(e: BaseException) -> str:
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
    return all(p.name in (*WRITER_LEFTOVERS, *also) for p in run_dir.iterdir())


def safe_relpath(run_dir: Path, name: Any, where: Path) -> Path:
    """Resolve a file name from the manifest, refusing anything that could point outside the run directory."""
    pure = PurePosixPath(name) if isinstance(name, str) else None
    if pure is None or not name or pure.is_absolute() or ".." in pure.parts or "\\" in name:
        raise GradlensError(f"{where}: shard file name {name!r} is not a relative path inside the run directory")
    path = run_dir / pure
    if not path.resolve().is_relative_to(run_dir.resolve()):
        raise GradlensError(f"{where}: shard file name {name!r} resolves outside the run directory")
    return path


def crc32(data: Any) -> int:
    """zlib crc32 of an array's (C-contiguous) bytes, as safetensors stores them (little-endian)."""
    return zlib.crc32(np.ascontiguousarray(data).reshape(-1).view(np.uint8))


def _int(x: Any) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise ValueError(f"{x!r} is not an integer")
    return x


def _crcs(obj: Any) -> dict[str, int]:
    if not isinstance(obj, dict) or not all(isinstance(k, str) and 0 <= _int(v) < 2**32 for k, v in obj.items()):
        raise ValueError(f"crc32 {obj!r} is not a table of tensor name -> 32-bit checksum")
    return dict(obj)


@dataclass
class TensorFile:
    """A tensor file the manifest lists (a shard or a partial): the steps it holds, its size and per-tensor crc32
    (``None`` in format-1 runs, written before checksums)."""

    file: str
    steps: list[int]
    bytes: int
    crc32: dict[str, int] | None

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "steps": self.steps, "bytes": self.bytes, "crc32": self.crc32}

    @classmethod
    def from_json(cls, obj: dict[str, Any], run_dir: Path, checksums: bool) -> TensorFile:
        safe_relpath(run_dir, obj["file"], run_dir / MANIFEST)
        steps = [_int(s) for s in obj["steps"]]
        return cls(obj["file"], steps, _int(obj["bytes"]), _crcs(obj["crc32"]) if checksums else None)

    @property
    def span(self) -> str:
        return f"steps {self.steps[0]}..{self.steps[-1]}" if self.steps else "no steps"


@dataclass
class Base:
    """The compacted statistics of the run's first ``n_steps`` step records, in ``accumulators.safetensors`` (or
    ``.prev`` while a compaction replaces it), told apart by ``generation`` (in the file's metadata too)."""

    generation: int
    n_steps: int
    bytes: int | None = None
    crc32: dict[str, int] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"file": ACCUMULATORS, "generation": self.generation, "n_steps": self.n_steps, "bytes": self.bytes,
                "crc32": self.crc32}


@dataclass
class Manifest:
    """``manifest.json``, validated: what a run holds and where. ``steps`` are the per-step records (the writer's
    ``step``, ``shard``, ``offset``, ``nonfinite`` and the caller's metadata); ``base`` + the journal after it
    (``journal_files``) are the statistics."""

    modules: list[ModuleSpec]
    dtype: str
    save_raw: bool
    steps_per_shard: int
    journal: str
    config: dict[str, Any]
    seed: int | None
    shards: list[TensorFile] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    base: Base | None = None
    partials: list[TensorFile] = field(default_factory=list)
    versions: dict[str, Any] = field(default_factory=package_versions)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    complete: bool = False
    format_version: int = FORMAT_VERSION
    # The run's state (see :mod:`.runstate`): ``writing`` (by ``writer``: pid and host), ``complete`` or ``stopped``
    # (``stop_reason``); ``planned_steps`` is the Trainer's max_steps. None in runs written before gradlens kept them.
    status: str | None = None
    planned_steps: int | None = None
    stop_reason: str | None = None
    writer: dict[str, Any] | None = None

    @property
    def nonfinite_steps(self) -> list[int]:
        return [r["step"] for r in self.steps if r.get("nonfinite")]

    @property
    def journal_steps(self) -> list[dict[str, Any]]:
        """The step records after the base: the commits whose statistics the journal holds."""
        return self.steps[self.base.n_steps if self.base else 0:]

    def journal_files(self) -> list[TensorFile]:
        """The files the statistics after the base are rebuilt from, in commit order (shards or partials)."""
        if self.journal == "partials":
            return self.partials
        covered, n = 0, self.base.n_steps if self.base else 0
        for j, shard in enumerate(self.shards):
            if covered == n:
                return self.shards[j:]
            covered += len(shard.steps)
        if covered != n:
            raise ValueError(f"the base covers {n} steps, which do not end at a shard boundary")
        return []

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "format_version": self.format_version,
            "modules": [{"name": s.name, "shape": list(s.shape), "proj": s.proj, "layer": s.layer}
                        for s in self.modules],
            "dtype": self.dtype, "save_raw": self.save_raw, "steps_per_shard": self.steps_per_shard,
            "shards": [s.to_json() for s in self.shards], "steps": self.steps,
            "nonfinite_steps": self.nonfinite_steps,
            "accumulators": {"journal": self.journal, "base": self.base.to_json() if self.base else None,
                             "partials": [p.to_json() for p in self.partials]},
            "config": self.config, "seed": self.seed, "versions": self.versions, "created": self.created,
            "complete": self.complete, "status": self.status, "planned_steps": self.planned_steps,
            "stop_reason": self.stop_reason, "writer": self.writer,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any], run_dir: Path) -> Manifest:
        """Parse and cross-check a manifest (format 1 or 2); a ValueError/KeyError/TypeError means malformed."""
        version = obj["format_version"]
        specs = [ModuleSpec(m["name"], (_int(m["shape"][0]), _int(m["shape"][1])), m["proj"], m["layer"])
                 for m in obj["modules"]]
        if len({s.name for s in specs}) != len(specs) or not all(isinstance(s.name, str) for s in specs):
            raise ValueError("module names are not unique strings")
        if obj["dtype"] not in DTYPES:
            raise ValueError(f"unknown dtype {obj['dtype']!r}")
        acc = obj["accumulators"]
        checksums = version >= 2
        manifest = cls(
            modules=specs, dtype=obj["dtype"], save_raw=bool(obj["save_raw"]),
            steps_per_shard=_int(obj["steps_per_shard"]), journal=acc["journal"] if checksums else "partials",
            config=obj.get("config") or {}, seed=obj.get("seed"),
            shards=[TensorFile.from_json(s, run_dir, checksums) for s in obj["shards"]],
            steps=list(obj["steps"]), versions=obj.get("versions") or {}, created=obj.get("created", ""),
            complete=bool(obj.get("complete")), format_version=version, status=obj.get("status"),
            planned_steps=obj.get("planned_steps"), stop_reason=obj.get("stop_reason"), writer=obj.get("writer"))
        for rec in manifest.steps:
            rec["step"] = _int(rec["step"])
        if checksums:
            base = acc["base"]
            if base is not None and base["file"] != ACCUMULATORS:
                raise ValueError(f"the base is {base['file']!r}, not {ACCUMULATORS!r}")
            manifest.base = None if base is None else Base(
                _int(base["generation"]), _int(base["n_steps"]), _int(base["bytes"]), _crcs(base["crc32"]))
            manifest.partials = [TensorFile.from_json(p, run_dir, True) for p in acc["partials"]]
        else:  # format 1: one accumulators file of every committed step, found by its generation
            manifest.base = Base(_int(acc["generation"]), len(manifest.steps))
        manifest._check_layout()
        return manifest

    def _check_layout(self) -> None:
        """Every step record lies where its shard says; the base and the journal cover the steps exactly once."""
        steps = [r["step"] for r in self.steps]
        if len(set(steps)) != len(steps) or len({s.file for s in self.shards}) != len(self.shards):
            raise ValueError("a step is recorded twice, or a shard listed twice")
        by_file = {s.file: s.steps for s in self.shards}
        for rec in self.steps:
            if not isinstance(rec["nonfinite"], bool):
                raise ValueError(f"step {rec['step']}: nonfinite is not true/false")
            if self.save_raw and (rec["offset"] < 0 or by_file[rec["shard"]][rec["offset"]] != rec["step"]):
                raise ValueError(f"step {rec['step']} is not at offset {rec['offset']} of {rec['shard']}")
        if self.save_raw and sorted(steps) != sorted(s for file in by_file.values() for s in file):
            raise ValueError("the shards hold steps that no step record names")
        if self.journal not in JOURNALS or (self.journal == "shards" and not self.save_raw):
            raise ValueError(f"journal {self.journal!r} is not one of {JOURNALS} (shards need save_raw)")
        if self.base is not None and not 0 <= self.base.n_steps <= len(self.steps):
            raise ValueError(f"the base covers {self.base.n_steps} steps of {len(self.steps)}")
        tail = [r["step"] for r in self.journal_steps]
        held = [s for f in self.journal_files() for s in f.steps]
        if held != tail or (self.journal == "shards" and self.partials):
            raise ValueError(f"the {self.journal} after the base hold steps {held[:6]}, not the steps {tail[:6]} "
                             "after it")


def read_manifest_json(run_dir: Path) -> dict[str, Any]:
    """Read ``manifest.json`` as the plain dict it is (what ``Run.meta`` shows); refuses what is not a manifest of a
    readable format version, in one line naming the file."""
    if not run_dir.is_dir():
        raise GradlensError(f"{run_dir}: run directory does not exist")
    path = run_dir / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise GradlensError(f"{path}: manifest missing (not a gradlens run directory)") from None
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise GradlensError(f"{path}: manifest is not valid JSON ({e})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise GradlensError(f"{path}: not a gradlens run manifest (format is not {FORMAT!r})")
    version = obj.get("format_version")
    if version not in READ_VERSIONS:
        newer = "; a newer gradlens wrote it" if isinstance(version, int) and version > FORMAT_VERSION else ""
        raise GradlensError(f"{path}: format_version {version!r} is not supported (this gradlens reads "
                            f"{' and '.join(map(str, READ_VERSIONS))}{newer})")
    return obj


def parse_manifest(obj: dict[str, Any], run_dir: Path) -> Manifest:
    """:meth:`Manifest.from_json`, every problem a one-line GradlensError naming the file."""
    try:
        return Manifest.from_json(obj, run_dir)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise GradlensError(f"{run_dir / MANIFEST}: malformed manifest ({type(e).__name__}: {e})") from None


def load_manifest(run_dir: Path) -> Manifest:
    """Read and check ``manifest.json``."""
    return parse_manifest(read_manifest_json(run_dir), run_dir)


def check_shard(run_dir: Path, shard: TensorFile, specs: list[ModuleSpec], dtype: str) -> dict[str, Any]:
    """Check a shard's framing, tensors and step list against the manifest before anything is read from it; returns
    its header."""
    path = safe_relpath(run_dir, shard.file, run_dir / MANIFEST)
    header = safetensors_header(path, "shard")
    if path.stat().st_size != shard.bytes:
        raise GradlensError(f"{path}: size {path.stat().st_size} bytes differs from the manifest's {shard.bytes}")
    n = len(shard.steps)
    st_dtype = DTYPES[dtype]
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
    if steps != shard.steps:
        raise GradlensError(f"{path}: shard steps do not match the manifest")
    return header


def check_crc(path: Path, key: str, data: Any, want: dict[str, int] | None, what: str) -> None:
    """Refuse tensor ``key`` of ``path`` unless its bytes have the crc32 the manifest recorded (``want`` None: a
    format-1 run, nothing recorded); ``what`` says which module and steps it holds."""
    if want is None:
        return
    got = crc32(data)
    if want.get(key) != got:
        raise GradlensError(f"{path}: tensor {key} ({what}) is corrupt: crc32 {got:08x} differs from the manifest's "
                            f"{want.get(key, 0):08x}")


def find_base(run_dir: Path, base: Base) -> Path:
    """The file holding ``base``: ``accumulators.safetensors``, or ``.prev`` after a kill inside a compaction."""
    path = run_dir / ACCUMULATORS
    for candidate in (path, run_dir / ACCUMULATORS_PREV):
        if candidate.exists():
            meta = safetensors_header(candidate, "accumulators").get("__metadata__", {})
            if meta.get("generation") == str(base.generation):
                return candidate
    raise GradlensError(f"{path}: accumulators missing or not of generation {base.generation} named in the manifest")


def load_accumulator_file(path: Path, specs: list[ModuleSpec], size: int | None,
                          crcs: dict[str, int] | None) -> dict[str, np.ndarray]:
    """Load a base or partial accumulators file after checking its framing, size, checksums and tensor shapes."""
    safetensors_header(path, "accumulators")
    if size is not None and path.stat().st_size != size:
        raise GradlensError(f"{path}: size {path.stat().st_size} bytes differs from the manifest's {size}")
    try:
        tensors = safetensors.numpy.load_file(path)
    except (safetensors.SafetensorError, TypeError, ValueError) as e:
        raise GradlensError(f"{path}: cannot read accumulators ({e})") from None
    if crcs is not None and set(crcs) != set(tensors):
        raise GradlensError(f"{path}: accumulator tensors differ from those the manifest lists")
    for key, array in tensors.items():
        i = key.split(".")[0][1:]
        check_crc(path, key, array, crcs, f"module {specs[int(i)].name}" if i.isdigit() and int(i) < len(specs)
                  else "step list")
    check_accumulators(path, tensors, specs)
    return tensors


def check_accumulators(path: Path, t: dict[str, np.ndarray], specs: list[ModuleSpec]) -> None:
    if "steps" not in t:
        raise GradlensError(f"{path}: accumulators lack the 'steps' series")
    n = len(t["steps"])
    for i, spec in enumerate(specs):
        expect = {**{k: spec.shape for k in (*ACC_SUMS, "nonzero")}, "count": (), "sqnorm": (n,), "dot_prev": (n,)}
        if n:
            expect["prev"] = spec.shape
        for key, shape in expect.items():
            array = t.get(f"m{i}.{key}")
            kind = "f" if key in (*FLOAT_SUMS, "sqnorm", "dot_prev", "prev") else "if"
            if array is None or array.shape != shape or array.dtype.kind not in kind:
                raise GradlensError(f"{path}: accumulator m{i}.{key} of module {spec.name} is missing or not {shape}")
        if int(t[f"m{i}.count"]) != n:
            raise GradlensError(f"{path}: m{i}.count is {int(t[f'm{i}.count'])} but {n} steps are listed")
