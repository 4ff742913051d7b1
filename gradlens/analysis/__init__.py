"""The analysis layer: statistics of recorded runs read back from the store. :mod:`.driver` (``analyze_run``: one
run, out of core, shard by shard; :mod:`.passes` its passes over the shards; :mod:`.accumulated` the path for runs
recorded without raw shards; :mod:`.run_stats` what one run's analysis holds), :mod:`.analyze` (``analyze_runs``:
tables, figures and a finding for several runs; :mod:`.result` what it returns; :mod:`.figures` its PNGs) and
:mod:`.runinfo` (``gradlens info``). Names load on first use, so importing the package loads nothing else."""

import importlib
from typing import Any

_LAZY = {
    "analyze_run": "gradlens.analysis.driver", "RunStats": "gradlens.analysis.run_stats",
    "ScopeStats": "gradlens.analysis.run_stats", "stat_columns": "gradlens.analysis.run_stats",
    "analyze_runs": "gradlens.analysis.analyze", "AnalysisResult": "gradlens.analysis.result",
    "make_figures": "gradlens.analysis.figures", "run_info": "gradlens.analysis.runinfo",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gradlens.analysis' has no attribute {name!r}")
