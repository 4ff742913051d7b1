"""``GradientRecorder`` on real (tiny) TRL runs: the recorded gradients against an independent autograd reference.

Every exactness test snapshots the ``lora_B`` weights at the beginning of each optimizer step, rebuilds the step's
batch, computes the loss the trainer optimises from the model's plain logits, and takes ``torch.autograd.grad`` with
respect to every ``lora_B``. The recorder stores the post-clip gradient ``g * c``, so ``stored / clip_coef`` must equal
the reference to float32 precision, and the stored gradient must equal the reference times the clip coefficient that
``torch.nn.utils.clip_grad_norm_`` applies (``max_norm / (norm + 1e-6)`` when the norm exceeds ``max_norm``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors
import torch
from transformers import TrainerCallback
from trl import GRPOTrainer, SFTTrainer

from gradlens import open_run
from gradlens.errors import GradlensError
from gradlens.lora import lora_b_parameters, lora_config
from gradlens.models import load_model
from gradlens.modules import match_modules
from gradlens.record.checks import RecorderWarning
from gradlens.record.recorder import LOG_PREFIX, GradientRecorder
from gradlens.tasks.addition import AdditionTask
from gradlens.tasks.base import completion_text
from gradlens.training.settings import build_trl_config
from gradlens.training.trl_trainer import build_trainer

# --------------------------------------------------------------------------------------------------------------------
# Helpers
from tests.helpers.recorder import (
    N_TRAIN,
    SFT_SETTINGS,
    RewardTask,
    SnapshotLoraB,
    assert_grad_close,
    global_norm,
    lora_model,
    recorded,
    restore_lora_b,
    sft_reference,
    sft_step_batches,
    sft_trainer,
    torch_clip_coef,
)


class ObservingGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` that keeps a copy of every training micro-batch ``_prepare_inputs`` hands to the loss."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen_inputs: list[dict[str, torch.Tensor]] = []

    def _prepare_inputs(self, generation_batch):
        inputs = super()._prepare_inputs(generation_batch)
        if self.model.training:
            self.seen_inputs.append({k: v.detach().clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)})
        return inputs


def record_sft(out: Path, *, recorder: dict | None = None, snapshot: bool = False, **overrides):
    """Train a toy SFT run with the recorder attached; returns (trainer, recorder, snapshot callback or None)."""
    trainer = sft_trainer(out.parent, **overrides)
    snaps = SnapshotLoraB() if snapshot else None
    if snaps is not None:
        trainer.add_callback(snaps)
    rec = GradientRecorder.attach(trainer, out, **(recorder or {}))
    trainer.train()
    return trainer, rec, snaps


# --------------------------------------------------------------------------------------------------------------------
# 1. Exactness, SFT


def test_sft_records_exact_post_clip_gradients(tmp_path: Path) -> None:
    max_norm, lr, steps = SFT_SETTINGS["max_grad_norm"], SFT_SETTINGS["learning_rate"], SFT_SETTINGS["max_steps"]
    trainer, rec, snaps = record_sft(tmp_path / "run", snapshot=True)
    run = open_run(tmp_path / "run")
    model = trainer.model
    # The loss mirrored by sft_reference: normalised by the label count of the whole step (num_items_in_batch).
    assert trainer.model_accepts_loss_kwargs and trainer.args.average_tokens_across_devices
    assert run.steps == [1, 2, 3] and rec.steps_recorded == 3
    assert len(run.modules) == 14 and run.meta["complete"]
    assert len(snaps.snapshots) == steps
    # The optimizer really moved the weights between steps (so each step is checked against its own weights).
    for a, b in zip(snaps.snapshots, snaps.snapshots[1:], strict=False):
        assert max(float((a[n] - b[n]).abs().max()) for n in a) > 1e-3

    model.train()
    clipped = []
    for step in run.steps:
        restore_lora_b(model, snaps.snapshots[step - 1])
        loss, ref = sft_reference(model, run.modules, sft_step_batches(trainer, step))
        grads, meta = recorded(run, step)
        norm = global_norm(ref)  # every trainable parameter is a recorded lora_B here
        coef = meta["clip_coef"]
        assert 0 < coef <= 1
        for name in run.modules:
            assert_grad_close(grads[name] / coef, ref[name], f"step {step} {name} (raw)")
            assert_grad_close(grads[name], ref[name] * torch_clip_coef(norm, max_norm), f"step {step} {name} (clip)")
        assert meta["grad_norm"] == pytest.approx(norm, rel=1e-5)
        assert meta["b_grad_norm"] == pytest.approx(norm, rel=1e-5)
        assert meta["grad_norm_clipped"] == pytest.approx(min(norm, max_norm), rel=1e-5)
        if norm > max_norm:
            assert coef == pytest.approx(max_norm / (norm + 1e-6), rel=1e-5)
            clipped.append(step)
        else:
            assert coef == 1.0
        assert meta["loss"] == pytest.approx(loss, rel=1e-5)
        assert meta["learning_rate"] == pytest.approx(lr * (1 - (step - 1) / steps), rel=1e-9)
    assert clipped and len(clipped) < steps, f"want clipped and unclipped steps, clipped: {clipped}"
    assert not any(r["zero_gradient"] for r in run.step_records) and rec.signal.share == 0.0


# --------------------------------------------------------------------------------------------------------------------
# 2. Exactness, GRPO


def digit_match_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """Deterministic graded reward in [0, 1]: the share of positions where the completion matches the answer."""
    out = []
    for completion, target in zip(completions, answer, strict=True):
        text = completion_text(completion).strip()
        out.append(sum(a == b for a, b in zip(text, target, strict=False)) / max(len(text), len(target), 1))
    return out


def completion_logps(model, inputs: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """Per-token log-probabilities of the completion tokens, from the full logits divided by the temperature."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    k = inputs["completion_ids"].size(1)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -k - 1 : -1].float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)


def test_grpo_records_exact_post_clip_gradients(tmp_path: Path) -> None:
    steps, spg, temperature, max_norm = 4, 2, 1.2, 0.1
    model, tokenizer = lora_model()
    args = build_trl_config("grpo", str(tmp_path / "trainer"), {
        "max_steps": steps, "per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 5,
        "steps_per_generation": spg, "beta": 0.0, "temperature": temperature, "learning_rate": 1e-2,
        "max_grad_norm": max_norm, "logging_steps": 1, "disable_tqdm": True, "seed": 0})
    trainer = ObservingGRPOTrainer(model=model, reward_funcs=digit_match_reward, args=args,
                                   train_dataset=AdditionTask().dataset("train", N_TRAIN), processing_class=tokenizer)
    # The loss mirrored below: TRL's default DAPO loss, token-level ratios, no KL term, no extra masks or bonuses.
    assert trainer.loss_type == "dapo" and trainer.beta == 0.0 and trainer.num_iterations == 1
    assert trainer.importance_sampling_level == "token" and trainer.top_entropy_quantile == 1.0
    assert trainer.off_policy_mask_threshold is None and not trainer.use_vllm and args.delta is None
    assert not getattr(trainer, "_entropy_bonus_enabled", False) and args.gradient_accumulation_steps == 1
    snaps = SnapshotLoraB()
    trainer.add_callback(snaps)
    GradientRecorder.attach(trainer, tmp_path / "run")
    with pytest.warns(RecorderWarning, match="consecutive optimizer steps train on the same GRPO generation batch"):
        trainer.train()

    run = open_run(tmp_path / "run")
    assert run.steps == [1, 2, 3, 4] and len(trainer.seen_inputs) == steps
    records = run.step_records
    # steps_per_generation=2: steps 1, 2 train on generation batch 0, steps 3, 4 on generation batch 1.
    assert [r["generation_batch"] for r in records] == [0, 0, 1, 1]

    model.train()
    params = dict(lora_b_parameters(model))
    nonzero = 0
    for step in run.steps:
        inputs = trainer.seen_inputs[step - 1]
        first = (step - 1) // spg * spg + 1  # the step whose weights generated this batch
        pair = trainer.seen_inputs[first - 1 : first - 1 + spg]
        # DAPO normalises by the completion tokens of the whole generation batch, spread over its spg steps.
        gen_tokens = sum(int(b["completion_mask"].sum()) for b in pair)
        assert int(inputs["num_items_in_batch"]) == gen_tokens
        normalizer = gen_tokens / spg
        restore_lora_b(model, snaps.snapshots[first - 1])
        with torch.no_grad():
            old = completion_logps(model, inputs, temperature)
        mask = inputs["completion_mask"].float()
        if "old_per_token_logps" in inputs:  # TRL's own (fused-head) copy agrees with ours
            assert float(((inputs["old_per_token_logps"] - old) * mask).abs().max()) < 1e-4
        restore_lora_b(model, snaps.snapshots[step - 1])
        logps = completion_logps(model, inputs, temperature)
        ratio = torch.exp(logps - old)
        adv = inputs["advantages"].unsqueeze(1)
        eps_low, eps_high = trainer.epsilon_low, trainer.epsilon_high
        per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
        loss = (per_token * mask).sum() / normalizer
        ref = dict(zip(run.modules, (g.numpy().astype(np.float64) for g in torch.autograd.grad(
            loss, [params[n] for n in run.modules])), strict=True))

        grads, meta = recorded(run, step)
        norm = global_norm(ref)
        assert meta["loss"] == pytest.approx(float(loss.detach()), rel=1e-4, abs=1e-7)
        assert meta["grad_norm"] == pytest.approx(norm, rel=1e-5, abs=1e-9)
        assert meta["zero_gradient"] is (norm == 0)
        if norm == 0:  # every group had equal rewards: nothing to learn, nothing to clip
            assert meta["clip_coef"] == 1.0 and all(not g.any() for g in grads.values())
            assert meta["zero_reward_std"] is True and meta["frac_reward_zero_std"] == 1.0
            continue
        nonzero += 1
        assert meta["clip_coef"] == pytest.approx(torch_clip_coef(norm, max_norm), rel=1e-5)
        for name in run.modules:
            assert_grad_close(grads[name] / meta["clip_coef"], ref[name], f"step {step} {name} (raw)")
            assert_grad_close(grads[name], ref[name] * torch_clip_coef(norm, max_norm), f"step {step} {name} (clip)")
    assert nonzero >= 2, "the run should have at least two steps with a learning signal"
    assert any(r["clip_coef"] < 1 for r in records)

    # Reward statistics of each generation batch, recomputed from the prompts and completions it trained on.
    for gen in range(steps // spg):
        pair = trainer.seen_inputs[gen * spg : (gen + 1) * spg]
        rewards = []
        for b in pair:
            prompts = tokenizer.batch_decode(b["prompt_ids"], skip_special_tokens=True)
            completions = tokenizer.batch_decode(b["completion_ids"], skip_special_tokens=True)
            answers = [str(sum(int(x) for x in p.rstrip("=").split("+"))) for p in prompts]
            rewards += digit_match_reward(prompts, completions, answers)
        for r in records[gen * spg : (gen + 1) * spg]:
            assert 0.0 <= r["reward_mean"] <= 1.0
            assert r["reward_mean"] == pytest.approx(np.mean(rewards), abs=1e-6)
            assert r["reward_std"] == pytest.approx(np.std(rewards, ddof=1), abs=1e-6)


def test_grpo_every_n_steps_keeps_each_steps_own_rewards_and_loss(tmp_path: Path) -> None:
    """A step skipped by ``every_n_steps`` must not leak its loss, or lose its rewards, to the next recorded step."""
    settings = {"max_steps": 4, "per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 5,
                "steps_per_generation": 2, "beta": 0.0, "temperature": 1.2, "learning_rate": 1e-2,
                "logging_steps": 1, "disable_tqdm": True, "seed": 0}

    runs = {}
    for every in (1, 2):
        model, tokenizer = lora_model()
        trainer = build_trainer("grpo", model, tokenizer, AdditionTask().dataset("train", N_TRAIN),
                                RewardTask(reward=digit_match_reward), output_dir=str(tmp_path / f"trainer{every}"),
                                settings=settings)
        GradientRecorder.attach(trainer, tmp_path / f"run{every}", every_n_steps=every)
        with pytest.warns(RecorderWarning, match="same GRPO generation batch"):  # steps_per_generation=2
            trainer.train()
        runs[every] = {r["step"]: r for r in open_run(tmp_path / f"run{every}").step_records}
    assert sorted(runs[2]) == [2, 4]
    for step in (2, 4):
        for key in ("loss", "reward_mean", "reward_std", "grad_norm"):
            assert runs[2][step][key] == pytest.approx(runs[1][step][key], rel=1e-5, abs=1e-8), (step, key)
        for key in ("generation_batch", "zero_reward_std", "zero_gradient"):
            assert runs[2][step][key] == runs[1][step][key], (step, key)


# --------------------------------------------------------------------------------------------------------------------
# 3. Invariance under gradient accumulation


def test_batch_4_equals_batch_1_times_accumulation_4(tmp_path: Path) -> None:
    # SGD, so that float32 rounding differences between the two runs stay of their own size (Adam's first update is
    # ~lr * sign(g), which turns a rounding difference of a near-zero entry into a full-size one).
    common = {"max_steps": 2, "optim": "sgd", "learning_rate": 0.1, "max_grad_norm": 0.05}
    runs = []
    for bs, ga in ((4, 1), (1, 4)):
        out = tmp_path / f"bs{bs}_ga{ga}" / "run"
        trainer, _, _ = record_sft(out, per_device_train_batch_size=bs, gradient_accumulation_steps=ga, **common)
        assert trainer.state.global_step == 2
        runs.append(open_run(out))
    a, b = runs
    assert a.steps == b.steps == [1, 2] and a.modules == b.modules
    for step in (1, 2):
        ga_, ma = recorded(a, step)
        gb, mb = recorded(b, step)
        assert ma["clip_coef"] < 1 and mb["clip_coef"] < 1
        for name in a.modules:
            assert_grad_close(gb[name] / mb["clip_coef"], ga_[name] / ma["clip_coef"], f"step {step} {name} (raw)")
            assert_grad_close(gb[name], ga_[name], f"step {step} {name} (clipped)")
        for key in ("grad_norm", "loss", "clip_coef"):
            assert mb[key] == pytest.approx(ma[key], rel=1e-5), key


# --------------------------------------------------------------------------------------------------------------------
# A plain 4-step SFT run that the option tests compare with


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    record_sft(out, max_steps=4)
    return open_run(out)


def assert_same_gradients(run, reference, steps=None, rtol: float = 1e-6) -> None:
    for name in run.modules:
        assert_grad_close(run.gradients(name), reference.gradients(name, steps or run.steps), name, rtol=rtol)


# --------------------------------------------------------------------------------------------------------------------
# 4. Accumulators


def test_accumulators_equal_sums_over_the_raw_gradients(tmp_path: Path, full_run) -> None:
    acc = full_run.accumulators()
    assert list(acc.steps) == full_run.steps == [1, 2, 3, 4]
    for name in full_run.modules:
        g = full_run.gradients(name).astype(np.float64)  # stored float32, exactly the values accumulated
        m = acc[name]
        scale = float(np.abs(g).max())
        assert m.count == len(g)
        np.testing.assert_allclose(m.sum, g.sum(0), rtol=1e-9, atol=1e-12 * scale)
        np.testing.assert_allclose(m.sumsq, (g * g).sum(0), rtol=1e-9, atol=1e-12 * scale**2)
        np.testing.assert_allclose(m.sumabs, np.abs(g).sum(0), rtol=1e-9, atol=1e-12 * scale)
        np.testing.assert_array_equal(m.sumsign, np.sign(g).sum(0))
        np.testing.assert_array_equal(m.nonzero, (g != 0).sum(0))
        flat = g.reshape(len(g), -1)
        np.testing.assert_allclose(m.sqnorm, (flat * flat).sum(1), rtol=1e-9)
        assert math.isnan(m.dot_prev[0])
        np.testing.assert_allclose(m.dot_prev[1:], (flat[1:] * flat[:-1]).sum(1), rtol=1e-9, atol=1e-12 * scale**2)

    # Accumulators only: the same statistics, no shard files, and no raw gradients to read.
    out = tmp_path / "lean" / "run"
    record_sft(out, max_steps=4, recorder={"save_raw": False})
    lean = open_run(out)
    assert lean.meta["save_raw"] is False and lean.steps == full_run.steps and lean.meta["shards"] == []
    assert not list(out.rglob("shard-*")) and not (out / "shards").exists()
    with pytest.raises(GradlensError, match="save_raw"):
        lean.gradients(lean.modules[0])
    lean_acc = lean.accumulators()
    for name in full_run.modules:
        for key in ("sum", "sumsq", "sumabs", "sumsign", "nonzero", "sqnorm", "dot_prev"):
            np.testing.assert_allclose(getattr(lean_acc[name], key), getattr(acc[name], key), rtol=1e-6,
                                       atol=1e-12, err_msg=f"{name} {key}")
    for a, b in zip(lean.step_records, full_run.step_records, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["clip_coef"] == pytest.approx(b["clip_coef"])


# --------------------------------------------------------------------------------------------------------------------
# 5. Options


@pytest.mark.parametrize(
    ("modules", "expected"),
    [
        (["v_proj", "down_proj"],
         [f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.v_proj", "mlp.down_proj")]),
        (lambda name: name.startswith("model.layers.1."), None),
        (["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.o_proj"],
         ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.o_proj"]),
    ],
    ids=["projection-types", "callable", "exact-names"],
)
def test_module_filter_records_only_the_chosen_modules(tmp_path: Path, full_run, modules, expected) -> None:
    if expected is None:
        expected = [n for n in full_run.modules if n.startswith("model.layers.1.")]
        assert len(expected) == 7
    assert match_modules(full_run.modules, modules) == expected
    out = tmp_path / "run"
    record_sft(out, max_steps=4, recorder={"modules": modules})
    run = open_run(out)
    assert run.modules == expected
    assert run.steps == full_run.steps
    assert_same_gradients(run, full_run)  # the chosen modules' gradients, unchanged by the filter
    # b_grad_norm covers the recorded modules only; grad_norm and clipping stay those of the whole adapter.
    for rec, ref in zip(run.step_records, full_run.step_records, strict=True):
        assert rec["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
        assert rec["b_grad_norm"] < ref["b_grad_norm"]


def test_every_n_steps_records_every_nth_step_with_its_own_meta(tmp_path: Path, full_run) -> None:
    out = tmp_path / "run"
    record_sft(out, max_steps=4, recorder={"every_n_steps": 2})
    run = open_run(out)
    assert run.steps == [2, 4]
    assert_same_gradients(run, full_run, steps=[2, 4])
    reference = {r["step"]: r for r in full_run.step_records}
    for rec in run.step_records:
        for key in ("loss", "learning_rate", "grad_norm", "clip_coef", "b_grad_norm"):
            assert rec[key] == pytest.approx(reference[rec["step"]][key], rel=1e-6), key
    assert list(run.accumulators().steps) == [2, 4]


def test_bfloat16_storage_rounds_the_float32_gradients(tmp_path: Path, full_run) -> None:
    out = tmp_path / "run"
    record_sft(out, max_steps=4, recorder={"dtype": "bfloat16"})
    run = open_run(out)
    assert run.meta["dtype"] == "bfloat16"
    with safetensors.safe_open(next((out / "shards").glob("*.safetensors")), framework="pt") as shard:
        assert {shard.get_slice(k).get_dtype() for k in shard.keys()} == {"BF16"}
    rounded_somewhere = False
    for name in run.modules:
        low, full = run.gradients(name), full_run.gradients(name)
        assert np.all(np.abs(low - full) <= 2.0**-8 * np.abs(full)), name  # within one bfloat16 rounding
        as_bf16 = torch.from_numpy(low).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(low, as_bf16)  # really stored as bfloat16 values
        rounded_somewhere |= bool((low != full).any())
    assert rounded_somewhere
    # The accumulators are fed the float32 gradients, before the cast to the storage dtype.
    acc, ref = run.accumulators(), full_run.accumulators()
    for name in run.modules:
        np.testing.assert_allclose(acc[name].sumsq, ref[name].sumsq, rtol=1e-6, atol=1e-15)
        np.testing.assert_allclose(acc[name].sum, ref[name].sum, rtol=1e-6, atol=1e-12)


class WaitForWriter(TrainerCallback):
    """Waits at each step end until the recorder's background writer has taken the step in, so that the live
    diagnostics logged right after reflect that step (the writer otherwise may lag behind the training loop)."""

    def __init__(self, recorder: GradientRecorder) -> None:
        self.recorder = recorder

    def on_step_end(self, args, state, control, **kwargs):
        deadline = time.monotonic() + 60
        while self.recorder.writer.latest.get("step") != state.global_step:
            assert time.monotonic() < deadline, "the background writer did not take the step in"
            time.sleep(0.001)


def test_live_diagnostics_reach_the_training_logs(tmp_path: Path) -> None:
    out = tmp_path / "run"
    trainer = sft_trainer(tmp_path, max_steps=4, logging_steps=2)
    rec = GradientRecorder.attach(trainer, out)
    trainer.add_callback(WaitForWriter(rec))
    trainer.train()
    run = open_run(out)
    meta = {r["step"]: r for r in run.step_records}
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [2, 4]
    g = {s: run.step_vector(s).astype(np.float64) for s in run.steps}
    for h in logs:
        s = h["step"]
        assert h[f"{LOG_PREFIX}b_grad_norm"] == pytest.approx(meta[s]["b_grad_norm"], rel=1e-12)
        assert h[f"{LOG_PREFIX}b_grad_norm"] == pytest.approx(h["grad_norm"], rel=1e-5)  # all trainable = all B
        cos = g[s] @ g[s - 1] / (np.linalg.norm(g[s]) * np.linalg.norm(g[s - 1]))
        assert h[f"{LOG_PREFIX}cos_prev"] == pytest.approx(cos, rel=1e-6)
        n = sum((g[t] != 0).astype(np.int64) for t in range(1, s + 1))  # each entry over its own non-zero steps
        signs = (np.abs(sum(np.sign(g[t]) for t in range(1, s + 1)))[n > 0] / n[n > 0]).mean()
        assert h[f"{LOG_PREFIX}sign_stability"] == pytest.approx(signs, rel=1e-9)
    # The training logs are untouched otherwise, and the final summary gets no live values.
    summary = trainer.state.log_history[-1]
    assert "train_runtime" in summary and not any(k.startswith(LOG_PREFIX) for k in summary)


def test_frozen_second_adapter_is_not_recorded(tmp_path: Path, full_run) -> None:
    model, tokenizer = lora_model()
    model.add_adapter("ref", lora_config(model))  # GRPO-style frozen reference adapter; "default" stays active
    assert model.active_adapters == ["default"]
    assert sum("lora_B" in n for n, _ in model.named_parameters()) == 28
    out = tmp_path / "run"
    trainer = sft_trainer(tmp_path, (model, tokenizer), max_steps=4)
    GradientRecorder.attach(trainer, out)
    trainer.train()
    run = open_run(out)
    assert run.modules == full_run.modules and len(run.modules) == 14
    assert_same_gradients(run, full_run)


# --------------------------------------------------------------------------------------------------------------------
# 6. Bad input


def test_model_without_lora_fails_at_train_begin(tmp_path: Path) -> None:
    model, tokenizer = load_model("toy:tiny")
    args = build_trl_config("sft", str(tmp_path / "trainer"), {**SFT_SETTINGS, "max_steps": 1})
    trainer = SFTTrainer(model=model, args=args, train_dataset=AdditionTask().dataset("train", 8),
                         processing_class=tokenizer)
    GradientRecorder.attach(trainer, tmp_path / "run")
    with pytest.raises(GradlensError, match="no PEFT LoRA adapter"):
        trainer.train()
    assert trainer.state.global_step == 0 and not (tmp_path / "run").exists()


def test_module_filter_matching_nothing_names_the_filter(tmp_path: Path) -> None:
    trainer = sft_trainer(tmp_path, max_steps=1)
    GradientRecorder.attach(trainer, tmp_path / "run", modules=["nonexistent_proj"])
    with pytest.raises(GradlensError, match="nonexistent_proj.*matches none"):
        trainer.train()
    assert trainer.state.global_step == 0 and not (tmp_path / "run").exists()


def test_output_dir_holding_another_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    record_sft(out, max_steps=1, recorder={"modules": ["v_proj"]})
    manifest = (out / "manifest.json").read_bytes()
    for resume, needle in ((False, r"already holds a run \(GradientRecorder\(\.\.\., resume=True\) continues it\)"),
                           (True, "cannot resume")):
        trainer = sft_trainer(tmp_path, max_steps=1)
        GradientRecorder.attach(trainer, out, resume=resume)  # all 14 modules: a different run
        with pytest.raises(GradlensError, match=needle):
            trainer.train()
        assert trainer.state.global_step == 0
    assert (out / "manifest.json").read_bytes() == manifest
    assert open_run(out).steps == [1]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"every_n_steps": 0}, "every_n_steps"), ({"every_n_steps": -2}, "every_n_steps"),
     ({"dtype": "int8"}, "int8"), ({"dtype": "float64"}, "float64"), ({"steps_per_shard": 0}, "steps_per_shard")],
)
def test_bad_settings_fail_at_construction(tmp_path: Path, kwargs: dict, needle: str) -> None:
    with pytest.raises(GradlensError, match=needle):
        GradientRecorder(tmp_path / "run", **kwargs)
    assert not (tmp_path / "run").exists()
