"""``gradlens select RUN_DIR --out OUT``: placement masks from a recorded run's accumulators, one per selector and
budget, without training anything (a thin layer over :func:`gradlens.placement.run_masks.select_masks`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from gradlens.cli.dataclass_args import add_dataclass_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gradlens.config import SelectConfig

    parser.add_argument("run", type=Path, metavar="RUN_DIR", help="a recorded run directory (its accumulators)")
    parser.epilog = "Writes OUT/masks/METHOD-BUDGET.safetensors and OUT/select.json (config, run, scoring times)."
    add_dataclass_arguments(parser, SelectConfig)


def run(args: argparse.Namespace) -> int:
    from gradlens.config import SelectConfig

    config = config_from_args(SelectConfig, args)
    from gradlens.placement.run_masks import select_masks

    masks, _ = select_masks(args.run, config)
    print(f"gradlens select: {len(masks)} masks from {args.run} in {Path(config.out) / 'masks'}")
    return 0
