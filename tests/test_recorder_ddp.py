"""``GradientRecorder`` under two processes (``torchrun``, gloo on CPU): one writer, no deadlock, the global gradient.

With ``average_tokens_across_devices`` (the Trainer's default) each rank's loss is its summed token CE divided by the
token count of *all* ranks, times the number of processes, and DDP averages the gradients: the step's gradient is the
token-mean CE over the union of the ranks' micro-batches. The test recomputes it with autograd from the ``lora_B``
weights the launched script snapshotted before each step and the micro-batches each rank trained on.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gradlens import open_run
from gradlens.record.collective import ELSEWHERE
from gradlens.record.recorder import GradientRecorder
from gradlens.store import ModuleSpec, RunWriter
from tests.helpers.launch import REPO, torchrun
from tests.helpers.recorder import (
    RTOL,
    assert_grad_close,
    global_norm,
    lora_model,
    recorded,
    restore_lora_b,
    sft_reference,
    sft_trainer,
    torch_clip_coef,
)

pytestmark = pytest.mark.slow

SCRIPT = REPO / "tests" / "scripts" / "record_sft_ddp.py"


def launch(out: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """Run the script on ``nproc`` local processes; on timeout kill the whole process group and fail."""
    return torchrun(SCRIPT, str(out), *args, nproc=nproc)


def load_rank(out: Path, rank: int) -> tuple[dict, dict]:
    facts = json.loads((out / f"rank{rank}.json").read_text())
    return facts, torch.load(out / f"rank{rank}.pt", weights_only=True)


def rows(batch: dict[str, torch.Tensor]) -> list[tuple[int, ...]]:
    """The unpadded token sequences of a collated batch."""
    return [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(batch["input_ids"], batch["attention_mask"],
                                                                    strict=True)]


@pytest.mark.parametrize(("batch", "ga", "steps"), [(2, 1, 3), (1, 2, 2)], ids=["batch2", "batch1-ga2"])
def test_two_processes_record_the_global_gradient_once(tmp_path: Path, batch: int, ga: int, steps: int) -> None:
    max_norm = 4.0
    proc = launch(tmp_path, "--steps", str(steps), "--batch", str(batch), "--ga", str(ga),
                  "--max_grad_norm", str(max_norm))
    assert proc.returncode == 0, proc.stderr[-4000:]

    # One run directory, written by rank 0 only.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.json", "rank0.pt", "rank1.json", "rank1.pt",
                                                          "run", "trainer"]
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("manifest.json")] == [Path("run/manifest.json")]
    (facts0, data0), (facts1, data1) = load_rank(tmp_path, 0), load_rank(tmp_path, 1)
    assert facts0["world_size"] == facts1["world_size"] == 2
    assert facts0["global_step"] == facts1["global_step"] == steps
    assert facts0["steps_recorded"] == steps and facts1["steps_recorded"] == 0
    assert (tmp_path / "run" / ".lock").read_text().strip() == str(facts0["pid"])
    run = open_run(tmp_path / "run")
    assert run.steps == list(range(1, steps + 1)) and run.meta["complete"] and len(run.modules) == 14
    assert run.meta["config"]["training_args"]["per_device_train_batch_size"] == batch

    # What each rank trained on: ga micro-batches per step, different rows on the two ranks; replicas in sync.
    for data in (data0, data1):
        assert len(data["batches"]) == steps * ga and len(data["snapshots"]) == steps
    for b0, b1 in zip(data0["batches"], data1["batches"], strict=True):
        assert not set(rows(b0)) & set(rows(b1))
    for s0, s1 in zip(data0["snapshots"], data1["snapshots"], strict=True):
        assert all(torch.equal(s0[n], s1[n]) for n in s0)

    model, _ = lora_model()
    model.train()
    clipped = []
    for step in run.steps:
        restore_lora_b(model, data0["snapshots"][step - 1])
        loss, ref = sft_reference(model, run.modules, micro_batches_of_step(data0, data1, step, ga))
        grads, meta = recorded(run, step)
        norm = global_norm(ref)
        for name in run.modules:
            assert_grad_close(grads[name] / meta["clip_coef"], ref[name], f"step {step} {name} (raw)")
            assert_grad_close(grads[name], ref[name] * torch_clip_coef(norm, max_norm), f"step {step} {name} (clip)")
        assert meta["grad_norm"] == pytest.approx(norm, rel=1e-5)
        assert meta["b_grad_norm"] == pytest.approx(norm, rel=1e-5)
        assert meta["loss"] == pytest.approx(loss, rel=1e-5)
        if norm > max_norm:
            assert meta["clip_coef"] == pytest.approx(max_norm / (norm + 1e-6), rel=1e-5)
            clipped.append(step)
        else:
            assert meta["clip_coef"] == 1.0
        logged = next(h for h in facts0["log_history"] if h.get("step") == step and "loss" in h)
        assert logged["grad_norm"] == pytest.approx(meta["grad_norm"], rel=1e-5)
        assert logged["loss"] == pytest.approx(meta["loss"], rel=1e-5)
    assert clipped, "max_grad_norm should clip at least one step"

    # The same rows in one process with the global batch: the same first step.
    trainer = sft_trainer(tmp_path / "single", max_steps=1, per_device_train_batch_size=4, max_grad_norm=max_norm)
    single_rows = [tuple(trainer.train_dataset[i]["input_ids"]) for i in range(4)]
    assert sorted(single_rows) == sorted(r for b in micro_batches_of_step(data0, data1, 1, ga) for r in rows(b))
    GradientRecorder.attach(trainer, tmp_path / "single" / "run")
    trainer.train()
    single_grads, single_meta = recorded(open_run(tmp_path / "single" / "run"), 1)
    first_grads, first_meta = recorded(run, 1)
    for name in run.modules:
        assert_grad_close(first_grads[name], single_grads[name], f"single vs two processes {name}", rtol=RTOL)
    assert first_meta["clip_coef"] == pytest.approx(single_meta["clip_coef"], rel=1e-5)


def micro_batches_of_step(data0: dict, data1: dict, step: int, ga: int) -> list[dict[str, torch.Tensor]]:
    return [d["batches"][(step - 1) * ga + k] for d in (data0, data1) for k in range(ga)]


def test_two_processes_fail_together_when_the_main_process_cannot_write(tmp_path: Path) -> None:
    """The output directory holds another run: rank 0 raises, and rank 1 must raise too instead of waiting."""
    with RunWriter(tmp_path / "run", [ModuleSpec.from_name("model.layers.0.self_attn.v_proj", (4, 2))]):
        pass
    manifest = (tmp_path / "run" / "manifest.json").read_bytes()
    proc = launch(tmp_path, "--steps", "2")
    assert proc.returncode != 0
    assert "already holds a run" in proc.stderr
    assert "the gradient recorder failed on the main process" in proc.stderr
    assert (tmp_path / "run" / "manifest.json").read_bytes() == manifest
    assert not list(tmp_path.glob("rank*.pt"))
    np.testing.assert_equal(open_run(tmp_path / "run").steps, [])


def test_two_processes_fail_together_when_the_main_process_gets_an_os_error_at_start(tmp_path: Path) -> None:
    """A file where the run directory should be: an OSError on rank 0 alone; every rank stops with a one-line error."""
    (tmp_path / "run").write_text("a file, not a run directory\n")
    start = time.perf_counter()
    proc = launch(tmp_path, "--steps", "2")
    assert proc.returncode != 0
    assert f"GradlensError: gradient recorder: {tmp_path / 'run'}: File exists" in proc.stderr
    assert f"GradlensError: {ELSEWHERE}" in proc.stderr
    assert not list(tmp_path.glob("rank*.pt"))
    assert time.perf_counter() - start < 120, "the ranks did not stop together"


def test_two_processes_stop_together_when_the_main_process_writer_fails_mid_run(tmp_path: Path) -> None:
    """Rank 0's writer fails after step 1 (its shard folder becomes a file): both ranks exit with an error within
    seconds, at the next agreement, instead of rank 1 waiting in the next all-reduce for the backend's timeout."""
    start = time.perf_counter()
    proc = launch(tmp_path, "--steps", "5", "--break_run_at", "1")
    took = time.perf_counter() - start
    assert proc.returncode != 0
    assert "background gradient writer failed" in proc.stderr and "shards" in proc.stderr
    assert f"GradlensError: {ELSEWHERE}" in proc.stderr  # rank 1 stopped because rank 0 failed
    assert not list(tmp_path.glob("rank*.pt"))  # no rank finished training
    run = open_run(tmp_path / "run")
    assert len(run.steps) <= 1  # what was committed before the failure stays readable
    assert took < 120, f"took {took:.0f} s: the ranks did not stop together"
