"""``gradlens report PATH [PATH ...] --out report.html``: one self-contained HTML page to read without Python.

A thin layer over :func:`gradlens.report.write_report`: flags mirror :class:`gradlens.config.ReportConfig`, and
``--config report.yaml`` may hold any of them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gradlens.cli.dataclass_args import add_dataclass_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gradlens.config import ReportConfig

    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                        help="run directories (manifest.json), gradlens analyze outputs (summary.csv + "
                             "provenance.json) or gradlens compare outputs (placement.csv + provenance.json)")
    parser.epilog = ("Run directories are analysed together; the page holds what was run, the statistics, the "
                     "figures (embedded), the placement table and the findings, with no external file.")
    add_dataclass_arguments(parser, ReportConfig)


def run(args: argparse.Namespace) -> int:
    from gradlens.config import ReportConfig

    config = config_from_args(ReportConfig, args)
    from gradlens.report import write_report

    print(f"gradlens report: wrote {write_report(args.paths, config)}")
    return 0
