"""``gradlens compare``: the placement table (base, full-B LoRA, random and informed sparse-B) under SFT and GRPO.

Flags mirror :class:`gradlens.config.CompareConfig`; any other ``--field value`` is a TRL config field applied to
every training run.
"""

from __future__ import annotations

import argparse

from gradlens.cli.dataclass_args import add_dataclass_arguments, config_from_args, parse_extra_flags

FORWARDS_UNKNOWN_FLAGS = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gradlens.config import CompareConfig

    parser.epilog = ("Writes placement.csv, summary.csv, sweep.csv, where.csv, probes.csv (and curves.csv), "
                     "placement.png, the masks, probes and PEFT adapters, and provenance.json into --out.")
    add_dataclass_arguments(parser, CompareConfig)


def run(args: argparse.Namespace) -> int:
    from gradlens.compare import compare
    from gradlens.config import CompareConfig

    config = config_from_args(CompareConfig, args, parse_extra_flags(args.extra), extra_field="trl")
    result = compare(config)
    print(result.findings)
    print(f"gradlens compare: wrote {len(result.files)} files to {result.out}")
    return 0
