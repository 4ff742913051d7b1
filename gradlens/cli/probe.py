"""``gradlens probe``: a short recorded run (default 16 steps) that scores every B entry and writes masks.

Flags mirror :class:`gradlens.config.ProbeConfig` (``gradlens record``'s, plus ``--methods``, ``--budgets``,
``--scope`` and ``--train_steps``); any other ``--field value`` is a TRL config field.
"""

from __future__ import annotations

import argparse

from gradlens.cli.dataclass_args import add_dataclass_arguments, config_from_args, parse_extra_flags

FORWARDS_UNKNOWN_FLAGS = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gradlens.config import ProbeConfig

    parser.epilog = ("Writes OUT/run (the recorded probe), OUT/masks/METHOD-BUDGET.safetensors and OUT/probe.json "
                     "(wall time and cost as a fraction of --train_steps).")
    add_dataclass_arguments(parser, ProbeConfig)


def run(args: argparse.Namespace) -> int:
    from gradlens.config import ProbeConfig
    from gradlens.placement.probe import describe, probe

    config = config_from_args(ProbeConfig, args, parse_extra_flags(args.extra), extra_field="trl")
    print(describe(probe(config)))
    return 0
