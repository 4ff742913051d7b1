"""The task seam: everything a training or evaluation stage needs to know about a task, behind one interface.

A :class:`Task` gives the data (TRL-ready ``prompt``/``completion``/``answer`` columns per split), the GRPO reward
functions, the correctness rule used by evaluation, how prompts are rendered for generation, and the task's own TRL
defaults. Record, train, probe and compare take a Task and nothing else about the data, so a new task is one class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from gradlens.errors import GradlensError

RewardFunction = Callable[..., list[float]]


def completion_text(completion: Any) -> str:
    """The text of a TRL completion: a plain string, or the last message of a conversational completion."""
    if isinstance(completion, list):
        return completion[-1]["content"] if completion else ""
    return str(completion)


def exact_match(completion: Any, answer: str) -> bool:
    """Whether a completion is exactly the answer, whitespace stripped."""
    return completion_text(completion).strip() == str(answer).strip()


def exact_match_reward(prompts: list, completions: list, answer: list[str], **kwargs: Any) -> list[float]:
    """TRL reward function: 1.0 when the completion (whitespace stripped) is exactly the answer, else 0.0."""
    return [float(exact_match(c, a)) for c, a in zip(completions, answer, strict=True)]


class Task(ABC):
    """One task: data splits, prompts, rewards and the correctness rule of evaluation.

    ``train_split``/``eval_split`` name the splits :meth:`dataset` serves; ``prompt_format`` is ``plain`` or
    ``chat`` and ``format_reason`` says why (both recorded in every result's provenance); ``eval_max_new_tokens``
    bounds each evaluation answer; ``add_special_tokens`` says whether plain prompts get the tokenizer's BOS at
    generation, as TRL gives them.
    """

    name: str = "task"
    train_split: str = "train"
    eval_split: str = "test"
    prompt_format: str = "plain"
    format_reason: str = "the task's prompts are plain text"
    eval_max_new_tokens: int = 256

    @abstractmethod
    def dataset(self, split: str, n: int | None = None):
        """A ``datasets.Dataset`` of one split with ``prompt``, ``completion`` (SFT target) and ``answer`` columns;
        ``n``: only the first n rows."""

    @abstractmethod
    def is_correct(self, completion: str, answer: str) -> bool:
        """Whether a generated completion answers correctly (the rule of the reward and of evaluation)."""

    @abstractmethod
    def reward_functions(self) -> list[RewardFunction]:
        """TRL reward functions for GRPO (each gets the dataset columns as keyword arguments)."""

    @property
    def add_special_tokens(self) -> bool:
        return self.prompt_format == "plain"

    def prompt_texts(self, prompts: Sequence[Any], tokenizer: Any) -> list[str]:
        """Prompts (a ``prompt`` column) as the model sees them at generation: chat prompts are rendered."""
        if self.prompt_format != "chat":
            return [str(p) for p in prompts]
        return [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]

    def trl_defaults(self, regime: str) -> dict[str, Any]:
        """TRL settings this task runs well with where the user sets nothing (none by default)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """The task as provenance: name, splits and prompt format."""
        return {"task": self.name, "train_split": self.train_split, "eval_split": self.eval_split,
                "prompt_format": self.prompt_format, "prompt_format_reason": self.format_reason,
                "eval_max_new_tokens": self.eval_max_new_tokens}

    def check_split(self, split: str, splits: Sequence[str]) -> None:
        if split not in splits:
            raise GradlensError(f"task {self.name}: no split {split!r} (splits: {', '.join(splits)})")
