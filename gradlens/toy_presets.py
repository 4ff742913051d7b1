"""Named sizes of the toy base model: light to import (no torch), so bad preset names fail instantly.

A leaf outside the :mod:`gradlens.toy` package, so the configs (which check a ``toy:PRESET`` name before any
training) and the tasks (the addition task's digits) need nothing of the toy world itself."""

from __future__ import annotations

from dataclasses import dataclass

from gradlens.errors import GradlensError


@dataclass(frozen=True)
class ToyPreset:
    """Sizes of the toy Qwen2 model and the budget of its pretraining recipe."""

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
}


def get_preset(name: str) -> ToyPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise GradlensError(f"unknown toy preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
