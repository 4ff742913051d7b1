"""``gradlens analyze RUN_DIR [RUN_DIR ...] --out OUT_DIR``: effective rank, step-to-step cosine and sign stability.

A thin layer over :func:`gradlens.analysis.analyze.analyze_runs`: flags mirror
:class:`gradlens.config.AnalyzeConfig`, and ``--config analyze.yaml`` may hold any of them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gradlens.cli.dataclass_args import add_dataclass_arguments, config_from_args
from gradlens.errors import GradlensError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gradlens.config import AnalyzeConfig

    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="recorded run directories to analyse")
    parser.epilog = ("Writes summary.csv, modules.csv, proj.csv, layers.csv (and parquet, plus series/hist parquet), "
                     "PNG figures and provenance.json into --out, and prints the finding. A run recorded without "
                     "raw shards (--no-save_raw, gradlens probe) gets what its accumulators allow.")
    add_dataclass_arguments(parser, AnalyzeConfig)


def run(args: argparse.Namespace) -> int:
    from gradlens.config import AnalyzeConfig

    config = config_from_args(AnalyzeConfig, args)
    if not config.out:
        raise GradlensError("an output directory is required (--out OUT_DIR)")
    from gradlens.analysis.analyze import analyze_runs

    result = analyze_runs(args.runs, config.out, config)
    print(result.findings)
    print(f"gradlens analyze: wrote {len(result.files)} files to {config.out}")
    return 0
