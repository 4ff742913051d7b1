"""Sparse-B training (A frozen, only masked entries of B train), its export as a PEFT adapter, and the SHiRA mapping.

Every run is a real TRL run on the shipped ``toy:tiny`` base model with random, seeded 5% masks. The gradient masking
is checked against independent references: the full gradient from ``torch.autograd.grad`` (or the raw micro-batch
gradients seen by a hook registered before the mask's), masked and clipped by the test itself.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from peft import PeftModel, ShiraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import TrainerCallback

from gradlens import open_run
from gradlens.errors import GradlensError
from gradlens.lora import attach_lora, lora_b_parameters
from gradlens.models import load_model
from gradlens.record.recorder import GradientRecorder
from gradlens.sparse import MASK_FILE, SparseBCallback, apply_mask, export_adapter, shira_mask_fn
from gradlens.sparse.masks import load_mask
from gradlens.tasks.addition import AdditionTask
from gradlens.training.trl_trainer import build_trainer
from tests.helpers.models import float32_tolerance

SHARE = 0.05
# AdamW with weight decay: decay alone would move a masked entry that ever became non-zero, so "exactly 0" is earned.
COMMON = {"max_steps": 6, "learning_rate": 1e-2, "weight_decay": 0.1, "optim": "adamw_torch", "logging_steps": 1,
          "disable_tqdm": True, "seed": 0}
SFT = {**COMMON, "per_device_train_batch_size": 8}
GRPO = {**COMMON, "per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 4}
PROVENANCE = {"selector": "random", "budget": "5%", "scope": "per_module", "seed": 0, "source_run": None,
              "scoring_seconds": 0.0}


def toy_lora(r: int = 8):
    model, tokenizer = load_model("toy:tiny")
    return attach_lora(model, r=r), tokenizer


def random_mask(model, share: float = SHARE, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.random(tuple(p.shape)) < share for name, p in lora_b_parameters(model)}


def lora_b(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in lora_b_parameters(model)}


def train(regime: str, model, tokenizer, tmp_path, mask, **overrides):
    data = AdditionTask().dataset("train", 64)
    if regime == "sft":
        trainer = build_trainer("sft", model, tokenizer, data, AdditionTask(), output_dir=str(tmp_path / "trainer"),
                                settings={**SFT, **overrides})
    else:
        trainer = build_trainer("grpo", model, tokenizer, data, AdditionTask(), output_dir=str(tmp_path / "trainer"),
                                settings={**GRPO, **overrides})
    callback = SparseBCallback.attach(trainer, mask)
    trainer.train()
    return trainer, callback


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


def batch_loss(model, tokenizer, n: int, offset: int = 0) -> torch.Tensor:
    """Next-token loss on ``n`` addition examples ``prompt + answer``: any differentiable loss of the model will do."""
    data = AdditionTask().dataset("train", offset + n)
    texts = [p + c for p, c in zip(data["prompt"][offset:], data["completion"][offset:], strict=True)]
    ids = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    labels = ids["input_ids"].masked_fill(ids["attention_mask"] == 0, -100)
    return model(**ids, labels=labels).loss


# --------------------------------------------------------------------------------------------------------------------
# The mask holds through real SFT and GRPO runs


@pytest.mark.parametrize(("regime", "beta"), [("sft", None), ("grpo", 0.0), ("grpo", 0.04)])
def test_masked_entries_stay_zero_and_selected_entries_train(regime, beta, tmp_path):
    model, tokenizer = toy_lora()
    mask = random_mask(model)
    before = lora_b(model)
    trainer, callback = train(regime, model, tokenizer, tmp_path, mask, **({} if beta is None else {"beta": beta}))
    assert trainer.state.global_step == 6
    after = lora_b(model)
    assert set(callback.sparse.params) == set(mask) == set(after)
    moved = {}
    for name, keep in mask.items():
        keep = torch.from_numpy(keep)
        assert not after[name][~keep].any(), name  # exactly 0, despite AdamW's weight decay
        moved[name] = int((after[name][keep] != before[name][keep]).sum())
    # AdamW's first update of an entry with a non-zero gradient is about +-lr whatever the gradient's size, and the
    # gradient of B[i, c] (a sum over tokens of dL/dh_i * (A x)_c) is zero only by exact cancellation: so every
    # selected entry moves as soon as one step has a non-zero loss gradient (for GRPO, one group with mixed rewards).
    assert all(keep.any() for keep in mask.values())
    assert moved == {name: int(keep.sum()) for name, keep in mask.items()}

    if beta:  # GRPO wrapped the PeftModel with a frozen copy of the adapter as reference: the mask left it alone
        assert "ref" in model.peft_config
        ref = dict(lora_b_parameters(model, adapter="ref"))
        assert {id(p) for p in ref.values()}.isdisjoint(id(p) for p in callback.sparse.params.values())
        assert not any(p.any() for p in ref.values())  # the copy of the zero-initialised B, never trained
        assert any(h["kl"] > 0 for h in trainer.state.log_history if "kl" in h)  # the reference was really used

    # on_train_end removed the hooks: a plain backward now reaches the masked-out entries again
    batch_loss(model, tokenizer, 4).backward()
    name = next(iter(mask))
    grad = dict(lora_b_parameters(model))[name].grad
    assert grad[~torch.from_numpy(mask[name])].abs().sum() > 0


# --------------------------------------------------------------------------------------------------------------------
# The gradient is masked before accumulation and clipping


def test_hooks_mask_each_backward_before_accumulation_and_clipping():
    model, tokenizer = toy_lora(r=4)
    mask = random_mask(model)
    params = dict(lora_b_parameters(model))
    keep = {name: torch.from_numpy(m) for name, m in mask.items()}
    # Dense training first: a B with every entry non-zero, and AdamW momentum on every entry.
    optimizer = torch.optim.AdamW(list(params.values()), lr=1e-2, weight_decay=0.1)
    batch_loss(model, tokenizer, 4, offset=8).backward()
    optimizer.step()
    optimizer.zero_grad()
    trained = {name: p.detach().clone() for name, p in params.items()}
    assert all(t.all() for t in trained.values())
    sparse = apply_mask(model, mask)  # must turn the dense B into the sparse adapter the mask describes
    for name, p in params.items():
        assert torch.equal(p[keep[name]], trained[name][keep[name]]) and not p[~keep[name]].any()
    sparse.remove()

    # Reference, without hooks: the full gradient of two micro-batches' summed loss, masked and clipped by hand.
    loss = batch_loss(model, tokenizer, 4) + batch_loss(model, tokenizer, 4, offset=4)
    full = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    masked = {name: g.masked_fill(~keep[name], 0) for name, g in full.items()}
    masked_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in masked.values()))
    full_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in full.values()))
    assert full_norm > 2 * masked_norm  # masking changes the norm a lot, so clipping the wrong one would show
    max_norm = 1e-3

    sparse = apply_mask(model, mask)
    batch_loss(model, tokenizer, 4).backward()  # two backward passes accumulate into .grad, as under accumulation
    batch_loss(model, tokenizer, 4, offset=4).backward()
    for name, p in params.items():
        assert not p.grad[~keep[name]].any()
        torch.testing.assert_close(p.grad, masked[name], rtol=1e-5, atol=1e-8)
    total = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))  # what the Trainer calls
    assert total == pytest.approx(masked_norm, rel=1e-5)
    for name, p in params.items():
        torch.testing.assert_close(p.grad, masked[name] * (max_norm / (masked_norm + 1e-6)), rtol=1e-5, atol=1e-10)

    optimizer.step()  # the momentum of the dense step moves masked-out entries despite their zero gradient
    assert all(p[~keep[name]].all() for name, p in params.items())
    sparse.enforce()
    for name, p in params.items():
        assert not p[~keep[name]].any()
        assert (p[keep[name]] != trained[name][keep[name]]).all()


def test_sparse_training_resumed_from_a_dense_checkpoint_keeps_masked_entries_at_zero(tmp_path):
    """Resuming restores B and AdamW's moments for every entry before ``on_train_begin``: the mask then zeroes the
    masked-out entries, and only the re-zeroing after each optimizer step keeps their momentum from moving them."""
    model, tokenizer = toy_lora()
    mask = random_mask(model)
    data = AdditionTask().dataset("train", 64)
    settings = {**SFT, "max_steps": 2, "save_strategy": "steps", "save_steps": 1}
    dense = build_trainer("sft", model, tokenizer, data, AdditionTask(), output_dir=str(tmp_path / "t"),
                          settings=settings)
    dense.train()
    trainer = build_trainer("sft", toy_lora()[0], tokenizer, data, AdditionTask(), output_dir=str(tmp_path / "t"),
                            settings=settings)
    callback = SparseBCallback.attach(trainer, mask)
    trainer.train(resume_from_checkpoint=str(tmp_path / "t" / "checkpoint-1"))
    assert trainer.state.global_step == 2
    for name, p in callback.sparse.params.items():
        keep = torch.from_numpy(mask[name])
        assert not p[~keep].any(), name
        assert p[keep].all(), name


class RawGradients(TrainerCallback):
    """Sums each micro-batch's raw ``lora_B`` gradient through a tensor hook registered *before* the mask's."""

    def __init__(self, mask: dict[str, np.ndarray]) -> None:
        self.keep = {name: torch.from_numpy(m) for name, m in mask.items()}
        self.raw: dict[str, torch.Tensor] = {}
        self.norms: list[tuple[float, float]] = []  # (masked, raw) pre-clip norm of each optimizer step

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.params = dict(lora_b_parameters(model))
        for name, p in self.params.items():
            p.register_hook(lambda g, name=name: self.raw.__setitem__(name, self.raw.get(name, 0) + g.detach()))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        masked = {name: g.masked_fill(~self.keep[name], 0) for name, g in self.raw.items()}
        masked_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in masked.values()))
        raw_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in self.raw.values()))
        self.norms.append((masked_norm, raw_norm))
        coef = min(1.0, args.max_grad_norm / (masked_norm + 1e-6))  # torch.nn.utils.clip_grad_norm_'s factor
        for name, p in self.params.items():
            torch.testing.assert_close(p.grad, masked[name] * coef, rtol=1e-5, atol=1e-10)
        self.raw = {}


def test_trainer_clips_the_masked_gradient_and_the_recorder_sees_it(tmp_path):
    model, tokenizer = toy_lora()
    mask = random_mask(model)
    trainer = build_trainer("sft", model, tokenizer, AdditionTask().dataset("train", 64), AdditionTask(),
                            output_dir=str(tmp_path / "t"),
                            settings={**SFT, "max_steps": 2, "per_device_train_batch_size": 4,
                                      "gradient_accumulation_steps": 2, "max_grad_norm": 1e-3})
    GradientRecorder.attach(trainer, tmp_path / "run")
    SparseBCallback.attach(trainer, mask)
    raw = RawGradients(mask)
    trainer.callback_handler.callbacks.insert(0, raw)  # its hook goes on before the mask's
    trainer.train()

    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(raw.norms) == len(logged) == 2
    for (masked_norm, raw_norm), norm in zip(raw.norms, logged, strict=True):
        assert norm == pytest.approx(masked_norm, rel=1e-4)  # the Trainer's pre-clip norm is the masked one
        assert raw_norm > 2 * masked_norm and masked_norm > 1e-3  # so it did clip, and not the raw gradient
    run = open_run(tmp_path / "run")
    assert run.steps == [1, 2]
    for record, (masked_norm, _) in zip(run.step_records, raw.norms, strict=True):
        assert record["grad_norm"] == pytest.approx(masked_norm, rel=1e-4)
        assert record["b_grad_norm"] == pytest.approx(masked_norm, rel=1e-4)
    for name, keep in mask.items():
        grads = run.gradients(name)
        assert not grads[:, ~keep].any() and grads[:, keep].any()


# --------------------------------------------------------------------------------------------------------------------
# Export as a plain PEFT adapter


def test_export_round_trips_through_plain_peft(tmp_path):
    model, tokenizer = toy_lora()
    mask = random_mask(model)
    train("sft", model, tokenizer, tmp_path, mask)
    out = export_adapter(model, tmp_path / "adapter", mask, {**PROVENANCE, "k": "ignored: save_mask counts"})
    assert out == tmp_path / "adapter"
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", MASK_FILE}
    saved = {k.removeprefix("base_model.model.").removesuffix(".lora_B.weight"): v
             for k, v in load_file(out / "adapter_model.safetensors").items() if ".lora_B." in k}
    assert saved.keys() == mask.keys()  # the active adapter only, in PEFT's own format
    assert all(not v[~torch.from_numpy(mask[n])].any() and v.any() for n, v in saved.items())

    loaded_mask, meta = load_mask(out / MASK_FILE)
    assert loaded_mask.keys() == mask.keys() and all(np.array_equal(loaded_mask[n], m) for n, m in mask.items())
    assert meta["selector"] == "random" and meta["k"] == str(sum(int(m.sum()) for m in mask.values()))

    ids = tokenizer(["37+45=82", "12+34=46", "99+1=100"], add_special_tokens=False, padding=True,
                    return_tensors="pt")
    model.eval()
    with torch.no_grad():
        expected = model(**ids).logits
        loaded = PeftModel.from_pretrained(load_model("toy:tiny")[0], out).eval()
        tol = float32_tolerance(expected)  # a float32 merge reorders sums: tolerance from scale and epsilon
        torch.testing.assert_close(loaded(**ids).logits, expected, rtol=0, atol=tol)
        merged = loaded.merge_and_unload().eval()
        torch.testing.assert_close(merged(**ids).logits, expected, rtol=0, atol=tol)
        base_logits = load_model("toy:tiny")[0].eval()(**ids).logits
    assert (base_logits - expected).abs().max() > 100 * tol  # the adapter did change the model, far beyond rounding


def test_export_refuses_non_zero_masked_entries_and_non_peft_models(tmp_path):
    model, _ = toy_lora()
    mask = random_mask(model)
    name, p = next(iter(lora_b_parameters(model)))
    row, col = np.argwhere(~mask[name])[0]
    with torch.no_grad():
        p[row, col] = 1.0
    with pytest.raises(GradlensError, match=f"{name} has 1 non-zero entries outside the mask") as err:
        export_adapter(model, tmp_path / "a", mask, PROVENANCE)
    assert str(tmp_path / "a") in one_line_error(err)
    assert not (tmp_path / "a").exists()
    with pytest.raises(GradlensError, match="Qwen2ForCausalLM"):
        export_adapter(model.get_base_model(), tmp_path / "b", mask, PROVENANCE)


# --------------------------------------------------------------------------------------------------------------------
# Bad masks


def test_masks_that_do_not_fit_are_refused_in_one_line(make_tiny_model):
    model = attach_lora(make_tiny_model(), r=4)
    mask = random_mask(model)
    first = next(iter(mask))
    missing = {n: m for n, m in mask.items() if n != first}
    with pytest.raises(GradlensError, match=f"has no module {first}") as err:
        apply_mask(model, missing)
    one_line_error(err)
    wrong_shape = {**mask, first: np.zeros((3, 4), dtype=bool)}
    with pytest.raises(GradlensError, match=rf"module {first} has shape \(3, 4\), the adapter's is \(64, 4\)") as err:
        apply_mask(model, wrong_shape)
    one_line_error(err)
    with pytest.raises(GradlensError, match="module lm_head is not in the adapter") as err:
        apply_mask(model, {**mask, "lm_head": np.zeros((4, 4), dtype=bool)})
    one_line_error(err)
    with pytest.raises(GradlensError, match=f"mask of module {first} is float64, not bool") as err:
        apply_mask(model, {**mask, first: mask[first].astype(float)})
    one_line_error(err)
    with pytest.raises(GradlensError, match="no PEFT LoRA adapter") as err:
        apply_mask(make_tiny_model(), mask)
    one_line_error(err)


# --------------------------------------------------------------------------------------------------------------------
# SHiRA


def test_shira_mask_fn_builds_a_peft_shira_model_with_the_sparse_b_support():
    model, tokenizer = toy_lora()
    mask = random_mask(model)
    lora_a = {name: layer.lora_A["default"].weight.detach().numpy().copy()
              for name, layer in model.base_model.model.named_modules() if hasattr(layer, "lora_A")}
    fn = shira_mask_fn(mask, model)
    r = 2
    config = ShiraConfig(r=r, target_modules=["q_proj", "v_proj", "down_proj"])
    config.mask_fn = fn
    shira = get_peft_model(model.unload(), config)  # the same base layers, now without LoRA

    layers = {name.removeprefix("base_model.model."): m for name, m in shira.named_modules()
              if hasattr(m, "shira_indices")}
    assert len(layers) == 6
    for name, layer in layers.items():
        base = layer.get_base_layer()
        weight_mask = fn(base, r)
        assert weight_mask.shape == base.weight.shape and weight_mask.dtype == base.weight.dtype
        d_out, d_in = base.weight.shape
        indices = layer.shira_indices["default"]
        assert torch.equal(indices.long(), torch.stack(torch.where(weight_mask == 1)))
        assert indices.shape[1] == r * (d_out + d_in) == layer.shira_weight["default"].numel()
        # Independently: only rows the sparse-B update can change, and there the largest sum over selected c of |A|
        keep = mask[name]
        rows = keep.any(axis=1)
        score = keep.astype(np.float64) @ np.abs(lora_a[name].astype(np.float64))
        chosen = weight_mask.numpy().astype(bool)
        assert rows[chosen.any(axis=1)].all()
        assert score[chosen].min() >= score[rows][~chosen[rows]].max() - 1e-6

    with torch.no_grad():  # SHiRA weights start at zero: the model is still the base model
        ids = tokenizer(["37+45="], add_special_tokens=False, return_tensors="pt")
        torch.testing.assert_close(shira(**ids).logits, shira.get_base_model()(**ids).logits)

    too_big = ShiraConfig(r=60, target_modules=["k_proj"])
    too_big.mask_fn = fn
    with pytest.raises(GradlensError, match=r"SHiRA r=60 needs .* use r <= \d+") as err:
        get_peft_model(shira.unload(), too_big)
    one_line_error(err)
    uncovered = ShiraConfig(r=1, target_modules=["lm_head"])
    uncovered.mask_fn = fn
    with pytest.raises(GradlensError, match="not the base layer of a module the mask covers"):
        get_peft_model(load_model("toy:tiny")[0], uncovered)
