"""Shared fixtures: the toy character tokenizer, a factory of tiny random Qwen2 models, and the addition task with
a test's own reward."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from gradlens.tasks.addition import AdditionTask
from gradlens.tasks.base import exact_match_reward


@pytest.fixture(scope="session")
def char_tokenizer():
    from gradlens.toy.tokenizer import build_char_tokenizer

    return build_char_tokenizer()


@pytest.fixture
def make_tiny_model(char_tokenizer):
    """``make_tiny_model(seed=0)``: a fresh, randomly initialised Qwen2 of the ``tiny`` preset's sizes."""
    import torch
    from transformers import Qwen2ForCausalLM

    from gradlens.toy.model import build_toy_config

    def make(seed: int = 0):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(build_toy_config("tiny", char_tokenizer))
        model.generation_config.pad_token_id = char_tokenizer.pad_token_id
        model.generation_config.eos_token_id = char_tokenizer.eos_token_id
        return model

    return make


@dataclass(frozen=True)
class RewardTask(AdditionTask):
    """The addition task with a test's own GRPO reward function."""

    reward: Callable[..., list[float]] = exact_match_reward

    def reward_functions(self) -> list[Callable[..., list[float]]]:
        return [self.reward]


def float32_tolerance(reference, ulps: int = 64) -> float:
    """An absolute tolerance for float32 results that differ only in summation order (a merged weight, a fused
    kernel): ``ulps`` units of float32 rounding at the largest magnitude of ``reference``. The errors of reordered
    sums grow with the number and size of the summands, so a tolerance fixed in absolute terms sits at the rounding
    edge for some inputs (1.05e-5 against 1e-5 was seen on logits of size ~7)."""
    import torch

    scale = float(torch.as_tensor(reference).abs().max())
    return ulps * float(torch.finfo(torch.float32).eps) * max(scale, 1.0)
