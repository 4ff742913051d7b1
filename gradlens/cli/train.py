"""``gradlens train``: one training run with ``gradlens record``'s flags, full-B LoRA-FA or sparse-B (``--mask``).

Flags mirror :class:`gradlens.config.TrainConfig`; any other ``--field value`` is passed to the TRL config, and
``--config run.yaml`` may hold any of them. Warnings of gradlens itself (a mask that cannot be checked, base weights
that drifted, an adapter that learned nothing) are printed as ``gradlens train: warning: ...`` lines.
"""

from __future__ import annotations

import argparse

from gradlens.cli.dataclass_args import add_dataclass_arguments, config_from_args, parse_extra_flags

FORWARDS_UNKNOWN_FLAGS = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gradlens.config import TrainConfig

    parser.epilog = ("Writes OUT/adapter (a PEFT adapter, plus the mask), OUT/train.json, OUT/eval.json (--n_eval) "
                     "and OUT/run (--record); with --space weight OUT/sparse_delta.safetensors (trained minus base) "
                     "and, where every module's count is r*(d_in+d_out), OUT/adapter as a PEFT SHiRA adapter."
                     " Any other --FIELD VALUE is a TRL SFTConfig/GRPOConfig field.")
    add_dataclass_arguments(parser, TrainConfig)


def run(args: argparse.Namespace) -> int:
    from gradlens.config import TrainConfig
    from gradlens.drift import describe
    from gradlens.training import train

    config = config_from_args(TrainConfig, args, parse_extra_flags(args.extra), extra_field="trl")
    result = train(config)
    info = result.info
    letter = "B" if config.space == "lora_b" else "W"
    kind = (f"sparse-{letter}, {info['mask']['k']} of {info['mask']['entries']} {letter} entries" if info["mask"]
            else f"full-B LoRA-FA, {info['b_entries']} B entries" if config.space == "lora_b"
            else f"dense W of the target modules, {info['b_entries']} W entries")
    print(f"gradlens train: {result.path}: {result.steps} steps in {result.seconds:.1f} s ({config.regime}, "
          f"model {config.model}, {kind}); adapter in {result.adapter}")
    if result.eval is not None:
        lo, hi = result.eval["ci95"]
        print(f"gradlens train: greedy accuracy {result.eval['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] on "
              f"{result.eval['n']} {info['task']['eval_split']} examples ({result.path / 'eval.json'})")
    if info["drift_guard"].get("checked") and not info["drift_guard"]["drifted"]:  # drift: warned already
        print(f"gradlens train: {describe(info['drift_guard'])}")
    return 0
