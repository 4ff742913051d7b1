"""Named sizes of the toy base model: light to import (no torch), so bad preset names fail instantly.

A leaf outside the :mod:`gradlens.toy` package, so the configs (which check a ``toy:PRESET`` name before any
training) and the tasks (the addition task's digits) need nothing of the toy world itself."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradlens.config.fields import MATH_PREFIX, TOY_PREFIX
from gradlens.errors import GradlensError

# The toy:math world's word problems (train.jsonl, test.jsonl), read by the gsm8k task like any GSM8K copy.
MATH_DATA_DIR = Path(__file__).parent / "toy" / "data" / "math"
# What --model toy:math runs with where the user sets nothing: its own data through the gsm8k task, an answer budget
# above its longest worked solution (73 tokens), and TRL settings chosen by a sweep on the first (version-1) base
# (benchmarks/results/toy_math_v1.json, exploration; docs/toy-math.md). GRPO samples at temperature 0.7, the sweep's
# best there. Measured with them on the shipped base (benchmarks/results/toy_math.json), 60 steps, seeds 0-2, 200
# held-out problems, base greedy 0.590: SFT 0.863, gain +0.273 [0.242, 0.305]; GRPO 0.765, gain +0.175 [0.081,
# 0.269], a gradient in 83% of steps, 125-138 CPU-s a run. The phase diagram's full-B GRPO sweep on the shipped base
# scores 1e-3 and 2e-3 within one validation problem of each other (4e-3 and 3.3e-4 worse).
MATH_EVAL_MAX_NEW_TOKENS = 96
MATH_TRL_DEFAULTS: dict[str, dict[str, Any]] = {
    "sft": {"per_device_train_batch_size": 16, "learning_rate": 2e-3, "max_length": 256},
    "grpo": {"per_device_train_batch_size": 16, "num_generations": 8, "max_completion_length": 96,
             "learning_rate": 2e-3, "temperature": 0.7},
}


@dataclass(frozen=True)
class ToyPreset:
    """Sizes of the toy model and the budget of its pretraining recipe; ``world`` picks the recipe: ``addition``
    (a Qwen2 over characters, :mod:`gradlens.toy.model`) or ``math`` (a Llama over BPE, :mod:`gradlens.toy.math_model`,
    whose ``carryless_share`` applies to the addition steps of its worked solutions)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    pretrain_steps: int
    batch_size: int = 128
    learning_rate: float = 3e-3
    carryless_share: float = 0.7
    digits: int = 2
    world: str = "addition"
    # Bumped when this preset's recipe changes, so that stale cached models are not reused (part of the cache key).
    recipe_version: int = 1


PRESETS: dict[str, ToyPreset] = {
    # Fast enough for every test: ~0.1M parameters, B matrices of 64 x r.
    "tiny": ToyPreset(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, pretrain_steps=1500),
    # For placement experiments: B matrices of 256 x r and 512 x r, so a 1% budget still leaves tens of entries in
    # every matrix.
    "small": ToyPreset(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, pretrain_steps=1500, learning_rate=1e-3),
    # The width axis of scripts/phase_diagram.py: twice toy:small's width, B matrices of 512 x r and 1024 x r (built
    # on first use by the seeded recipe, not shipped).
    "wide": ToyPreset(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=8, pretrain_steps=1500, learning_rate=1e-3),
    # GSM8K-style word problems with worked solutions (gradlens.toy.math_data), a 4-layer Llama of about 3M
    # parameters over a BPE vocabulary: the real gsm8k task path on a model that learns.
    "math": ToyPreset(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, pretrain_steps=3000, batch_size=32, learning_rate=3e-3, world="math",
                      recipe_version=2),
}


def get_preset(name: str) -> ToyPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise GradlensError(f"unknown toy preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


def world(model: str) -> str | None:
    """The world of a ``toy:PRESET`` model (``addition`` or ``math``), or None for any other model."""
    return get_preset(model[len(TOY_PREFIX) :]).world if model.startswith(TOY_PREFIX) else None


def default_task(model: str) -> str:
    """The task a model trains on where ``--task`` is not given: toy:math's packaged word problems through the
    gsm8k task, else the addition task."""
    return f"{MATH_PREFIX}:{MATH_DATA_DIR}" if world(model) == "math" else "addition"
