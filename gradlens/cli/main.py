"""The ``gradlens`` command: a thin argparse layer over the library, one module per subcommand.

Subcommand modules are imported only when they are needed (and they import torch, transformers and TRL only inside
``run``), so ``gradlens --help`` is instant. A :class:`GradlensError` is printed as one line, with exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import NoReturn

from gradlens.errors import GradlensError, GradlensWarning

# name -> (module, one-line help). Each module defines ``add_arguments(parser)`` and ``run(args) -> int``; a module
# with ``FORWARDS_UNKNOWN_FLAGS = True`` receives flags it does not declare as ``args.extra`` (e.g. TRL fields).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "toy": ("gradlens.cli.toy", "the embedded toy world: build or show the base model and its accuracy"),
    "record": ("gradlens.cli.record", "train with TRL (SFT or GRPO) and record every LoRA-B gradient"),
    "train": ("gradlens.cli.train", "one training run, full-B LoRA-FA or sparse-B (--mask), with held-out accuracy"),
    "info": ("gradlens.cli.info", "describe recorded runs (steps, modules, size), checking every shard"),
    "analyze": ("gradlens.cli.analyze", "effective rank, step-to-step cosine and sign stability of recorded runs"),
    "probe": ("gradlens.cli.probe", "a short recorded run that scores every B entry and writes placement masks"),
    "select": ("gradlens.cli.select", "placement masks (per selector and budget) from a recorded run's statistics"),
    "diagnose": ("gradlens.cli.diagnose", "from a run's or probe's statistics: will random placement do, per budget?"),
    "compare": ("gradlens.cli.compare", "sparse-B placements (random vs informed) against base and full LoRA"),
    "report": ("gradlens.cli.report", "one self-contained HTML page from run, analysis and compare directories"),
}


# Characters that would break the one-line error or drive the terminal (line breaks, ESC, other C0/C1 controls).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class UsageError(Exception):
    """A command line argparse rejects; carries the subcommand's prog name (``gradlens record``) and the reason."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become :class:`UsageError` (one line, exit 2) instead of usage text + exit."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self.prog, message)


def one_line(message: str) -> str:
    """``message`` escaped onto one line, so a path or value read from input cannot add lines or terminal codes."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode(), message)


def build_parser() -> argparse.ArgumentParser:
    from gradlens import __version__

    parser = _Parser(prog="gradlens", description="Record, analyze and act on LoRA-B gradients.")
    parser.add_argument("--version", action="version", version=f"gradlens {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(sub_parser)
        sub_parser.set_defaults(_module=module)
    return parser


@contextlib.contextmanager
def console_warnings(command: str) -> Iterator[None]:
    """Show each :class:`GradlensWarning` as one ``gradlens COMMAND: warning: ...`` line; other warnings as usual."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, GradlensWarning):
            print(one_line(f"gradlens {command}: warning: {message}"), file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.simplefilter("default", GradlensWarning)  # each distinct warning once, also under python -W ignore
        warnings.showwarning = show
        yield


def in_process_group() -> bool:
    """Whether this process is in a torch.distributed process group (without importing torch for ``--help``)."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def leave_process_group() -> None:
    """Destroy the process group a finished run joined (accelerate or the Trainer joins it; neither leaves it),
    once what holds it is freed: a group torn down during interpreter shutdown can abort a run that finished
    ("terminate called without an active exception"), and NCCL warns that it was never destroyed."""
    if in_process_group():
        gc.collect()  # the run's model and trainer (FSDP2's DTensors hold the mesh, and the mesh the group)
        sys.modules["torch.distributed"].destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; bad input of any kind ends as one line on stderr and exit code 2, never a traceback."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        module = importlib.import_module(args._module)
        if extra and not getattr(module, "FORWARDS_UNKNOWN_FLAGS", False):
            raise UsageError(f"gradlens {args.command}", f"unrecognized arguments: {' '.join(extra)}")
    except UsageError as e:
        print(one_line(f"{e.prog}: error: {e} (see {e.prog} --help)"), file=sys.stderr)
        return 2
    args.extra = extra
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line as given (e.g. to say how to resume)
    try:
        joined_before = in_process_group()
        with console_warnings(args.command):
            code = int(module.run(args) or 0)
        if not joined_before:
            leave_process_group()
        return code
    except GradlensError as e:
        print(one_line(f"gradlens {args.command}: error: {e}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gradlens {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
