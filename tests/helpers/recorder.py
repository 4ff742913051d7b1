"""Tiny TRL runs on the toy world and the independent autograd reference the recorded gradients are checked against."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from gradlens.lora import attach_lora, lora_b_parameters
from gradlens.models import load_model
from gradlens.tasks.addition import AdditionTask
from gradlens.tasks.base import exact_match_reward
from gradlens.training.trl_trainer import build_trainer

if TYPE_CHECKING:
    from trl import SFTTrainer

N_TRAIN = 64
# Float32 forward/backward through different code paths (TRL's fused, chunked LM head vs. plain logits): observed
# errors are ~1e-6 of the gradient's norm for SFT and ~1e-5 for GRPO; a wrong normalisation or clip factor is >= 1e-2.
RTOL = 1e-4
# The Trainer's defaults for these tests: quiet, deterministic batch order, an optimizer step that changes the model.
SFT_SETTINGS = {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "max_grad_norm": 4.0,
                "train_sampling_strategy": "sequential", "logging_steps": 100, "disable_tqdm": True, "seed": 0}


def lora_model():
    model, tokenizer = load_model("toy:tiny")
    return attach_lora(model), tokenizer


def sft_trainer(tmp_path: Path, model_and_tokenizer=None, space: str = "lora_b", **overrides) -> SFTTrainer:
    model, tokenizer = model_and_tokenizer or lora_model()
    return build_trainer("sft", model, tokenizer, AdditionTask().dataset("train", N_TRAIN), AdditionTask(),
                         output_dir=str(tmp_path / "trainer"), settings={**SFT_SETTINGS, **overrides}, space=space)


def restore_lora_b(model, snapshot: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in lora_b_parameters(model):
            p.copy_(snapshot[name])


def sft_reference(model, names: list[str], micro_batches: list[dict[str, torch.Tensor]],
                  params: dict[str, torch.Tensor] | None = None):
    """(loss, gradients by name) of the completion-only token-mean cross entropy over one optimizer step.

    The Trainer's loss with ``num_items_in_batch``: the summed CE of every label != -100 (labels shifted by one, as a
    causal LM predicts the next token) over all micro-batches, divided by the number of such labels in all of them.
    ``params``: the parameters to differentiate by name (default: every ``lora_B``).
    """
    params = dict(lora_b_parameters(model)) if params is None else params
    total, count = 0.0, 0
    for b in micro_batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        labels = b["labels"][:, 1:]
        mask = labels != -100
        total = total + F.cross_entropy(logits[mask], labels[mask], reduction="sum")
        count += int(mask.sum())
    loss = total / count
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    return float(loss.detach()), {n: g.detach().numpy().astype(np.float64) for n, g in zip(names, grads, strict=True)}


def global_norm(grads: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float((g * g).sum()) for g in grads.values()))


def torch_clip_coef(norm: float, max_norm: float) -> float:
    """The factor ``torch.nn.utils.clip_grad_norm_`` multiplies the gradients by."""
    return min(1.0, max_norm / (norm + 1e-6))


def assert_grad_close(actual: np.ndarray, expected: np.ndarray, what: str, rtol: float = RTOL) -> None:
    """Equal to float32 precision: the difference is small against the reference's norm, entry by entry too."""
    actual = np.asarray(actual, np.float64)
    scale = float(np.linalg.norm(expected))
    assert scale > 0, f"{what}: reference gradient is zero"
    err = float(np.linalg.norm(actual - expected))
    assert err <= rtol * scale, f"{what}: |recorded - reference| = {err:.3g}, |reference| = {scale:.3g}"
    worst = float(np.abs(actual - expected).max())
    assert worst <= rtol * float(np.abs(expected).max()), f"{what}: max entry error {worst:.3g}"


def recorded(run, step: int) -> tuple[dict[str, np.ndarray], dict]:
    record = next(r for r in run.step_records if r["step"] == step)
    return {n: run.gradients(n, [step])[0].astype(np.float64) for n in run.modules}, record


@dataclass(frozen=True)
class RewardTask(AdditionTask):
    """The addition task with a test's own GRPO reward function."""

    reward: Callable[..., list[float]] = exact_match_reward

    def reward_functions(self) -> list[Callable[..., list[float]]]:
        return [self.reward]


class SnapshotLoraB(TrainerCallback):
    """Copies every ``lora_B`` weight at the beginning of each optimizer step (observation only)."""

    def __init__(self) -> None:
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.snapshots.append({n: p.detach().clone() for n, p in lora_b_parameters(model)})


def sft_step_batches(trainer: SFTTrainer, step: int) -> list[dict[str, torch.Tensor]]:
    """The micro-batches of optimizer step ``step`` (1-based) under sequential sampling, rebuilt with the trainer's own
    collator from the rows it tokenized."""
    bs, ga = trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps
    first = (step - 1) * bs * ga
    data = trainer.train_dataset
    return [trainer.data_collator([data[i] for i in range(first + k * bs, first + (k + 1) * bs)]) for k in range(ga)]
