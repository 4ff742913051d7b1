"""``gradlens info RUN_DIR [RUN_DIR ...]``: what a recorded run holds, after checking every shard."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories to describe")


def run(args: argparse.Namespace) -> int:
    from gradlens.runinfo import format_run_info, run_info

    for path in args.runs:
        print(format_run_info(run_info(path)))
    return 0
