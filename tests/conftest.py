"""Shared fixtures: the toy character tokenizer, a factory of tiny random Qwen2 models, and the addition task with
a test's own reward."""

from __future__ import annotations

import pytest


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


