"""``gradlens diagnose RUN_OR_PROBE``: from a run's or probe's streaming statistics alone, what random placement is
expected to recover of each informed placement at each budget (a thin layer over
:func:`gradlens.placement.diagnose.diagnose`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from gradlens.cli.dataclass_args import add_dataclass_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gradlens.config import DiagnoseConfig

    parser.add_argument("path", type=Path, metavar="RUN_OR_PROBE", nargs="?",
                        help="a recorded run directory, or a probe directory (its OUT/run is read); none with --check")
    parser.epilog = ("Prints one sentence per budget; with --out also writes OUT/diagnose.csv (per budget and method) "
                     "and OUT/diagnose.json (the same with provenance). The prediction is a heuristic, and the "
                     "output says how accurate it measured; --check TABLE.csv tests it leaving one world out.")
    add_dataclass_arguments(parser, DiagnoseConfig)


def run(args: argparse.Namespace) -> int:
    from gradlens.config import DiagnoseConfig

    config = config_from_args(DiagnoseConfig, args)
    from gradlens.fsio import check_unused_out
    from gradlens.placement.diagnose import describe, diagnose, save

    if config.out:  # refused before the statistics are read, not after
        check_unused_out(config.out, config.overwrite)
    if (config.check is None) == (args.path is None):
        from gradlens.errors import GradlensError

        raise GradlensError("give a run or probe directory to diagnose, or --check TABLE.csv, not both or neither")
    if config.check is not None:
        from gradlens.placement.diagnose_check import run_check

        print(run_check(config.check, config.predictors, config.out))
        return 0
    result = diagnose(args.path, config.budgets, config.scope, methods=config.methods, seed=config.seed,
                      train_steps=config.train_steps)
    print(describe(result))
    if config.out:
        files = save(result, config.out, config)
        print(f"gradlens diagnose: wrote {', '.join(str(f) for f in files)}")
    return 0
