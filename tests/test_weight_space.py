"""``--space weight``: recording, selecting and training over the base weights W of the chosen modules (no adapter).

The recorded W gradients are checked against ``torch.autograd.grad`` of the loss the trainer optimises; sparse-W
training against the mask (exact zeros of the delta outside it, movement inside it, the trained weights equal to
base plus delta); the SHiRA export against the trained model's logits; resume against the uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import TrainerCallback

from gradlens import open_run
from gradlens.budget import Budget
from gradlens.config import RecordConfig, TrainConfig
from gradlens.errors import GradlensError
from gradlens.models import load_model
from gradlens.record.recorder import GradientRecorder
from gradlens.sparse.delta import DELTA_FILE
from gradlens.sparse.masks import save_mask
from gradlens.sparse.space import attach_weight_space, weight_parameters
from gradlens.store.runstate import run_space
from gradlens.training import record, train
from gradlens.training.run import run_training
from tests.helpers.cli import QUIET, assert_one_line_error, gradlens_inproc
from tests.helpers.models import float32_tolerance
from tests.helpers.recorder import (
    SFT_SETTINGS,
    assert_grad_close,
    global_norm,
    recorded,
    sft_reference,
    sft_step_batches,
    sft_trainer,
    torch_clip_coef,
)

QUIET_TRL = {"logging_steps": 100, "disable_tqdm": True}
PROVENANCE = {"selector": "random", "budget": "shira", "scope": "per_module", "seed": 0, "source_run": None,
              "scoring_seconds": 0.0, "space": "weight"}


class SnapshotWeights(TrainerCallback):
    """Copies every trainable base weight at the beginning of each optimizer step (observation only)."""

    def __init__(self) -> None:
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.snapshots.append({n: p.detach().clone() for n, p in weight_parameters(model)})


def shira_mask(shapes: dict[str, tuple[int, int]], r: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A random mask with SHiRA's count ``r * (d_out + d_in)`` in every module."""
    rng = np.random.default_rng(seed)
    mask = {}
    for name, (d_out, d_in) in shapes.items():
        flat = np.zeros(d_out * d_in, bool)
        flat[rng.choice(d_out * d_in, r * (d_out + d_in), replace=False)] = True
        mask[name] = flat.reshape(d_out, d_in)
    return mask


def weight_shapes() -> dict[str, tuple[int, int]]:
    model, _ = load_model("toy:tiny")
    return {n: tuple(p.shape) for n, p in weight_parameters(attach_weight_space(model))}


def test_recorded_weight_gradients_equal_autograd(tmp_path: Path) -> None:
    model, tokenizer = load_model("toy:tiny")
    attach_weight_space(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 14 and all(n.endswith("_proj.weight") for n in trainable)  # 7 projections x 2 layers
    trainer = sft_trainer(tmp_path, (model, tokenizer), space="weight")
    snaps = SnapshotWeights()
    trainer.add_callback(snaps)
    GradientRecorder.attach(trainer, tmp_path / "run", space="weight", announce=False)
    trainer.train()

    run = open_run(tmp_path / "run")
    assert run_space(run.meta) == "weight" and run.meta["config"]["recorder"]["space"] == "weight"
    params = dict(weight_parameters(model))
    assert {s.name: s.shape for s in run.specs} == {n: tuple(p.shape) for n, p in params.items()}
    assert run.steps == [1, 2, 3]
    model.train()
    for step in run.steps:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(snaps.snapshots[step - 1][name])
        loss, ref = sft_reference(model, run.modules, sft_step_batches(trainer, step), params)
        grads, meta = recorded(run, step)
        norm = global_norm(ref)  # every trainable parameter is a recorded W here
        assert meta["grad_norm"] == pytest.approx(norm, rel=1e-5) and meta["loss"] == pytest.approx(loss, rel=1e-5)
        coef = meta["clip_coef"]
        assert coef == pytest.approx(torch_clip_coef(norm, SFT_SETTINGS["max_grad_norm"]), rel=1e-5)
        for name in run.modules:
            assert_grad_close(grads[name] / coef, ref[name], f"step {step} {name}")


@pytest.fixture(scope="module")
def sparse_w(tmp_path_factory):
    """One sparse-W training run through ``gradlens.training.train``, on a SHiRA-sized mask (r=1, as --lora_r)."""
    tmp = tmp_path_factory.mktemp("sparse_w")
    mask = shira_mask(weight_shapes(), r=1)
    path = save_mask(tmp / "mask.safetensors", mask, PROVENANCE)
    # AdamW with weight decay: decay alone would move a masked-out entry, so "exactly unchanged" is earned.
    config = TrainConfig(space="weight", out=str(tmp / "out"), mask=str(path), max_steps=4, learning_rate=1e-2,
                         lora_r=1, trl={**QUIET_TRL, "weight_decay": 0.1, "per_device_train_batch_size": 8})
    return train(config, progress=False), mask, path, tmp


def test_sparse_delta_is_zero_outside_the_mask_and_moves_inside(sparse_w) -> None:
    result, mask, _, tmp = sparse_w
    out = tmp / "out"
    base = dict(weight_parameters(attach_weight_space(load_model("toy:tiny")[0])))
    trained = dict(weight_parameters(result.model))
    with safe_open(out / DELTA_FILE, "pt") as f:
        meta = f.metadata()
        delta = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    assert set(delta) == set(mask) and json.loads(meta["k"]) == sum(int(m.sum()) for m in mask.values())
    for name, m in mask.items():
        keep = torch.from_numpy(m)
        assert delta[name].shape == base[name].shape
        assert torch.count_nonzero(delta[name][~keep]) == 0, name
        assert torch.count_nonzero(delta[name][keep]) == int(m.sum()), name  # AdamW moves every trained entry
        assert torch.equal(trained[name].detach()[~keep], base[name].detach()[~keep]), name  # exactly unchanged
        assert torch.equal(delta[name], trained[name].detach() - base[name].detach()), name
    info = json.loads((out / "train.json").read_text())
    assert info["space"] == "weight" and info["mask"]["k"] == json.loads(meta["k"])
    assert info["drift_guard"]["checked"] is False and info["b_nonzero"] == json.loads(meta["k"])
    assert meta["shira_rank"] == "1" and meta["shira_adapter"] == str(out / "adapter")


def test_shira_export_reproduces_the_trained_logits(sparse_w) -> None:
    result, _, _, tmp = sparse_w
    ids = torch.tensor([[3, 5, 7, 11, 2, 9, 4, 6]])
    model = result.model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        base, _ = load_model("toy:tiny")
        base_logits = base(input_ids=ids).logits
        got = PeftModel.from_pretrained(base, tmp / "out" / "adapter").eval()(input_ids=ids).logits
    assert float((want - base_logits).abs().max()) > 100 * float32_tolerance(want)  # the adapter changes the model
    torch.testing.assert_close(got, want, rtol=0, atol=float32_tolerance(want))


def test_mixed_spaces_are_one_line_errors(sparse_w, tmp_path: Path, capsys) -> None:
    _, _, path, _ = sparse_w
    proc = gradlens_inproc(capsys, "train", "--out", str(tmp_path / "t"), "--mask", str(path), "--max_steps", "1",
                           *QUIET)
    assert_one_line_error(proc, str(path), "'weight'", "'lora_b'")
    run = tmp_path / "run"
    assert gradlens_inproc(capsys, "record", "--out", str(run), "--max_steps", "2", *QUIET).returncode == 0
    proc = gradlens_inproc(capsys, "select", str(run), "--space", "weight", "--out", str(tmp_path / "s"))
    assert_one_line_error(proc, str(run), "'lora_b'", "'weight'")
    with pytest.raises(GradlensError, match="space 'weight' trains the base weights without one"):
        from gradlens.sparse.space import space_parameters
        from gradlens.training.setup import setup_run

        space_parameters(setup_run(RecordConfig(out=str(tmp_path / "x"))).model, "weight")


def test_budget_counts_entries_of_the_space() -> None:
    shapes = weight_shapes()
    total = sum(d * n for d, n in shapes.values())
    assert total == 73_728  # W of toy:tiny's 14 projections, 9x its B entries at r=8 (8,192)
    assert Budget.parse("1%").counts(shapes) == int(np.floor(0.01 * total + 0.5))
    assert sum(Budget.parse("k=500", "per_module").counts(shapes).values()) == 500


class StopAfter(TrainerCallback):
    """Interrupts training (as Ctrl-C does) at the end of optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_weight_space_resume_equals_uninterrupted(tmp_path: Path) -> None:
    def config(out: Path, resume: bool = False) -> RecordConfig:
        return RecordConfig(space="weight", out=str(out), max_steps=6, seed=1, n_train=64, steps_per_shard=1,
                            resume=resume, trl={**QUIET_TRL, "save_strategy": "steps", "save_steps": 2,
                                                "per_device_train_batch_size": 4})

    reference = open_run(record(config(tmp_path / "ref"), progress=False).path)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_training(config(out), out=out, tool="test", record_dir=out, callbacks=[StopAfter(3)], progress=False)
    assert open_run(out).steps == [1, 2, 3] and (out / "trainer" / "checkpoint-2").is_dir()
    record(config(out, resume=True), progress=False)  # restarts from checkpoint-2, step 3 is not recorded twice
    run = open_run(out)
    assert run.steps == reference.steps == list(range(1, 7)) and run.meta["complete"]
    acc, acc_ref = run.accumulators(), reference.accumulators()
    for module in run.modules:
        np.testing.assert_allclose(run.gradients(module), reference.gradients(module), rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(acc[module].sumsq, acc_ref[module].sumsq, rtol=1e-5, atol=1e-12)
    with safe_open(out / DELTA_FILE, "pt") as f, safe_open(tmp_path / "ref" / DELTA_FILE, "pt") as g:
        for name in run.modules:  # the delta is against the base model, not the checkpoint the resume loaded
            torch.testing.assert_close(f.get_tensor(name), g.get_tensor(name), rtol=1e-5, atol=1e-7)
