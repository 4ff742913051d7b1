"""Checks of what the recorder is given (the engines it cannot read are in :mod:`gradlens.engines`): what makes a
recorded run mean less than it seems, said while it records: private Trainer state the recorder cannot find, GRPO
generation batches shared by consecutive optimizer steps, and steps without a learning signal.

Each is a :class:`RecorderWarning` on the console; setup warnings are also stored in the manifest (``config.recorder.
warnings``) and every step record carries its own ``zero_gradient`` / ``zero_reward_std`` flags.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from gradlens.errors import GradlensWarning

# TRL's per-generation-batch reward metrics (GRPOTrainer._metrics["train"]) the recorder copies into each step.
REWARD_METRICS = ("reward", "reward_std", "frac_reward_zero_std")
REWARD_FIELDS = "reward_mean, reward_std, zero_reward_std"
class RecorderWarning(GradlensWarning):
    """A recorded run that may not mean what it seems: missing Trainer state, shared generation batches, or steps
    without a learning signal."""


def micro_batches_through(step: int, accumulation: int, per_epoch: int | None) -> int:
    """Micro-batches the Trainer has run by the end of optimizer step ``step`` (1-based): ``accumulation`` a step,
    except that the last step of each epoch of ``per_epoch`` micro-batches takes only what is left
    (``Trainer._run_epoch``); ``per_epoch`` None: a dataloader without a length, no epochs."""
    if per_epoch is None:
        return step * accumulation
    epochs, k = divmod(step - 1, -(-per_epoch // accumulation))
    return epochs * per_epoch + min((k + 1) * accumulation, per_epoch)


def epoch_length(dataloader: Any) -> int | None:
    """Micro-batches per epoch of the Trainer's dataloader, None without one or without a length (iterable data)."""
    try:
        return len(dataloader) if dataloader is not None else None
    except TypeError:
        return None


def generation_batch(args: Any, step: int, per_epoch: int | None) -> int:
    """The index of the GRPO generation batch that optimizer step ``step`` trained on last, from public state only.

    TRL generates once every ``steps_per_generation * num_iterations`` micro-batches (``GRPOTrainer._prepare_inputs``
    with its private counter ``_step``, which restarts at 0 on resume); an epoch holds a whole number of generation
    batches (``RepeatSampler``), so the index runs on across epochs.
    """
    micro = micro_batches_through(step, args.gradient_accumulation_steps, per_epoch)
    return (micro - 1) // (args.steps_per_generation * args.num_iterations)


def generation_reuse(args: Any) -> str | None:
    """Why consecutive optimizer steps of a GRPO run train on the same completions, or None if each has its own.

    TRL generates once every ``steps_per_generation * num_iterations`` micro-batches (``_prepare_inputs``) and an
    optimizer step takes ``gradient_accumulation_steps`` of them, so steps share a generation batch unless that is a
    multiple of the generation period (TRL's own test for stale samples in ``_generate_and_score_completions``).
    """
    spg, iters, accum = args.steps_per_generation, args.num_iterations, args.gradient_accumulation_steps
    every = spg * iters
    if accum % every == 0:
        return None
    return (f"consecutive optimizer steps train on the same GRPO generation batch: it lasts steps_per_generation={spg}"
            f" x num_iterations={iters} = {every} micro-batches (generation_batch_size={args.generation_batch_size} ="
            f" per_device_train_batch_size {args.per_device_train_batch_size} x {args.world_size} process(es) x "
            f"steps_per_generation {spg}) and an optimizer step {accum} (gradient_accumulation_steps), so the "
            "gradients of neighbouring steps are correlated by construction (step-to-step cosine up, effective rank "
            "down); for one generation batch per step make gradient_accumulation_steps a multiple of "
            "steps_per_generation x num_iterations (e.g. drop generation_batch_size and steps_per_generation)")


def missing_trainer_state(trainer: Any, grpo: bool) -> dict[str, str]:
    """{private Trainer attribute: step fields left empty} for the private state the recorder reads but cannot find.

    The running loss (transformers) and the reward metrics (TRL) have no public per-step equivalent; a rename in
    either package must be said, not turn into silent ``None``.
    """
    missing = {}
    if not isinstance(getattr(trainer, "_tr_loss", None), torch.Tensor):
        missing["_tr_loss"] = "loss"
    if not isinstance(getattr(trainer, "_globalstep_last_logged", None), int):
        missing["_globalstep_last_logged"] = "loss"
    metrics = getattr(trainer, "_metrics", None)
    if grpo and not (isinstance(metrics, dict) and isinstance(metrics.get("train"), dict)):
        missing["_metrics"] = REWARD_FIELDS
    return missing


def missing_state_note(trainer: Any, missing: dict[str, str]) -> str:
    """The one warning about ``missing`` (see :func:`missing_trainer_state`)."""
    fields = ", ".join(dict.fromkeys(missing.values()))
    return (f"{type(trainer).__name__} has no {', '.join(missing)} (private transformers/TRL state, renamed in this "
            f"version?), so the step field(s) {fields} stay empty; gradlens is tested with transformers 5 and TRL 1")


def missing_reward_metrics(trainer: Any, rewards: dict[str, Any]) -> str | None:
    """A warning if TRL's reward metrics of a generation batch lack a key the recorder copies, else None."""
    lacking = [k for k in REWARD_METRICS if k not in rewards]
    if not lacking:
        return None
    return (f"{type(trainer).__name__}._metrics['train'] has no {', '.join(lacking)} (renamed in this TRL "
            f"version?), so the step fields {REWARD_FIELDS} stay empty")


class SignalCounter:
    """Counts recorded steps without a learning signal: warns the first time each reason occurs, summarises at the end.

    A step has no signal when every recorded LoRA-B gradient is exactly zero (``zero_gradient``) or, under GRPO, every
    group of its generation batch has equal rewards (``zero_reward_std``: zero advantage everywhere).
    """

    REASONS = {"zero_reward_std": ("every GRPO group of its generation batch has equal rewards (zero advantage)",
                                   "check the reward function, max_completion_length and the prompt format"),
               "zero_gradient": ("every recorded {what} gradient is exactly zero",
                                 "check the rewards (GRPO), the loss mask and (LoRA-B) the adapter's frozen lora_A")}

    def __init__(self, warn: Callable[[str], None], grpo: bool = False, what: str = "LoRA-B") -> None:
        self.warn = warn
        self.grpo = grpo
        self.what = what  # the recorded parameters: LoRA-B, or base-weight (space weight)
        self.counts = {"steps": 0, "no_signal": 0, "zero_gradient": 0, "zero_reward_std": 0}

    def note(self, step: int, meta: dict[str, Any]) -> None:
        self.counts["steps"] += 1
        reasons = [k for k in self.REASONS if meta.get(k)]
        self.counts["no_signal"] += bool(reasons)
        for key in reasons:
            self.counts[key] += 1
            if self.counts[key] == 1:
                what, hint = self.REASONS[key]
                self.warn(f"step {step} learns nothing: {what.format(what=self.what)}; {hint} (further such steps are "
                          "counted and summarised at the end)")

    @property
    def share(self) -> float | None:
        """The share of recorded steps without a learning signal (None before the first step)."""
        return self.counts["no_signal"] / self.counts["steps"] if self.counts["steps"] else None

    def summary(self) -> str | None:
        """One line on the steps without a learning signal, or None if every recorded step had one."""
        n, bad = self.counts["steps"], self.counts["no_signal"]
        if bad == 0:
            return None
        reasons = [f"all-zero {self.what} gradients in {self.counts['zero_gradient']}"]
        if self.grpo:
            reasons.insert(0, f"zero reward variance in every group in {self.counts['zero_reward_std']}")
        return (f"{bad} of {n} recorded steps ({bad / n:.0%}) had no learning signal ({', '.join(reasons)}); their "
                "step records are flagged zero_gradient / zero_reward_std in the manifest")


def warn(message: str) -> None:
    """Say ``message`` on the console (stderr) as a :class:`RecorderWarning`."""
    warnings.warn(message, RecorderWarning, stacklevel=3)
