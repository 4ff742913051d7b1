"""``gradlens toy``: the embedded toy world. ``gradlens toy base`` ensures the base model and reports its accuracy.

Only argparse is imported at module level; torch, transformers and the toy world are imported inside :func:`run`.
"""

from __future__ import annotations

import argparse
import sys

from gradlens.errors import GradlensError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="toy_action", metavar="ACTION", required=True)
    base = sub.add_parser("base", help="ensure the toy base model (shipped, cached or built) and report its accuracy",
                          description="Ensure the toy base model (shipped in the package, cached, or built now by "
                                      "its seeded recipe) and report its held-out accuracy.")
    base.add_argument("--preset", default="tiny",
                      help="model size preset, a key of gradlens.toy_presets.PRESETS, e.g. tiny, small or math "
                           "(default: tiny)")
    base.add_argument("--seed", type=int, default=0, help="seed of the pretraining recipe (default: 0)")
    base.add_argument("--rebuild", action="store_true",
                      help="run the recipe even if the model is shipped or cached, and cache the result")
    base.add_argument("--n", type=int, default=None,
                      help="held-out prompts to evaluate (default: 400, or 200 for the math preset)")
    base.add_argument("--k", type=int, default=8,
                      help="samples per prompt for sampled accuracy and pass@k; 0 skips sampling (default: 8)")
    base.epilog = ("With the default --n and --k the report is also saved next to the model, as "
                   "gradlens_base_report.json (what the docs' accuracy table is checked against).")


def format_report(report) -> str:
    """The human-readable lines of a :class:`gradlens.toy_base_report.BaseModelReport`."""
    acc = report.accuracy
    lines = [
        f"toy base model  preset={report.preset} seed={report.seed}",
        f"  path:              {report.path}",
        f"  source:            {report.source}",
        f"  parameters:        {report.n_parameters:,}",
        f"  held-out prompts:  {acc.n}",
        f"  greedy accuracy:   {acc.greedy:.3f}",
        f"  greedy tokens:     {acc.mean_tokens:.1f}  (mean completion length)",
    ]
    if acc.k:
        lines += [f"  sampled accuracy:  {acc.sampled:.3f}  (k={acc.k}, temperature 1)",
                  f"  {f'pass@{acc.k}:':<19}{acc.pass_at_k:.3f}"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from gradlens.config import check_seed
    from gradlens.toy_presets import get_preset

    get_preset(args.preset)  # fail before importing torch
    check_seed("--seed", args.seed)
    from gradlens.toy_base_report import DEFAULT_K, default_n, evaluate_base_model, save_base_report

    report = evaluate_base_model(args.preset, args.seed, n=args.n, k=args.k, rebuild=args.rebuild, progress=True)
    print(format_report(report))
    if report.accuracy.n == default_n(args.preset) and args.k == DEFAULT_K:  # the documented evaluation: keep it
        try:
            print(f"  saved:             {save_base_report(report)}")
        except (OSError, GradlensError) as e:
            print(f"gradlens toy: warning: report not saved next to the model ({e})", file=sys.stderr)
    return 0
