"""``GradientRecorder`` beyond gradient exactness, on real (tiny) GRPO and SFT runs: generation batches across
accumulation, epochs and ``--resume``, shared generation batches, runs without a learning signal, private Trainer state
that is missing, the exit hook, and the precision of the clip statistics' sums.

The generation-batch index is checked against TRL's own micro-batch counter (``GRPOTrainer._step``, read by the test
only) and against an uninterrupted run; the no-signal flags against the rewards the reward function handed out.
"""

from __future__ import annotations

import atexit
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

from gradlens import open_run
from gradlens.config import RecordConfig
from gradlens.lora import lora_b_parameters
from gradlens.record.checks import RecorderWarning
from gradlens.record.recorder import NORM_CHUNK, GradientRecorder, sums_of_squares
from gradlens.tasks.addition import AdditionTask
from gradlens.tasks.base import completion_text
from gradlens.training import record
from gradlens.training.trl_trainer import build_trainer
from tests.helpers.recorder import RewardTask, lora_model, sft_trainer

GRPO = {"per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 4, "beta": 0.0,
        "learning_rate": 1e-2, "logging_steps": 1, "disable_tqdm": True, "seed": 0}


def text_reward(prompts, completions, **kwargs) -> list[float]:
    """A reward that varies within most groups (the sampled completions differ): a learning signal."""
    return [float(sum(map(ord, completion_text(c)))) for c in completions]


def zero_reward(prompts, completions, **kwargs) -> list[float]:
    return [0.0] * len(completions)


class TRLMicroBatches(TrainerCallback):
    """Observation only: TRL's own count of micro-batches at each optimizer step (it regenerates when
    ``_step % (steps_per_generation * num_iterations) == 0``, so the last micro-batch's generation batch follows)."""

    def __init__(self, trainer) -> None:
        self.trainer, self.seen = trainer, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.seen.append(self.trainer._step)


def grpo_trainer(tmp_path: Path, reward=text_reward, n_train: int = 64, **overrides):
    model, tokenizer = lora_model()
    return build_trainer("grpo", model, tokenizer, AdditionTask().dataset("train", n_train), RewardTask(reward=reward),
                         output_dir=str(tmp_path / "trainer"), settings={**GRPO, **overrides})


def messages(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, RecorderWarning)]


# --------------------------------------------------------------------------------------------------------------------
# Generation batches


@pytest.mark.parametrize(
    ("settings", "n_train", "shared"),
    [({"max_steps": 4, "steps_per_generation": 2}, 64, True),
     # 3 prompts: an epoch is 3 micro-batches, so every second optimizer step takes 1 micro-batch instead of 2
     ({"max_steps": 5, "gradient_accumulation_steps": 2, "steps_per_generation": 3, "per_device_train_batch_size": 4},
      3, True),
     ({"max_steps": 3, "gradient_accumulation_steps": 4, "steps_per_generation": 2, "num_iterations": 2}, 64, False)],
    ids=["spg2", "partial-epochs", "accumulation-covers-iterations"])
def test_generation_batch_follows_trls_micro_batch_counter(tmp_path: Path, settings: dict, n_train: int,
                                                           shared: bool) -> None:
    trainer = grpo_trainer(tmp_path, n_train=n_train, **settings)
    GradientRecorder.attach(trainer, tmp_path / "run")
    trl = TRLMicroBatches(trainer)
    trainer.add_callback(trl)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    run = open_run(tmp_path / "run")
    every = trainer.args.steps_per_generation * trainer.args.num_iterations
    assert run.steps == list(range(1, settings["max_steps"] + 1))
    assert [r["generation_batch"] for r in run.step_records] == [(s - 1) // every for s in trl.seen]
    reuse = [m for m in messages(caught) if "same GRPO generation batch" in m]
    assert len(reuse) == int(shared)
    if shared:  # names the settings to change
        for name in ("steps_per_generation", "num_iterations", "gradient_accumulation_steps", "generation_batch_size"):
            assert name in reuse[0]
        assert run.meta["config"]["recorder"]["warnings"] == reuse
    if n_train == 3:
        assert trl.seen == [2, 3, 5, 6, 8]  # the counter TRL keeps across epochs, partial steps included


def test_shrunk_batch_with_kept_generation_batch_size_warns(tmp_path: Path) -> None:
    """The recipe's generation_batch_size kept while the batch flags shrink: 4 optimizer steps per generation."""
    trainer = grpo_trainer(tmp_path, max_steps=2, generation_batch_size=32)
    assert trainer.args.steps_per_generation == 4 and trainer.args.gradient_accumulation_steps == 1
    GradientRecorder.attach(trainer, tmp_path / "run")
    with pytest.warns(RecorderWarning, match=r"generation_batch_size=32 .* steps_per_generation 4") as caught:
        trainer.train()
    assert len([m for m in messages(caught) if "same GRPO generation batch" in m]) == 1
    assert [r["generation_batch"] for r in open_run(tmp_path / "run").step_records] == [0, 0]


def test_default_grpo_settings_do_not_warn(tmp_path: Path) -> None:
    trainer = grpo_trainer(tmp_path, max_steps=2, gradient_accumulation_steps=2)
    GradientRecorder.attach(trainer, tmp_path / "run")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert messages(caught) == []
    records = open_run(tmp_path / "run").step_records
    assert [r["generation_batch"] for r in records] == [0, 1]
    assert not any(r["zero_gradient"] or r["zero_reward_std"] for r in records)


def grpo_config(out: Path, max_steps: int, resume: bool = False) -> RecordConfig:
    # 4 micro-batches per generation batch, 2 per optimizer step: a generation batch lasts two steps. Constant
    # learning rate, so a shorter first leg trains exactly like the uninterrupted run.
    trl = {"per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 4,
           "gradient_accumulation_steps": 2, "steps_per_generation": 4, "lr_scheduler_type": "constant",
           "save_strategy": "steps", "save_steps": 2, "logging_steps": 100, "disable_tqdm": True}
    return RecordConfig(regime="grpo", out=str(out), max_steps=max_steps, n_train=64, seed=0, resume=resume, trl=trl)


def test_grpo_resume_from_a_trainer_checkpoint_continues_generation_batches(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RecorderWarning)  # the shared generation batches: tested above
        reference = open_run(record(grpo_config(tmp_path / "ref", 6), progress=False).path)
        record(grpo_config(tmp_path / "run", 4), progress=False)  # interrupted after step 4 (checkpoint-4)
        result = record(grpo_config(tmp_path / "run", 6, resume=True), progress=False)
    resumed = open_run(result.path)
    assert (result.path / "trainer" / "checkpoint-4").is_dir() and resumed.meta["complete"]
    assert resumed.steps == reference.steps == [1, 2, 3, 4, 5, 6]
    assert [r["generation_batch"] for r in reference.step_records] == [0, 0, 1, 1, 2, 2]
    assert [r["generation_batch"] for r in resumed.step_records] == [0, 0, 1, 1, 2, 2]
    # The resumed steps train like the uninterrupted ones (same prompts, restored RNG, optimizer and weights).
    for a, b in zip(resumed.step_records, reference.step_records, strict=True):
        for key in ("reward_mean", "reward_std", "loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), (a["step"], key)


# --------------------------------------------------------------------------------------------------------------------
# No learning signal


def test_zero_reward_grpo_run_is_flagged_and_warned(tmp_path: Path) -> None:
    trainer = grpo_trainer(tmp_path, reward=zero_reward, max_steps=3)
    rec = GradientRecorder.attach(trainer, tmp_path / "run")
    with pytest.warns(RecorderWarning) as caught:
        trainer.train()
    said = messages(caught)
    assert len(said) == 3, said  # the first step of each reason, then the summary; nothing per later step
    assert "step 1 learns nothing: every GRPO group" in said[0]
    assert "step 1 learns nothing: every recorded LoRA-B gradient is exactly zero" in said[1]
    assert said[2].startswith("3 of 3 recorded steps (100%) had no learning signal")
    run = open_run(tmp_path / "run")
    for r in run.meta["steps"]:  # the step records of the manifest
        assert r["zero_reward_std"] is True and r["zero_gradient"] is True
        assert r["frac_reward_zero_std"] == 1.0 and r["reward_mean"] == 0.0 and r["b_grad_norm"] == 0.0
    assert rec.signal.share == 1.0 and rec.signal.counts["no_signal"] == 3
    assert all(not run.step_vector(s).any() for s in run.steps)


def test_share_of_steps_without_signal_matches_the_rewards_handed_out(tmp_path: Path) -> None:
    """Odd generation batches get a constant reward, even ones a varying one; one generation per step."""
    handed: list[np.ndarray] = []

    def alternating(prompts, completions, **kwargs):
        out = zero_reward(prompts, completions) if len(handed) % 2 == 0 else text_reward(prompts, completions)
        handed.append(np.asarray(out))
        return out

    trainer = grpo_trainer(tmp_path, reward=alternating, max_steps=4)
    rec = GradientRecorder.attach(trainer, tmp_path / "run")
    with pytest.warns(RecorderWarning, match="had no learning signal"):
        trainer.train()
    records = open_run(tmp_path / "run").step_records
    assert len(handed) == len(records) == 4
    G = trainer.args.num_generations
    expected = [bool((r.reshape(-1, G).std(axis=1) == 0).all()) for r in handed]  # every group equal
    assert 0 < sum(expected) < 4
    assert [r["zero_reward_std"] for r in records] == expected
    assert [r["zero_gradient"] for r in records] == expected  # beta = 0: equal rewards give exactly zero gradient
    assert rec.signal.share == pytest.approx(np.mean(expected))


def test_sft_steps_with_all_zero_gradients_are_flagged(tmp_path: Path) -> None:
    """A LoRA-FA adapter whose frozen A is zero: B's gradient is exactly zero at every step, the loss is not."""
    model, tokenizer = lora_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.zero_()
    trainer = sft_trainer(tmp_path, (model, tokenizer), max_steps=3)
    rec = GradientRecorder.attach(trainer, tmp_path / "run")
    with pytest.warns(RecorderWarning) as caught:
        trainer.train()
    said = messages(caught)
    assert len(said) == 2 and "step 1 learns nothing: every recorded LoRA-B gradient is exactly zero" in said[0]
    assert "3 of 3 recorded steps (100%)" in said[1] and "zero reward" not in said[1]
    records = open_run(tmp_path / "run").step_records
    assert all(r["zero_gradient"] and r["loss"] > 0 and "zero_reward_std" not in r for r in records)
    assert rec.signal.share == 1.0
    assert all(not p.detach().any() for _, p in lora_b_parameters(model))  # B never moved


def test_record_returns_the_share_of_steps_without_signal(tmp_path: Path) -> None:
    """A prompt file whose answers cannot fit max_completion_length: exact-match reward 0 everywhere."""
    task = tmp_path / "task.jsonl"
    task.write_text("\n".join(f'{{"prompt": "{a}+{a}=", "answer": "{a}{a}{a}{a}"}}' for a in range(10, 40)))
    config = RecordConfig(regime="grpo", out=str(tmp_path / "run"), task=str(task), max_steps=2,
                          trl={"per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 2,
                               "logging_steps": 100, "disable_tqdm": True})
    with pytest.warns(RecorderWarning, match="2 of 2 recorded steps"):
        result = record(config, progress=False)
    assert result.no_signal_share == 1.0 and result.signal["zero_reward_std"] == 2


# --------------------------------------------------------------------------------------------------------------------
# Private Trainer state


class Hide(TrainerCallback):
    """Removes a Trainer attribute for the callbacks that follow in on_train_begin, as a transformers or TRL version
    without it would; ``restore`` (a later callback) puts it back so that the Trainer itself keeps working."""

    def __init__(self, trainer, name: str) -> None:
        self.trainer, self.name, self.value = trainer, name, None
        self.restore = Restore(self)

    def on_train_begin(self, args, state, control, **kwargs):
        self.value = getattr(self.trainer, self.name)
        delattr(self.trainer, self.name)


class Restore(TrainerCallback):
    def __init__(self, hide: Hide) -> None:
        self.hide = hide

    def on_train_begin(self, args, state, control, **kwargs):
        setattr(self.hide.trainer, self.hide.name, self.hide.value)


def hide_around_recorder(trainer, name: str) -> None:
    hide = Hide(trainer, name)
    trainer.callback_handler.callbacks.insert(0, hide)  # before the recorder (attached first)
    trainer.add_callback(hide.restore)


@pytest.mark.parametrize("name", ["_tr_loss", "_globalstep_last_logged"])
def test_missing_loss_state_is_said_once_and_leaves_loss_empty(tmp_path: Path, name: str) -> None:
    trainer = sft_trainer(tmp_path, max_steps=3)
    GradientRecorder.attach(trainer, tmp_path / "run")
    hide_around_recorder(trainer, name)
    with pytest.warns(RecorderWarning) as caught:
        trainer.train()
    said = messages(caught)
    assert len(said) == 1 and name in said[0] and "step field(s) loss stay empty" in said[0], said
    run = open_run(tmp_path / "run")
    assert run.meta["config"]["recorder"]["warnings"] == [said[0]]
    assert [r["loss"] for r in run.step_records] == [None] * 3
    assert all(r["grad_norm"] > 0 for r in run.step_records)  # everything else is recorded


def test_missing_grpo_metrics_are_said_once_and_leave_rewards_empty(tmp_path: Path) -> None:
    trainer = grpo_trainer(tmp_path, max_steps=2)
    GradientRecorder.attach(trainer, tmp_path / "run")
    hide_around_recorder(trainer, "_metrics")
    with pytest.warns(RecorderWarning) as caught:
        trainer.train()
    said = messages(caught)
    assert len(said) == 1 and "_metrics" in said[0] and "reward_mean, reward_std, zero_reward_std" in said[0], said
    records = open_run(tmp_path / "run").step_records
    assert all(r["reward_mean"] is None and r["zero_reward_std"] is None and r["loss"] is not None for r in records)
    assert [r["generation_batch"] for r in records] == [0, 1]  # from public state, unaffected


# --------------------------------------------------------------------------------------------------------------------
# Exit hook and clip statistics


class ExitHooks:
    """Pass-through wrappers of ``atexit.register``/``unregister`` that keep what is still registered (the ``atexit``
    module cannot list its hooks, and its ``_ncallbacks`` counts unregistered slots too)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.live: list = []
        register, unregister = atexit.register, atexit.unregister

        def tracked_register(func, *args, **kwargs):
            self.live.append(func)
            return register(func, *args, **kwargs)

        def tracked_unregister(func):
            self.live = [f for f in self.live if f != func]
            return unregister(func)

        monkeypatch.setattr(atexit, "register", tracked_register)
        monkeypatch.setattr(atexit, "unregister", tracked_unregister)

    def recorders(self) -> list:
        """The live hooks registered by gradlens (other packages, e.g. tqdm, register their own)."""
        return [f for f in self.live if getattr(f, "__module__", "").startswith("gradlens")]


class SeeExitHooks(TrainerCallback):
    def __init__(self, hooks: ExitHooks) -> None:
        self.hooks, self.during = hooks, None

    def on_step_end(self, args, state, control, **kwargs):
        self.during = self.hooks.recorders()


def test_close_unregisters_the_exit_hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hook that flushes an unclosed run at exit is registered while recording and gone once closed."""
    hooks = ExitHooks(monkeypatch)
    for i in range(2):
        trainer = sft_trainer(tmp_path / str(i), max_steps=1)
        rec = GradientRecorder.attach(trainer, tmp_path / str(i) / "run")
        see = SeeExitHooks(hooks)
        trainer.add_callback(see)
        trainer.train()  # closes the recorder at train end
        assert len(see.during) == 1
        assert hooks.recorders() == []
        rec.close()  # closing twice is harmless
        assert hooks.recorders() == [] and open_run(tmp_path / str(i) / "run").meta["complete"]


def test_sums_of_squares_equal_float64_sums_to_float32_precision() -> None:
    """Float32 norms of chunks with a float64 total: the error stays that of one chunk (a random walk of at most
    sqrt(NORM_CHUNK) roundings, relative), whatever the tensor's size, its scale or its dtype."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(2**22, generator=g) * 1e-3  # 64 chunks; one float32 norm of it is off by ~1500 eps on CPU
    small = [torch.randn(37, 8, generator=g) * 10.0**k for k in range(-4, 4)]
    low = [torch.randn(3000, 16, generator=g).to(torch.bfloat16), torch.randn(5, generator=g).to(torch.float16)]
    groups = ([big, *small], [], low, [small[0], low[0]])
    got = sums_of_squares(groups, torch.device("cpu"))
    assert got.dtype == torch.float64 and got.shape == (4,)
    tol = math.sqrt(NORM_CHUNK) * float(np.finfo(np.float32).eps)
    for value, group in zip(got.tolist(), groups, strict=True):
        expected = sum(float(np.square(t.double().numpy()).sum()) for t in group)
        assert value == pytest.approx(expected, rel=tol, abs=0.0)
