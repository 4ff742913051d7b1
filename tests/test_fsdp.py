"""``gradlens record`` and ``train --mask`` under FSDP2 on two CPU processes (gloo), against DDP and against itself.

The runs go through ``accelerate launch`` with the shipped configs (``recipes/accelerate/{ddp,fsdp2}.yaml``) and
``tests/scripts/fsdp_on_cpu.py``, which lets accelerate's FSDP path run on CPUs: ``fully_shard`` puts every LoRA-B
weight and gradient into ``DTensor`` blocks of rows, one per process, as on GPUs. One FSDP2 run is shared by the DDP
comparison and the kill/resume test.
"""

from __future__ import annotations

import ast
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from gradlens import open_run
from tests.helpers.agreement import (
    EPS32,
    assert_accumulators_agree,
    assert_gradients_agree,
    assert_resumed_equals,
    assert_step_records_agree,
    clipped_record,
)
from tests.helpers.launch import REPO, accelerate_gradlens, accelerate_gradlens_cmd, kill_after_committed, torchrun

pytestmark = pytest.mark.slow

STEPS = 40
RECORD = clipped_record(STEPS)
# DDP all-reduces and FSDP2 reduce-scatters the same per-process gradients: a sum of two float32 terms (and a halving)
# is exact either way, so the first step agrees bit for bit. After it the two engines' updates round differently in
# the last bit, and the difference grows through the steps (up to ~100 float32 ulps of a module's largest entry by
# step 12, measured); 1024 ulps leaves room for that, while a block gathered to the wrong rows or missing is an error
# of order 1.
ULPS = 1024


def launched(config: str, *args: str) -> subprocess.CompletedProcess:
    proc = accelerate_gradlens(config, *args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """The same ``gradlens record`` under DDP and under FSDP2."""
    tmp = tmp_path_factory.mktemp("fsdp")
    return {config: (tmp / config, launched(config, *RECORD, "--out", str(tmp / config)))
            for config in ("ddp", "fsdp2")}


def logged_scalars(stdout: str) -> list[dict[str, float]]:
    """The ``gradlens/`` scalars of every training log the main process printed (the Trainer prints 4 digits)."""
    logs = [ast.literal_eval(line) for line in stdout.splitlines() if line.startswith("{") and "gradlens/" in line]
    return [{k: float(v) for k, v in log.items() if k.startswith("gradlens/")} for log in logs]


def test_fsdp2_records_what_ddp_records(runs) -> None:
    (ddp, ddp_proc), (fsdp, fsdp_proc) = runs["ddp"], runs["fsdp2"]
    a, b = open_run(ddp), open_run(fsdp)
    recorder = {name: run.meta["config"]["recorder"] for name, run in (("ddp", a), ("fsdp2", b))}
    assert (recorder["ddp"]["processes"], recorder["ddp"]["sharding"]) == (2, None)
    assert (recorder["fsdp2"]["processes"], recorder["fsdp2"]["sharding"]) == (2, "FSDP2")
    assert a.steps == b.steps == list(range(1, STEPS + 1)) and a.meta["complete"] and b.meta["complete"]
    assert a.modules == b.modules and len(a.modules) == 14

    assert_gradients_agree(a, b, 0, ULPS, "FSDP2")  # the first step bit for bit
    assert_step_records_agree(a, b, ULPS, ("loss", "grad_norm", "grad_norm_clipped", "clip_coef", "b_grad_norm"))
    for ra, rb in zip(a.step_records, b.step_records, strict=True):
        assert ra["clip_coef"] < 1.0 and ra["learning_rate"] == rb["learning_rate"]
        assert (rb["zero_gradient"], rb["epoch"]) == (ra["zero_gradient"], ra["epoch"])
    assert_accumulators_agree(a, b, ULPS)

    # Live scalars: one log line a step from the main process only. The B norm is the step's own under both engines;
    # the step-to-step cosine comes from the writer's thread as of the last step it has written (so it may lag the
    # logged step by a step or two, differently in each run): each logged value is that of a recorded step up to the
    # logged one, computed here from the recorded gradients of all modules.
    for run, proc in ((a, ddp_proc), (b, fsdp_proc)):
        live = logged_scalars(proc.stdout)
        assert len(live) == STEPS
        flat = [np.concatenate([run.gradients(n, [s])[0].ravel() for n in run.modules]).astype(np.float64)
                for s in run.steps]
        cosines = [float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))
                   for x, y in zip(flat[1:], flat[:-1], strict=True)]
        for step, logged in enumerate(live, start=1):
            assert logged["gradlens/b_grad_norm"] == pytest.approx(run.step_records[step - 1]["b_grad_norm"],
                                                                   rel=1e-3)
            if "gradlens/cos_prev" in logged:
                assert any(logged["gradlens/cos_prev"] == pytest.approx(c, rel=1e-3, abs=1e-4)
                           for c in cosines[:step - 1]), f"step {step}: {logged} vs {cosines[:step - 1]}"
        assert sum("gradlens/cos_prev" in logged for logged in live) >= STEPS // 2
    live_a, live_b = logged_scalars(ddp_proc.stdout), logged_scalars(fsdp_proc.stdout)
    for la, lb in zip(live_a, live_b, strict=True):
        assert lb["gradlens/b_grad_norm"] == pytest.approx(la["gradlens/b_grad_norm"], rel=1e-3)


def test_fsdp2_grpo_records_what_ddp_records(tmp_path: Path) -> None:
    """GRPO: the same generations (the sharded model generates what the whole one does), so the same gradients,
    rewards, generation batches and no-signal flags; a step whose groups all have equal rewards included."""
    args = ["record", "--regime", "grpo", "--max_steps", "3", "--num_generations", "4",
            "--per_device_train_batch_size", "4", "--beta", "0.0", "--disable_tqdm", "true", "--logging_steps", "100"]
    for config in ("ddp", "fsdp2"):
        launched(config, *args, "--out", str(tmp_path / config))
    a, b = open_run(tmp_path / "ddp"), open_run(tmp_path / "fsdp2")
    assert b.meta["config"]["recorder"]["sharding"] == "FSDP2" and a.steps == b.steps == [1, 2, 3]
    fields = ("generation_batch", "reward_mean", "reward_std", "frac_reward_zero_std", "zero_reward_std",
              "zero_gradient")
    assert [[r[k] for k in fields] for r in b.step_records] == [[r[k] for k in fields] for r in a.step_records]
    assert [r["generation_batch"] for r in b.step_records] == [0, 1, 2]
    assert_step_records_agree(a, b, ULPS, ("loss", "grad_norm", "clip_coef", "b_grad_norm"))
    for name in a.modules:
        ga, gb = a.gradients(name), b.gradients(name)
        np.testing.assert_array_equal(gb[0], ga[0], err_msg=name)  # the first step: bit for bit
        assert np.abs(gb - ga).max() <= ULPS * EPS32 * np.abs(ga).max(), name


def test_fsdp2_kill_and_resume_equals_the_uninterrupted_fsdp2_run(runs, tmp_path: Path) -> None:
    """Every process of the launch killed (SIGKILL) after a few committed steps; ``--resume`` then
    records the remaining steps, and the run equals the uninterrupted FSDP2 run bit for bit."""
    reference = open_run(runs["fsdp2"][0])
    out = tmp_path / "run"
    kill_after_committed(accelerate_gradlens_cmd("fsdp2", *RECORD, "--out", str(out)), out, 3)
    killed = open_run(out)
    n = killed.steps[-1]
    assert killed.steps == list(range(1, n + 1)) and 3 <= n < STEPS and not killed.meta["complete"]

    launched("fsdp2", *RECORD, "--out", str(out), "--resume")
    run = open_run(out)
    assert run.meta["config"]["recorder"]["sharding"] == "FSDP2"
    assert_resumed_equals(run, reference)

def test_fsdp2_sparse_b_train_keeps_b_zero_outside_the_mask(tmp_path: Path) -> None:
    """``train --mask --record`` under FSDP2: the exported adapter is the full one (PEFT loads it), exactly 0 outside
    the mask and moved inside it, and every recorded gradient is exactly 0 outside the mask."""
    import torch
    from peft import PeftModel

    from gradlens.lora import lora_b_parameters
    from gradlens.models import load_model
    from gradlens.sparse.masks import load_mask, save_mask

    rng = np.random.default_rng(0)
    shapes = {f"model.layers.{i}.{kind}": (rows, 8) for i in range(2)
              for kind, rows in (("self_attn.q_proj", 64), ("self_attn.k_proj", 32), ("self_attn.v_proj", 32),
                                 ("self_attn.o_proj", 64), ("mlp.gate_proj", 128), ("mlp.up_proj", 128),
                                 ("mlp.down_proj", 64))}
    mask_path = save_mask(tmp_path / "mask.safetensors", {n: rng.random(s) < 0.1 for n, s in shapes.items()},
                          {"selector": "random", "budget": "10%", "scope": "global", "seed": 0, "source_run": None,
                           "scoring_seconds": 0.0, "model": "toy:tiny", "lora_r": 8, "lora_alpha": 16,
                           "lora_seed": 0})
    mask, _ = load_mask(mask_path)
    out = tmp_path / "out"
    launched("fsdp2", "train", "--out", str(out), "--mask", str(mask_path), "--record", "--max_steps", "3",
             "--learning_rate", "0.01", "--n_eval", "8", "--disable_tqdm", "true", "--logging_steps", "100",
             "--n_train", "64")

    info = json.loads((out / "train.json").read_text())
    k = sum(int(m.sum()) for m in mask.values())
    assert info["sparse"] and info["mask"]["k"] == k and info["b_nonzero"] == k and info["steps"] == 3
    assert (out / "eval.json").is_file()
    base, _ = load_model("toy:tiny")
    model = PeftModel.from_pretrained(base, str(out / "adapter"))
    trained = {name: p.detach() for name, p in lora_b_parameters(model)}
    assert trained.keys() == mask.keys()
    for name, keep in mask.items():
        b = trained[name]
        assert tuple(b.shape) == keep.shape, name
        assert not b[~torch.from_numpy(keep)].any(), f"{name}: non-zero outside the mask"
        assert bool(b[torch.from_numpy(keep)].ne(0).all()), f"{name}: an entry inside the mask did not move"

    run = open_run(out / "run")
    assert run.steps == [1, 2, 3] and run.meta["config"]["recorder"]["sharding"] == "FSDP2"
    for name, keep in mask.items():
        grads = run.gradients(name)
        assert not grads[:, ~keep].any(), f"{name}: recorded gradient non-zero outside the mask"
        assert grads[:, keep].any(), name


def test_fsdp2_gather_rebuilds_uneven_and_empty_blocks_as_full_tensor_does(tmp_path: Path) -> None:
    """Three processes, shapes whose rows do not split evenly (5 rows: 2+2+1, 1 row: 1+0+0): the one-collective
    gather gives exactly ``DTensor.full_tensor()``, the summed squares are the global ones, and the gathered state
    dict holds the full weights."""
    import torch

    proc = torchrun(REPO / "tests" / "scripts" / "gather_fsdp2.py", str(tmp_path), nproc=3)
    assert proc.returncode == 0, proc.stderr[-4000:]
    blocks = json.loads((tmp_path / "blocks.json").read_text())
    assert [rank[0] for rank in blocks] == [[[2, 3], [0, 0]], [[2, 3], [2, 0]], [[1, 3], [4, 0]]]
    assert [rank[1][0][0] for rank in blocks] == [1, 0, 0]
    data = torch.load(tmp_path / "gather.pt", weights_only=True)
    for got, full in zip(data["gathered"], data["full"], strict=True):
        assert got.shape == full.shape and full.abs().max() > 0
        assert torch.equal(got, full)
    squares = sum(float(f.double().square().sum()) for f in data["full"])
    assert float(data["squares"][0]) == pytest.approx(squares, rel=8 * EPS32)  # float32 buffer
    assert list(data["state"]) == [f"lora_B.{i}" for i in range(4)]
    for got, full in zip(data["state"].values(), data["weights"], strict=True):
        assert torch.equal(got, full)
