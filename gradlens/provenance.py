"""Provenance shared by every result file: package versions, read from metadata (no heavy imports)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform

PACKAGES = ("gradlens", "numpy", "scipy", "pandas", "pyarrow", "matplotlib", "safetensors", "torch", "transformers",
            "trl", "peft", "accelerate")


def package_versions() -> dict[str, str]:
    """Python and the installed version of each package gradlens results depend on ("unknown" for gradlens itself
    when running from an uninstalled checkout)."""
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[pkg] = importlib.metadata.version(pkg)
    out.setdefault("gradlens", "unknown")
    return out
