"""What a comparison's or a phase diagram's directories hold apart from weights and probes, as one JSON-able dict,
so that the numbers behind a finding can be committed (a compare directory is hundreds of MB)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from gradlens.fsio import read_json

COMPARE_TABLES = ("summary", "paired", "sweep", "placement")


def compare_tables(out: Path) -> dict[str, Any]:
    """One ``gradlens compare`` directory: its provenance and tables, rows as written (budgets stay strings)."""
    def table(path: Path) -> list[dict[str, Any]]:
        return json.loads(pd.read_csv(path, dtype={"budget": str}).to_json(orient="records"))

    return {"provenance": read_json(out / "provenance.json", "compare provenance"),
            **{name: table(out / f"{name}.csv") for name in COMPARE_TABLES}}


def phase_bundle(out: Path) -> dict[str, Any]:
    """A phase diagram's ``phase.json`` and every cell's :func:`compare_tables`."""
    cells = {cell.name: compare_tables(cell) for cell in sorted(p.parent for p in out.glob("*/summary.csv"))}
    return {"phase": read_json(out / "phase.json", "phase diagram"), "cells": cells}
