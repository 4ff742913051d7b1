"""Safe file writing and reading shared by every stage: atomic replacement, JSON, and safetensors framing checks.

Every result file gradlens writes goes through :func:`atomic_write` (temp file, fsync, rename), so a crash leaves
either the old file or the new one, never half of one. Every safetensors file is checked by
:func:`safetensors_header` before a tensor is read, so a truncated or foreign file (a pickle) is refused unread.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gradlens.errors import GradlensError

MAX_HEADER_BYTES = 100 * 2**20
# Bytes per element of each safetensors dtype gradlens may meet.
ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's) data to disk, so a rename that follows is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Write through ``write(tmp)`` into a temp file next to ``path``, fsync it and rename it over ``path``.

    A failed write removes its temp file (on a full disk it would only hold space) and leaves ``path`` untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def json_dump(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1) + "\n"))


def read_json(path: str | os.PathLike[str], what: str = "JSON") -> Any:
    """Parse a JSON file; a missing or malformed one is a one-line error naming the file and the cause."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise GradlensError(f"{path}: {what} file does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise GradlensError(f"{path}: cannot read {what} file ({str(e).splitlines()[0] if str(e) else e!r})") from None


def safetensors_header(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """Validate a safetensors file's framing before any tensor is read; returns its parsed header.

    The header length is checked against a sane bound and the file size must equal 8 + header + data exactly, so a
    truncated write, a corrupt header or a foreign file (a pickle) is refused without allocating or deserialising.
    """
    path = Path(path)
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
            nbytes = math.prod(int(d) for d in info["shape"]) * ITEMSIZE[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise GradlensError(f"{path}: corrupt safetensors header (bad entry for {key!r})") from None
        if start < 0 or stop - start != nbytes:
            raise GradlensError(f"{path}: corrupt safetensors header ({key!r} has {stop - start} bytes, not {nbytes})")
        end = max(end, stop)
    if size != 8 + n + end:
        raise GradlensError(f"{path}: truncated or corrupt {what} file ({size} bytes, header says {8 + n + end})")
    return header


def safetensors_metadata(metadata: Mapping[str, Any], path: str | os.PathLike[str], what: str) -> dict[str, str]:
    """``metadata`` as safetensors' string-to-string header: strings as they are, anything else JSON-encoded; a value
    JSON cannot encode is a one-line error naming ``path``."""
    try:
        return {str(key): value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}
    except (TypeError, ValueError) as e:
        raise GradlensError(f"{path}: {what} metadata is not JSON-serialisable ({e})") from None


def check_unused_out(path: str | os.PathLike[str], overwrite: bool) -> None:
    """Refuse an output (a directory or a file) that already holds something, so the results of two inputs never sit
    side by side under one name; ``overwrite`` allows it (the caller replaces what it writes)."""
    out = Path(path)
    if overwrite or not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    held = "files" if out.is_dir() else "a file"
    raise GradlensError(f"{out} already holds {held}; choose a new --out, or pass --overwrite to replace them "
                        "(overwrite=True in the config)")


def remove_if_empty(path: str | os.PathLike[str]) -> bool:
    """Remove the directory ``path`` if it exists and holds nothing (e.g. a Trainer output dir no checkpoint or log was
    written to); True if it was removed."""
    out = Path(path)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
        return True
    return False
