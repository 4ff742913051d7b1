"""The synthetic task: multi-digit addition with an exact-match, verifiable reward.

Prompts look like ``"37+45="`` and the answer is the decimal sum (``"82"``). The train and held-out splits are
disjoint sets of operand pairs drawn by a seeded shuffle, so held-out accuracy measures generalisation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from datasets import Dataset


@dataclass(frozen=True)
class AdditionTask:
    """Addition of two ``digits``-digit numbers; ``n_heldout`` pairs are kept out of training."""

    digits: int = 2
    n_heldout: int = 400
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.digits <= 6:
            raise ValueError(f"AdditionTask: digits must be in 1..6, got {self.digits}")
        if not 0 < self.n_heldout < self.n_pairs // 2:
            raise ValueError(f"AdditionTask: n_heldout must be in 1..{self.n_pairs // 2 - 1}, got {self.n_heldout}")

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

    def dataset(self, split: str = "train", n: int | None = None) -> Dataset:
        """A TRL-ready dataset with ``prompt``, ``completion`` and ``answer`` columns (prompt-completion format).

        SFTTrainer trains on the completion only; GRPOTrainer ignores ``completion`` and passes ``answer`` to the
        reward function.
        """
        train, heldout = self.split()
        if split not in ("train", "heldout"):
            raise ValueError(f"AdditionTask.dataset: split must be 'train' or 'heldout', got {split!r}")
        pairs = (train if split == "train" else heldout)[:n]
        return Dataset.from_dict(
            {
                "prompt": [self.prompt(a, b) for a, b in pairs],
                "completion": [self.answer(a, b) for a, b in pairs],
                "answer": [self.answer(a, b) for a, b in pairs],
            }
        )


def carryless_sum(a: int, b: int) -> int:
    """The sum with every carry dropped (digit-wise addition mod 10): the toy base model's systematic error."""
    out, place = 0, 1
    while a or b:
        out += ((a % 10 + b % 10) % 10) * place
        a, b, place = a // 10, b // 10, place * 10
    return out


def completion_text(completion: Any) -> str:
    """The text of a TRL completion: a plain string, or the last message of a conversational completion."""
    if isinstance(completion, list):
        return completion[-1]["content"] if completion else ""
    return str(completion)


def exact_match_reward(prompts: list, completions: list, answer: list[str], **kwargs: Any) -> list[float]:
    """TRL reward function: 1.0 when the completion (whitespace stripped) is exactly the answer, else 0.0."""
    return [float(completion_text(c).strip() == str(a).strip()) for c, a in zip(completions, answer, strict=True)]
