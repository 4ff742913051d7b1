"""``gradlens info RUN_DIR [RUN_DIR ...] [--verify]``: what a recorded run holds, after checking every shard's framing;
with ``--verify``, after reading every byte and checking every tensor's crc32."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories to describe")
    parser.add_argument("--verify", action="store_true",
                        help="read every shard and accumulator tensor and check its crc32 (reports each file)")


def run(args: argparse.Namespace) -> int:
    from gradlens.analysis.runinfo import check_verified, format_run_info, format_verify, run_info, verify_info

    verified = []
    for path in args.runs:
        print(format_run_info(run_info(path)))
        if args.verify:
            verified.append(verify_info(path))
            print(format_verify(verified[-1]), flush=True)
    for info in verified:
        check_verified(info)
    return 0
