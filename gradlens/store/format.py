"""The run-directory format: file names, the manifest and its validation, and the checks every file passes before
it is read. The writer (:mod:`.writer`) and the reader (:mod:`.reader`) both follow it; nothing else knows it.

A run directory holds ``manifest.json`` (the commit point: only what it lists exists), raw gradient shards under
``shards/`` and ``accumulators.safetensors`` (the float64 streaming statistics). Nothing is ever pickled.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

from gradlens.errors import GradlensError
from gradlens.fsio import safetensors_header
from gradlens.modules import ModuleSpec
from gradlens.stats.streaming import ACC_SUMS

FORMAT = "gradlens-run"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ACCUMULATORS = "accumulators.safetensors"
# The accumulators of the previous commit: the manifest may still point at them if a kill lands between the two writes.
ACCUMULATORS_PREV = "accumulators.prev.safetensors"
SHARD_DIR = "shards"
SHARD_FORMAT = "gradlens-shard"
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


def spec_to_json(spec: ModuleSpec) -> dict[str, Any]:
    return {"name": spec.name, "shape": list(spec.shape), "proj": spec.proj, "layer": spec.layer}


def load_manifest(run_dir: Path) -> dict[str, Any]:
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
            safe_relpath(run_dir, shard["file"], path)
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


def public_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in manifest.items() if not k.startswith("_")}


def load_accumulator_tensors(run_dir: Path, manifest: dict[str, Any]) -> tuple[Path, dict[str, np.ndarray]]:
    """Load the accumulators whose generation the manifest names (the previous file survives a mid-commit kill)."""
    want = str(manifest["accumulators"]["generation"])
    path = run_dir / ACCUMULATORS
    for candidate in (path, run_dir / ACCUMULATORS_PREV):
        if not candidate.exists():
            continue
        header = safetensors_header(candidate, "accumulators")
        if header.get("__metadata__", {}).get("generation") == want:
            try:
                tensors = safetensors.numpy.load_file(candidate)
            except (safetensors.SafetensorError, TypeError, ValueError) as e:
                raise GradlensError(f"{candidate}: cannot read accumulators ({e})") from None
            check_accumulators(candidate, tensors, manifest["_specs"])
            return candidate, tensors
    raise GradlensError(f"{path}: accumulators missing or not of generation {want} named in the manifest")


def check_accumulators(path: Path, t: dict[str, np.ndarray], specs: list[ModuleSpec]) -> None:
    if "steps" not in t:
        raise GradlensError(f"{path}: accumulators lack the 'steps' series")
    n = len(t["steps"])
    for i, spec in enumerate(specs):
        expect = {**{k: spec.shape for k in (*ACC_SUMS, "nonzero")}, "count": (), "sqnorm": (n,), "dot_prev": (n,)}
        if n:
            expect["prev"] = spec.shape
        for key, shape in expect.items():
            if f"m{i}.{key}" not in t or t[f"m{i}.{key}"].shape != shape:
                raise GradlensError(f"{path}: accumulator m{i}.{key} of module {spec.name} is missing or not {shape}")
        if int(t[f"m{i}.count"]) != n:
            raise GradlensError(f"{path}: m{i}.count is {int(t[f'm{i}.count'])} but {n} steps are listed")


def check_shard(run_dir: Path, shard: dict[str, Any], specs: list[ModuleSpec], dtype: str) -> None:
    """Check a shard's framing, tensors and step list against the manifest before anything is read from it."""
    path = safe_relpath(run_dir, shard["file"], run_dir / MANIFEST)
    header = safetensors_header(path, "shard")
    if path.stat().st_size != shard["bytes"]:
        raise GradlensError(f"{path}: size {path.stat().st_size} bytes differs from the manifest's {shard['bytes']}")
    n = len(shard["steps"])
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
    if steps != shard["steps"]:
        raise GradlensError(f"{path}: shard steps do not match the manifest")
