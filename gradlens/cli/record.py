"""``gradlens record``: train with TRL (SFT or GRPO) and record every LoRA-B gradient into a run directory.

Flags mirror :class:`gradlens.record.RecordConfig`; any other ``--field value`` is passed to the TRL config
(``--num_generations 8``, ``--beta 0.04``), and ``--config run.yaml`` may hold any of them.
"""

from __future__ import annotations

import argparse
import sys

from gradlens.cli.dataclass_args import add_dataclass_arguments, config_from_args, parse_extra_flags

FORWARDS_UNKNOWN_FLAGS = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gradlens.config import RecordConfig

    parser.epilog = "Any other --FIELD VALUE is a TRL SFTConfig/GRPOConfig field, e.g. --num_generations 8."
    add_dataclass_arguments(parser, RecordConfig)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def say_how_to_resume(out: str, argv: list[str]) -> None:
    """After an interrupt: where the run stopped (from its manifest) and the command that continues it."""
    import shlex
    from pathlib import Path

    from gradlens.store import MANIFEST
    from gradlens.store.format import read_manifest_json
    from gradlens.store.runstate import run_state

    if not (Path(out) / MANIFEST).is_file():
        print(f"gradlens record: interrupted before the first commit; {out} holds no step yet", file=sys.stderr)
        return
    state = run_state(read_manifest_json(Path(out)))
    again = argv if "--resume" in argv else [*argv, "--resume"]
    print(f"gradlens record: {out}: {state.describe('keeping')}; continue it with: "
          f"{shlex.join(['gradlens', *again])}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from gradlens.config import RecordConfig
    from gradlens.training import EVAL_FILE, record

    config = config_from_args(RecordConfig, args, parse_extra_flags(args.extra), extra_field="trl")
    try:
        result = record(config)
    except KeyboardInterrupt:
        say_how_to_resume(config.out, args.argv)
        raise
    print(f"gradlens record: {result.path}: {result.steps} steps, {_human_bytes(result.bytes)} "
          f"({config.regime}, model {config.model})")
    if result.no_signal_share:
        print(f"gradlens record: {result.no_signal_share:.0%} of recorded steps had no learning signal (see the "
              "warnings above, and zero_gradient / zero_reward_std in the manifest's step records)")
    if result.eval is not None:
        print(f"gradlens record: greedy accuracy {result.eval['accuracy']:.3f} on {result.eval['n']} "
              f"{config.eval_split} examples ({result.path / EVAL_FILE})")
    return 0
