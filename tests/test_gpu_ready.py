"""The CPU side of the GPU path (issue 28): the clip statistics read from the Trainer's own clipping (fp16 GradScaler
included), float64 gradients, the collective device of multi-backend process groups, the flat ring buffer's norm."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from transformers import TrainerControl, TrainerState, TrainingArguments

from gradlens import open_run
from gradlens.lora import lora_b_parameters
from gradlens.record.collective import collective_device, uses_nccl
from gradlens.record.recorder import GradientRecorder, sums_of_squares
from gradlens.store.background import NORM_CHUNK, Slot
from tests.helpers.recorder import (
    SnapshotLoraB,
    global_norm,
    recorded,
    restore_lora_b,
    sft_reference,
    sft_step_batches,
    sft_trainer,
)

SCALE = 2.0**12  # the GradScaler's loss scale: a statistic read before unscaling is off by this factor


def test_fp16_grad_scaler_gradients_are_unscaled_before_the_clip_statistics(tmp_path: Path) -> None:
    """fp16 AMP: the Trainer backpropagates the loss times the GradScaler's scale; its clipping unscales first. The
    recorded norms, clip coefficient and gradients must be those of the unscaled gradients, as the optimizer sees
    them (a CPU GradScaler on the Trainer's accelerator, which accelerate does not set up on CPU itself)."""
    max_norm = 0.5
    trainer = sft_trainer(tmp_path, max_steps=2, fp16=True, max_grad_norm=max_norm, use_cpu=True)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=1000)
    trainer.accelerator.native_amp = True
    snapshots = SnapshotLoraB()
    trainer.add_callback(snapshots)
    first, param = next(iter(lora_b_parameters(trainer.model)))
    scaled: list[float] = []  # the first B's gradient norm as backward leaves it: still times the scale
    param.register_post_accumulate_grad_hook(lambda p: scaled.append(float(p.grad.norm())))
    GradientRecorder.attach(trainer, tmp_path / "run")
    trainer.train()
    assert trainer.accelerator.scaler.get_scale() == SCALE  # no inf/nan step: every step was applied
    assert "clip_grad_norm_" not in vars(trainer.accelerator)  # the recorder gave the accelerator its method back
    run = open_run(tmp_path / "run")
    model = trainer.model
    model.train()
    for step in run.steps:
        grads, meta = recorded(run, step)
        restore_lora_b(model, snapshots.snapshots[step - 1])
        _, ref = sft_reference(model, run.modules, sft_step_batches(trainer, step))  # float32, unscaled
        norm = global_norm(ref)
        assert norm > max_norm  # clipped: the coefficient matters
        # fp16 autocast against a float32 reference: ~1e-3 apart; a scaled statistic is 4096x off
        assert meta["grad_norm"] == pytest.approx(norm, rel=2e-2)
        assert meta["b_grad_norm"] == pytest.approx(meta["grad_norm"], rel=1e-6)  # every trainable entry is a B
        assert meta["clip_coef"] == pytest.approx(max_norm / (meta["grad_norm"] + 1e-6), rel=1e-6)
        assert meta["grad_norm_clipped"] == pytest.approx(max_norm, rel=1e-5)
        assert global_norm(grads) == pytest.approx(max_norm, rel=1e-5)  # the stored gradients are the clipped ones
        # the scaler really scaled what backward produced: the Trainer's clipping had to unscale it
        unscaled = float(np.linalg.norm(grads[first])) / meta["clip_coef"]
        assert scaled[step - 1] / unscaled == pytest.approx(SCALE, rel=1e-3)


class Events:
    """The events a Trainer sends a recorder, for a loop without a Trainer (and so without a clipping to read)."""

    def __init__(self, model: torch.nn.Module, recorder: GradientRecorder, tmp: Path, max_grad_norm: float) -> None:
        self.model, self.recorder = model, recorder
        self.args = TrainingArguments(output_dir=str(tmp / "trainer"), report_to="none", max_grad_norm=max_grad_norm)
        self.state, self.control = TrainerState(), TrainerControl()
        recorder.on_train_begin(self.args, self.state, self.control, model=model)

    def step(self, loss: torch.Tensor) -> None:
        self.model.zero_grad(set_to_none=True)
        loss.backward()
        self.recorder.on_pre_optimizer_step(self.args, self.state, self.control, model=self.model)
        self.state.global_step += 1

    def end(self) -> None:
        self.recorder.on_train_end(self.args, self.state, self.control)


def float64_lora_model() -> torch.nn.Module:
    from tests.helpers.recorder import lora_model

    model = lora_model()[0].double()
    with torch.no_grad():
        for _, p in lora_b_parameters(model):
            p.normal_(0, 0.02)
    return model


def test_float64_gradients_are_recorded_with_their_norms(tmp_path: Path) -> None:
    """A float64 model: the stored float32 gradients are the float64 ones rounded, the norms are float64 norms (the
    unrecorded modules' too, through the no-clipping path), and nothing raises."""
    model = float64_lora_model()
    rec = GradientRecorder(tmp_path / "run", modules=["v_proj"])
    events = Events(model, rec, tmp_path, max_grad_norm=0.0)
    ids = torch.arange(12).reshape(2, 6)
    expected = []
    for _ in range(2):
        events.step(model(input_ids=ids).logits.pow(2).mean())
        b = {n: p.grad.detach().clone() for n, p in lora_b_parameters(model)}
        expected.append(b)
    events.end()
    run = open_run(tmp_path / "run")
    assert run.steps == [1, 2] and all(p.grad.dtype == torch.float64 for _, p in lora_b_parameters(model))
    for step, b in zip(run.steps, expected, strict=True):
        grads, meta = recorded(run, step)
        for name in run.modules:
            np.testing.assert_array_equal(grads[name], b[name].float().double().numpy())
        every = math.sqrt(sum(float((g * g).sum()) for g in b.values()))
        mine = math.sqrt(sum(float((b[n] * b[n]).sum()) for n in run.modules))
        assert meta["grad_norm"] == pytest.approx(every, rel=1e-6) and meta["clip_coef"] == 1.0
        assert meta["b_grad_norm"] == pytest.approx(mine, rel=1e-6) and mine < every


def test_sums_of_squares_of_float64_tensors() -> None:
    gen = torch.Generator().manual_seed(0)
    groups = [[torch.randn(300, 7, dtype=torch.float64, generator=gen) * 1e3], [torch.randn(5, dtype=torch.float64)]]
    got = sums_of_squares(groups, torch.device("cpu")).tolist()
    want = [sum(float((t.numpy() ** 2).sum()) for t in g) for g in groups]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_without_a_seen_clipping_the_clip_statistics_are_unknown_and_said(tmp_path: Path) -> None:
    """max_grad_norm set but no Trainer clipping to read: the coefficient and the pre-clip norms are None (not a
    guess), the post-clip norm is recorded, and it is said once."""
    model = float64_lora_model()
    rec = GradientRecorder(tmp_path / "run")
    events = Events(model, rec, tmp_path, max_grad_norm=1.0)
    ids = torch.arange(12).reshape(2, 6)
    with pytest.warns(UserWarning, match="clipping .* was not seen") as caught:
        for _ in range(2):
            events.step(model(input_ids=ids).logits.pow(2).mean())
        events.end()
    assert sum("was not seen" in str(w.message) for w in caught) == 1
    for r in open_run(tmp_path / "run").step_records:
        assert r["clip_coef"] is None and r["grad_norm"] is None and r["b_grad_norm"] is None
        assert r["grad_norm_clipped"] > 0


def test_multi_backend_strings_with_nccl_use_the_gpu() -> None:
    for backend in ("nccl", "cuda:nccl,cpu:gloo", "cpu:gloo,cuda:nccl"):
        assert uses_nccl(backend), backend
    for backend in ("gloo", "cpu:gloo", "cpu:gloo,cuda:gloo", "mpi"):
        assert not uses_nccl(backend), backend


def test_a_cpu_gloo_group_collects_on_the_cpu(tmp_path: Path) -> None:
    dist.init_process_group("cpu:gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert dist.get_backend() == "cpu:gloo"
        assert collective_device() == torch.device("cpu")
        t = torch.ones(3, dtype=torch.float64, device=collective_device())
        dist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0, 1.0]
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sizes", [[5], [NORM_CHUNK], [NORM_CHUNK + 1, 3, 2 * NORM_CHUNK - 7]])
def test_slot_norm_equals_the_float64_norm_of_its_copy(sizes: list[int]) -> None:
    """The ring buffer pads to whole norm rows: the padding stays zero however often the slot is refilled."""
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(n, generator=gen) * 10 ** (i - 1) for i, n in enumerate(sizes)]
    slot = Slot(grads)
    for scale in (1.0, 3.0):
        slot.fill([g * scale for g in grads])
        want = sum(float((g.double() * scale) ** 2 @ torch.ones(len(g), dtype=torch.float64)) for g in grads)
        assert slot.squared_norm().item() == pytest.approx(want, rel=math.sqrt(NORM_CHUNK) * 2**-23)
        assert not slot.padded[slot.flat.numel():].any()


def test_drift_checksum_peak_memory_stays_a_chunk_not_a_float64_weight(tmp_path: Path) -> None:
    """The drift guard's fingerprint of a 256 MiB bf16 weight: its float64 copy would add 1 GiB (twice, squared);
    the peak resident memory may grow by a few pieces of :data:`CHECKSUM_CHUNK` entries only."""
    script = """
import resource, sys, torch
from gradlens.drift import CHECKSUM_CHUNK, checksum
w = torch.ones(2**27, dtype=torch.bfloat16)  # 256 MiB
w[::3] = -2.0
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
got = checksum([w])
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
n3 = (2**27 + 2) // 3
exact = got["sum"] == (2**27 - n3) - 2.0 * n3 and got["sum_sq"] == (2**27 - n3) + 4.0 * n3
print(grown, w.nbytes, CHECKSUM_CHUNK * 8, exact)
"""
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True,
                         timeout=300)
    grown, nbytes, piece, exact = out.stdout.split()
    assert exact == "True"  # small integers: the float64 sums are exact
    assert int(grown) <= 3 * int(piece) < int(nbytes) // 2, (grown, nbytes, piece)
