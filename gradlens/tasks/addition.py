"""The embedded toy task: multi-digit addition with an exact-match, verifiable reward.

Prompts look like ``"37+45="`` and the answer is the decimal sum (``"82"``). The train and held-out splits are
disjoint sets of operand pairs drawn by a seeded shuffle, so held-out accuracy measures generalisation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from datasets import Dataset

from gradlens.errors import GradlensError
from gradlens.tasks.base import RewardFunction, Task, exact_match, exact_match_reward

# TRL settings for the addition task, used where the user sets nothing. Tuned on the tiny preset so that both
# regimes improve held-out accuracy within ~100 steps on a CPU.
TRL_DEFAULTS: dict[str, dict[str, Any]] = {
    "sft": {"per_device_train_batch_size": 16, "learning_rate": 2e-3, "max_length": 32},
    "grpo": {"per_device_train_batch_size": 32, "num_generations": 8, "max_completion_length": 5,
             "learning_rate": 1e-3, "temperature": 1.0},
}


@dataclass(frozen=True)
class AdditionTask(Task):
    """Addition of two ``digits``-digit numbers; ``n_heldout`` pairs are kept out of training."""

    digits: int = 2
    n_heldout: int = 400
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.digits <= 6:
            raise GradlensError(f"AdditionTask: digits must be in 1..6, got {self.digits}")
        if not 0 < self.n_heldout < self.n_pairs // 2:
            raise GradlensError(f"AdditionTask: n_heldout must be in 1..{self.n_pairs // 2 - 1}, got {self.n_heldout}")

    @property
    def operand_range(self) -> range:
        low = 10 ** (self.digits - 1) if self.digits > 1 else 0
        return range(low, 10**self.digits)

    @property
    def n_pairs(self) -> int:
        return len(self.operand_range) ** 2

    def split(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Disjoint (train, held-out) operand pairs, fixed by ``seed``."""
        pairs = [(a, b) for a in self.operand_range for b in self.operand_range]
        random.Random(self.seed).shuffle(pairs)
        return pairs[self.n_heldout :], pairs[: self.n_heldout]

    @staticmethod
    def prompt(a: int, b: int) -> str:
        return f"{a}+{b}="

    @staticmethod
    def answer(a: int, b: int) -> str:
        return str(a + b)

    name = "addition"
    train_split = "train"
    eval_split = "heldout"
    eval_max_new_tokens = 8
    add_special_tokens = False  # the toy tokenizer has no BOS; prompts are generated as TRL tokenizes them

    def dataset(self, split: str = "train", n: int | None = None) -> Dataset:
        """A TRL-ready dataset with ``prompt``, ``completion`` and ``answer`` columns (prompt-completion format).

        SFTTrainer trains on the completion only; GRPOTrainer ignores ``completion`` and passes ``answer`` to the
        reward function.
        """
        self.check_split(split, ("train", "heldout"))
        train, heldout = self.split()
        pairs = (train if split == "train" else heldout)[:n]
        return Dataset.from_dict(
            {
                "prompt": [self.prompt(a, b) for a, b in pairs],
                "completion": [self.answer(a, b) for a, b in pairs],
                "answer": [self.answer(a, b) for a, b in pairs],
            }
        )

    def is_correct(self, completion: str, answer: str) -> bool:
        return exact_match(completion, answer)

    def reward_functions(self) -> list[RewardFunction]:
        return [exact_match_reward]

    def trl_defaults(self, regime: str) -> dict[str, Any]:
        return dict(TRL_DEFAULTS[regime])


def carryless_sum(a: int, b: int) -> int:
    """The sum with every carry dropped (digit-wise addition mod 10): the toy base model's systematic error."""
    out, place = 0, 1
    while a or b:
        out += ((a % 10 + b % 10) % 10) * place
        a, b, place = a // 10, b // 10, place * 10
    return out
