"""LoRA-FA adapters (only lora_B trains) and the TRL trainer builders: one real SFT step and one real GRPO step."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from gradlens.errors import GradlensError
from gradlens.lora import attach_lora, freeze_lora_a, lora_b_parameters
from gradlens.lora import lora_config as make_lora_config
from gradlens.models import load_model_and_tokenizer
from gradlens.modules import ALL_PROJECTIONS
from gradlens.tasks.addition import AdditionTask
from gradlens.training.settings import build_trl_config
from gradlens.training.trl_trainer import build_trainer
from tests.helpers.recorder import RewardTask

N_LAYERS = 2
EXPECTED_MODULES = {f"model.layers.{i}.{'self_attn' if p in ALL_PROJECTIONS[:4] else 'mlp'}.{p}"
                    for i in range(N_LAYERS) for p in ALL_PROJECTIONS}


class GradCapture(TrainerCallback):
    """Clones every lora_B gradient right before the optimizer step (after clipping)."""

    def __init__(self):
        self.grads: dict[str, torch.Tensor | None] = {}
        self.lora_a_grads: list[torch.Tensor | None] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: None if p.grad is None else p.grad.detach().clone() for n, p in lora_b_parameters(model)}
        self.lora_a_grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]


def lora_a_snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}


@pytest.fixture
def lora_model(make_tiny_model):
    return attach_lora(make_tiny_model(), r=4)


def test_attach_lora_trains_exactly_the_lora_b_weights(lora_model):
    trainable = {n for n, p in lora_model.named_parameters() if p.requires_grad}
    assert len(trainable) == len(ALL_PROJECTIONS) * N_LAYERS == 14
    assert all(n.endswith("lora_B.default.weight") for n in trainable)
    lora_a = [p for n, p in lora_model.named_parameters() if "lora_A" in n]
    assert len(lora_a) == 14 and not any(p.requires_grad for p in lora_a)
    assert all(p.abs().sum() > 0 for p in lora_a)  # A keeps its random init; B starts at zero
    b = dict(lora_b_parameters(lora_model))
    assert set(b) == EXPECTED_MODULES
    assert all(p.shape[1] == 4 and not p.any() for p in b.values())
    assert {id(p) for p in b.values()} == {id(p) for p in lora_model.parameters() if p.requires_grad}


def test_attach_lora_is_seeded(make_tiny_model):
    def a_weights(seed):
        model = attach_lora(make_tiny_model(), r=4, seed=seed)
        return [p for n, p in model.named_parameters() if "lora_A" in n]

    first, again, other = a_weights(0), a_weights(0), a_weights(1)
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(first, other, strict=True))


def test_attach_lora_target_subset_and_bad_targets(make_tiny_model):
    model = attach_lora(make_tiny_model(), r=2, target_modules=["q_proj", "down_proj"])
    assert {n.rsplit(".", 1)[-1] for n, _ in lora_b_parameters(model)} == {"q_proj", "down_proj"}
    with pytest.raises(GradlensError, match="nope_proj") as err:
        attach_lora(make_tiny_model(), target_modules=["q_proj", "nope_proj"])
    assert "q_proj" not in str(err.value).split(";")[0]  # only the unknown one is named as unknown
    with pytest.raises(GradlensError, match="rank"):
        attach_lora(make_tiny_model(), r=0)
    with pytest.raises(GradlensError, match="target"):
        attach_lora(make_tiny_model(), target_modules=[])


def test_lora_b_parameters_skips_other_adapters(make_tiny_model):
    base = make_tiny_model()
    config = make_lora_config(base, r=4)  # made before wrapping: lora_config only sees plain nn.Linear layers
    lora_model = attach_lora(base, r=4)
    lora_model.add_adapter("ref", config)
    default = list(lora_b_parameters(lora_model))
    ref = list(lora_b_parameters(lora_model, adapter="ref"))
    assert len(default) == len(ref) == 14
    layers = dict(lora_model.named_modules())
    for name, p in default:
        layer = layers[f"base_model.model.{name}"]
        assert p is layer.lora_B["default"].weight and p is not layer.lora_B["ref"].weight
    assert {id(p) for _, p in ref}.isdisjoint(id(p) for _, p in default)
    freeze_lora_a(lora_model)  # still exactly the active adapter's B
    assert {id(p) for p in lora_model.parameters() if p.requires_grad} == {id(p) for _, p in default}


def test_freeze_lora_a_needs_an_adapter(make_tiny_model):
    with pytest.raises(GradlensError, match="LoRA"):
        freeze_lora_a(make_tiny_model())


def test_load_model_and_tokenizer_from_a_local_dir(make_tiny_model, char_tokenizer, tmp_path):
    model = make_tiny_model(seed=5)
    model.save_pretrained(tmp_path / "m")
    char_tokenizer.save_pretrained(tmp_path / "m")
    loaded, tok = load_model_and_tokenizer(tmp_path / "m")
    assert type(loaded) is type(model) and tok.pad_token_id == char_tokenizer.pad_token_id
    assert next(loaded.parameters()).dtype == torch.float32
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())

    missing = tmp_path / "missing"
    with pytest.raises(GradlensError, match="missing") as err:
        load_model_and_tokenizer(missing)
    assert str(missing) in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(GradlensError, match="empty"):
        load_model_and_tokenizer(tmp_path / "empty")


def test_trl_config_overrides_and_unknown_fields(tmp_path):
    cfg = build_trl_config("grpo", str(tmp_path), {"num_generations": 4, "max_completion_length": 5})
    assert (cfg.num_generations, cfg.max_completion_length, cfg.report_to, cfg.bf16) == (4, 5, [], False)
    with pytest.raises(GradlensError, match="not_a_field"):
        build_trl_config("sft", str(tmp_path), {"max_steps": 1, "not_a_field": 3})
    with pytest.raises(GradlensError, match="ppo"):
        build_trl_config("ppo", str(tmp_path))


def test_builders_refuse_a_model_without_lora(make_tiny_model, char_tokenizer, tmp_path):
    data = AdditionTask().dataset("train", n=8)
    with pytest.raises(GradlensError, match="LoRA"):
        build_trainer("sft", make_tiny_model(), char_tokenizer, data, AdditionTask(), output_dir=str(tmp_path))
    with pytest.raises(GradlensError, match="LoRA"):
        build_trainer("grpo", make_tiny_model(), char_tokenizer, data,
                      RewardTask(reward=lambda completions, **kw: [0.0] * len(completions)), output_dir=str(tmp_path))


def test_builders_reject_unknown_overrides(lora_model, char_tokenizer, tmp_path):
    with pytest.raises(GradlensError, match="bogus_field"):
        build_trainer("sft", lora_model, char_tokenizer, AdditionTask().dataset("train", n=8), AdditionTask(),
                      output_dir=str(tmp_path), settings={"bogus_field": 1})


def assert_one_lora_fa_step(trainer, capture: GradCapture) -> None:
    model = trainer.model
    a_before = lora_a_snapshot(model)
    trainer.train()
    assert trainer.state.global_step == 1
    assert set(capture.grads) == EXPECTED_MODULES
    assert all(g is not None and g.abs().sum() > 0 for g in capture.grads.values()), {
        n: None if g is None else float(g.norm()) for n, g in capture.grads.items()}
    assert len(capture.lora_a_grads) == 14 and all(g is None for g in capture.lora_a_grads)
    assert all(torch.equal(p, a_before[n]) for n, p in lora_a_snapshot(model).items())
    assert all(p.any() for _, p in lora_b_parameters(model))  # B moved away from zero


def test_one_sft_step_trains_only_lora_b(lora_model, char_tokenizer, tmp_path):
    capture = GradCapture()
    trainer = build_trainer("sft", lora_model, char_tokenizer, AdditionTask().dataset("train", n=16), AdditionTask(),
                            output_dir=str(tmp_path), callbacks=[capture],
                            settings={"max_steps": 1, "per_device_train_batch_size": 8, "learning_rate": 1e-2})
    assert_one_lora_fa_step(trainer, capture)


def test_one_grpo_step_trains_only_lora_b(lora_model, char_tokenizer, tmp_path):
    def reward(completions, **kwargs):
        return [float(len(c) % 3) for c in completions]

    capture = GradCapture()
    trainer = build_trainer("grpo", lora_model, char_tokenizer, AdditionTask().dataset("train", n=16),
                            RewardTask(reward=reward), output_dir=str(tmp_path), callbacks=[capture],
                            settings={"max_steps": 1, "num_generations": 4, "per_device_train_batch_size": 8,
                                            "max_completion_length": 5, "learning_rate": 1e-2})
    assert_one_lora_fa_step(trainer, capture)
