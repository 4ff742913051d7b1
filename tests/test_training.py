"""The one training path (:mod:`gradlens.training`): a single ``train()`` call in the package, callbacks added first
through the Trainer's public API in their written order, a compare that loads its base model once, and the outputs
every run finishes with."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
from transformers import TrainerCallback

from gradlens.config import CompareConfig, RecordConfig
from gradlens.drift import DriftGuard
from gradlens.errors import GradlensError
from gradlens.lora import ALL_LINEAR, attach_lora, default_alpha, default_lora_targets, lora_b_parameters, require_lora
from gradlens.record.recorder import GradientRecorder
from gradlens.sparse.callback import SparseBCallback
from gradlens.training.run import TRAINER_DIR, run_training
from gradlens.training.setup import load_base, setup_run

PACKAGE = Path(__file__).resolve().parents[1] / "gradlens"
TINY = {"max_steps": 2, "per_device_train_batch_size": 8, "logging_steps": 1}


def _trainer_train_calls(source: str) -> list[int]:
    """Lines of ``X.train(...)`` calls whose receiver is not a model being put into training mode (``model.train()``
    takes no argument or a bool, a Trainer's ``train`` is what runs the loop)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "train":
            receiver = node.func.value
            if not (isinstance(receiver, ast.Name) and receiver.id == "model"):
                lines.append(node.lineno)
    return lines


def test_exactly_one_module_calls_a_trainers_train_and_none_edits_the_callback_list() -> None:
    calls = {str(f.relative_to(PACKAGE.parent)): lines for f in sorted(PACKAGE.rglob("*.py"))
             if (lines := _trainer_train_calls(f.read_text()))}
    assert list(calls) == ["gradlens/training/run.py"] and len(calls["gradlens/training/run.py"]) == 1, calls
    handler = [f"{f.relative_to(PACKAGE.parent)}:{n.lineno}" for f in sorted(PACKAGE.rglob("*.py"))
               for n in ast.walk(ast.parse(f.read_text()))
               if isinstance(n, ast.Attribute) and n.attr == "callback_handler"]
    assert handler == ["gradlens/callback_order.py:26"], handler  # read once, to pop and re-add through the API
    # the rule can fail: a second orchestrator's trainer.train() is found, model.train() is not
    assert _trainer_train_calls("trainer.train()\nmodel.train()\nself.runner.train(1)\n") == [1, 3]


class LogSink(TrainerCallback):
    """Keeps every ``logs`` dict it is handed: what a reporting integration after gradlens's callbacks sees."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def test_run_training_adds_callbacks_first_in_the_written_order(tmp_path: Path) -> None:
    config = RecordConfig(out=str(tmp_path / "out"), max_steps=2, n_train=32, trl={"per_device_train_batch_size": 8,
                                                                                     "logging_steps": 1})
    setup = setup_run(config)
    mask = {name: np.ones(tuple(p.shape), dtype=bool) for name, p in lora_b_parameters(setup.model)}
    sink = LogSink()
    result = run_training(config, out=tmp_path / "out", tool="test", setup=setup, mask=mask, mask_path="m",
                          record_dir=tmp_path / "out" / "run", drift_guard=DriftGuard(), callbacks=[sink],
                          progress=False)
    kinds = [type(c) for c in result.trainer.callback_handler.callbacks]
    assert kinds[:4] == [DriftGuard, SparseBCallback, GradientRecorder, LogSink], kinds
    assert len(kinds) > 4  # the Trainer's own follow, in their order
    # the recorder ran before the later callbacks: its live scalars are in what they were handed
    assert any("gradlens/b_grad_norm" in logs for logs in sink.logs)
    info = json.loads((tmp_path / "out" / "train.json").read_text())
    assert info["tool"] == "test" and info["mask"]["k"] == info["mask"]["entries"] and info["steps"] == 2
    assert info["drift_guard"]["checked"] and not info["drift_guard"]["drifted"]
    assert info["record"]["model"] == "toy:tiny" and info["versions"]["trl"]
    assert not (tmp_path / "out" / TRAINER_DIR).exists()  # nothing was checkpointed: no empty directory is left
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()


def test_compare_with_probes_loads_the_base_model_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two seeds, each with a probe: the base model is loaded once for the whole comparison (the old code loaded it
    again in every probe, through ``record``)."""
    import gradlens.models
    from gradlens.compare import compare

    calls: list[str] = []
    real = gradlens.models.load_model_and_tokenizer

    def spy(name, *args, **kwargs):
        calls.append(str(name))
        return real(name, *args, **kwargs)

    monkeypatch.setattr(gradlens.models, "load_model_and_tokenizer", spy)
    compare(CompareConfig(out=str(tmp_path / "c"), regimes=["sft"], methods=["random", "sign"], budgets=["5%"],
                          seeds=[0, 1], model="toy:tiny", max_steps=2, probe_steps=2, full_lrs=[3e-3],
                          sparse_lrs=[3e-2], n_val=8, n_eval=8, eval_samples=0, export=False, progress=False,
                          trl={"per_device_train_batch_size": 8}))
    assert len(calls) == 1, calls
    assert len(list((tmp_path / "c" / "probes").iterdir())) == 2  # both seeds did probe


def test_setup_run_copies_a_shared_base_and_draws_a_with_the_seed() -> None:
    config = RecordConfig(out="unused", seed=3)
    base = load_base(config)
    first, again = setup_run(config, base=base), setup_run(config, base=base)
    a = {n: p for n, p in first.model.named_parameters() if "lora_A" in n}
    b = dict(again.model.named_parameters())
    assert a and all(np.array_equal(p.detach().numpy(), b[n].detach().numpy()) for n, p in a.items())
    assert not any("lora" in n for n, _ in base.model.named_parameters())  # the shared base stays a base model
    other = setup_run(RecordConfig(out="unused", seed=4), base=base)
    n = next(iter(a))
    assert not np.array_equal(a[n].detach().numpy(), dict(other.model.named_parameters())[n].detach().numpy())


def test_lora_owns_alpha_targets_and_the_no_adapter_error(make_tiny_model) -> None:
    assert default_alpha(8) == 16 and default_alpha(8, 5) == 5
    model = make_tiny_model()
    targets = default_lora_targets(model)
    with pytest.raises(GradlensError, match=r"^the model has no PEFT LoRA adapter \(no LoraLayer found\)"):
        require_lora(model, "the model")
    peft_model = attach_lora(model, r=4, target_modules=[ALL_LINEAR])  # PEFT's and TRL's spelling of the default
    assert sorted(peft_model.peft_config["default"].target_modules) == sorted(targets)
    assert peft_model.peft_config["default"].lora_alpha == 8
    assert all(p.requires_grad == ("lora_B" in n) for n, p in peft_model.named_parameters())


def test_eval_strategy_evaluates_on_the_tasks_eval_split(tmp_path: Path) -> None:
    from gradlens.config import TrainConfig
    from gradlens.training import train

    config = TrainConfig(out=str(tmp_path / "t"), max_steps=2, n_train=32, n_eval=8, trl={
        "eval_strategy": "steps", "eval_steps": "1", "per_device_train_batch_size": "8", "disable_tqdm": "true"})
    result = train(config, progress=False)
    evals = [e for e in result.trainer.state.log_history if "eval_loss" in e]
    assert [e["step"] for e in evals] == [1, 2]  # the Trainer evaluated, on the task's eval split
    assert result.info["training_args"]["eval_strategy"] == "steps" and result.eval["n"] == 8


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"use_peft": False}, r"--use_peft false: gradlens always trains a LoRA adapter"),
    ({"trl": {"model_dtype": "bfloat16"}}, r"--model_dtype is gone: the model's dtype is now --dtype"),
    ({"trl": {"load_in_4bit": "true"}}, r"--load_in_4bit: gradlens does not support quantized base weights"),
    ({"model": "toy:small", "model_name_or_path": "toy:tiny"}, r"--model toy:small and --model_name_or_path"),
    ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
])
def test_trl_model_flags_are_checked_in_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(GradlensError, match=message):
        RecordConfig(out="x", **kwargs)


def test_model_name_or_path_is_model_and_dora_rslora_keep_only_b_trainable(make_tiny_model) -> None:
    assert RecordConfig(out="x", model_name_or_path="toy:small").model == "toy:small"
    peft_model = attach_lora(make_tiny_model(), r=4, use_dora=True, use_rslora=True)
    config = peft_model.peft_config["default"]
    assert config.use_dora and config.use_rslora
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_B" in n for n in trainable)
    assert any("lora_magnitude_vector" in n for n, _ in peft_model.named_parameters())  # DoRA's, frozen
