"""The one exception type gradlens raises for bad input, so the CLI can print it as a single line."""

from __future__ import annotations

import os
from pathlib import Path


class GradlensError(Exception):
    """A user-facing error: the message names the file, flag or object at fault and what is wrong with it."""


class GradlensWarning(UserWarning):
    """A result that may not mean what it seems (no learning signal, drifted base weights, an unchecked mask): the
    CLI shows it as one ``gradlens COMMAND: warning: ...`` line, and the provenance keeps it."""


def cause(e: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type's name when it has none (some libraries raise
    bare exceptions, and ``str(e).splitlines()[0]`` of those is itself an IndexError)."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(e).__name__


def check_not_empty(path: str | os.PathLike[str], what: str) -> None:
    """Refuse a data file that holds nothing but whitespace, in one line naming it (``datasets`` fails on one with
    an exception that names neither the file nor the cause)."""
    file = Path(path)
    if file.is_file():
        with open(file, "rb") as f:
            while chunk := f.read(1 << 16):
                if chunk.strip():
                    return
        raise GradlensError(f"{what} {path} is empty: it holds no rows")
