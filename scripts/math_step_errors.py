"""What kind of error a toy:math base model makes: every calculator step of its greedy worked solutions, checked.

GRPO can only re-weight what a model already samples. A base model whose wrong answers come from the error planted
in its pretraining (a carry-less sum, taken 70% of the time) has the right step among its samples and can be taught to
prefer it; one whose wrong answers come from arithmetic it never learned (a 3-digit sum, a borrow) cannot, in 60
steps. This script tells the two apart: each ``a op b = c`` step of the greedy completions on the first ``--n``
held-out problems is correct, carry-less (``+`` only: ``c`` is the digit-wise sum without carries) or otherwise wrong
for its own operands (a value carried from an earlier wrong step does not count against a later step). A problem is
"carry-less only" when its answer is wrong and every wrong step in it is carry-less.

    python scripts/math_step_errors.py --label v2 [--model PATH] --out benchmarks/results/toy_math_step_errors.json

Several labels accumulate in the one JSON (a label run again is replaced).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradlens.config import ModelTaskConfig
from gradlens.evaluate import generate_answers
from gradlens.fsio import json_dump, read_json
from gradlens.models import load_model_and_tokenizer
from gradlens.provenance import package_versions
from gradlens.tasks import load_task_for
from gradlens.tasks.addition import carryless_sum
from gradlens.tasks.gsm8k import own_turn
from gradlens.toy.math_data import apply
from gradlens.toy.model import ensure_base_model
from gradlens.toy_presets import default_task

STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def classify(completion: str) -> list[tuple[str, str]]:
    """(op, verdict) for each calculator step written out in ``completion``: ``ok``, ``carryless`` or ``wrong``."""
    steps = []
    for a, op, b, c in STEP.findall(completion):
        a, b, c = int(a), int(b), int(c)
        try:
            right = apply(op, a, b)
        except (ValueError, ZeroDivisionError):  # a division the model wrote that has no whole answer
            right = None
        if c == right:
            steps.append((op, "ok"))
        elif op == "+" and c == carryless_sum(a, b):
            steps.append((op, "carryless"))
        else:
            steps.append((op, "wrong"))
    return steps


def measure(model_path: Path, n: int) -> dict[str, Any]:
    """Greedy completions of the first ``n`` held-out problems, their steps classified and counted."""
    model, tokenizer = load_model_and_tokenizer(model_path)
    task = load_task_for(ModelTaskConfig(model="toy:math", task=default_task("toy:math")), model, tokenizer)
    data = task.dataset(task.eval_split, n=n)
    completions = generate_answers(model, tokenizer, task.prompt_texts(data["prompt"], tokenizer),
                                   max_new_tokens=task.eval_max_new_tokens,
                                   add_special_tokens=task.add_special_tokens)
    steps: Counter[str] = Counter()
    problems: Counter[str] = Counter()
    for completion, answer in zip(completions, data["answer"], strict=True):
        verdicts = classify(own_turn(completion))
        steps.update(f"{op} {verdict}" for op, verdict in verdicts)
        if task.is_correct(completion, answer):
            problems["correct"] += 1
        elif any(v == "wrong" for _, v in verdicts):
            problems["a wrong step"] += 1
        elif any(v == "carryless" for _, v in verdicts):
            problems["carry-less only"] += 1
        else:
            problems["no wrong step shown"] += 1
    wrong = sum(v for k, v in steps.items() if not k.endswith(" ok"))
    return {"model": str(model_path), "n": n, "problems": dict(problems), "steps": dict(sorted(steps.items())),
            "wrong_steps": wrong, "carryless_share_of_wrong_steps":
                sum(v for k, v in steps.items() if k.endswith("carryless")) / wrong if wrong else None,
            "versions": package_versions()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", required=True, help="the key this model's counts are stored under")
    parser.add_argument("--model", type=Path, help="a toy:math model directory (default: the shipped seed-0 base)")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/toy_math_step_errors.json"))
    args = parser.parse_args()
    result = measure(args.model or ensure_base_model("math"), args.n)
    print(result)
    payload = read_json(args.out) if args.out.exists() else {"note": __doc__.split("\n\n")[0], "models": {}}
    payload["models"][args.label] = result
    json_dump(payload, args.out)


if __name__ == "__main__":
    main()
