"""What :func:`gradlens.analysis.analyze.analyze_runs` returns, in a module of its own so that the analysis and the
figures drawn from it (:mod:`gradlens.analysis.figures`) both depend on it and not on each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from gradlens.analysis.run_stats import RunStats


@dataclass
class AnalysisResult:
    """DataFrames of an analysis (``summary``, ``modules``, ``proj``, ``layers``, long ``series`` and ``hist``),
    the per-run :class:`~gradlens.analysis.run_stats.RunStats`, the printed finding and the files written."""

    summary: pd.DataFrame
    modules: pd.DataFrame
    proj: pd.DataFrame
    layers: pd.DataFrame
    series: pd.DataFrame
    hist: pd.DataFrame
    runs: list[RunStats]
    findings: str
    provenance: dict[str, Any]
    files: list[Path] = field(default_factory=list)
    skipped_runs: list[tuple[str, str]] = field(default_factory=list)  # (path, why) left out under skip_bad
