"""``gradlens record`` under DeepSpeed ZeRO-1, ZeRO-2 and ZeRO-3 on two CPU processes (gloo), against DDP; DeepSpeed
without ZeRO refused in one line.

The runs go through ``accelerate launch`` with the shipped configs (``recipes/accelerate/{ddp,zero2,zero3}.yaml``,
ZeRO-1 and ZeRO-0 written from ``zero2.yaml``): accelerate takes its DeepSpeed plugin on CPU processes as it is,
DeepSpeed picks its CPU accelerator and partitions the optimizer state, gradients (ZeRO-2/3) and parameters (ZeRO-3)
over the two processes as on GPUs. A ZeRO-2 run killed and resumed equals the uninterrupted one. Skipped where
``deepspeed`` is not installed.
"""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Callable
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
from tests.helpers.launch import ACCELERATE_CONFIGS, accelerate_gradlens, accelerate_gradlens_cmd, kill_after_committed

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

STEPS = 12
RECORD = clipped_record(STEPS)  # every step clips: DeepSpeed's gradient_clipping is the Trainer's max_grad_norm
# DDP sums the two processes' gradients and halves the sum; ZeRO reduces them into its partitions in its own order,
# and its global norm (so its clip factor) rounds differently in the last bit: the first step's gradients differ by a
# few float32 ulps of a module's largest entry (1.4 measured under ZeRO-1/2, 4.8 under ZeRO-3). After it the two
# engines' weights differ in the last bits, and the difference grows through the steps (up to ~300 ulps by step 12,
# measured); 1024 ulps leaves room for that, while a gradient read from one process only, or unclipped, is off by
# order 1.
FIRST_ULPS = 16
ULPS = 1024
STAGES = ("zero1", "zero2", "zero3")


def zero_config(tmp: Path, stage: int) -> Path:
    """An accelerate config for ZeRO-``stage``, written from the shipped ``zero2.yaml``."""
    path = tmp / f"zero{stage}.yaml"
    path.write_text((ACCELERATE_CONFIGS / "zero2.yaml").read_text().replace("zero_stage: 2", f"zero_stage: {stage}"))
    return path


def launched(config: str, *args: str, tmp: Path) -> subprocess.CompletedProcess:
    """``gradlens ARGS`` under ``config``: a shipped config, or ``zero1`` (written into ``tmp``)."""
    config_file = zero_config(tmp, 1) if config == "zero1" else None
    proc = accelerate_gradlens(config, *args, config_file=config_file)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The same ``gradlens record`` under DDP or a ZeRO stage, launched the first time a test asks for it (a launch
    takes minutes on loaded CPUs, so a test run alone launches only what it uses)."""
    tmp = tmp_path_factory.mktemp("zero")

    @functools.cache
    def run(config: str) -> Path:
        launched(config, *RECORD, "--out", str(tmp / config), tmp=tmp)
        return tmp / config

    return run


@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_zero_records_what_ddp_records(runs, stage: str) -> None:
    a, b = open_run(runs("ddp")), open_run(runs(stage))
    assert (a.meta["config"]["recorder"]["processes"], a.meta["config"]["recorder"]["sharding"]) == (2, None)
    assert (b.meta["config"]["recorder"]["processes"], b.meta["config"]["recorder"]["sharding"]) == \
        (2, f"DeepSpeed ZeRO-{stage[-1]}")
    assert a.steps == b.steps == list(range(1, STEPS + 1)) and a.meta["complete"] and b.meta["complete"]
    assert a.modules == b.modules and len(a.modules) == 14

    assert_gradients_agree(a, b, FIRST_ULPS, ULPS, stage)
    assert_step_records_agree(a, b, ULPS, ("loss", "grad_norm", "grad_norm_clipped", "clip_coef", "b_grad_norm"))
    for ra, rb in zip(a.step_records, b.step_records, strict=True):
        assert ra["clip_coef"] < 1.0 and ra["learning_rate"] == rb["learning_rate"]
        assert (rb["zero_gradient"], rb["epoch"]) == (ra["zero_gradient"], ra["epoch"])
        # The recorded gradient is the clipped one: its norm is the pre-clip B norm times the coefficient.
        norm = np.sqrt(sum(float(np.square(b.gradients(n, [rb["step"]])[0].astype(np.float64)).sum())
                           for n in b.modules))
        assert norm == pytest.approx(rb["b_grad_norm"] * rb["clip_coef"], rel=8 * EPS32)
    assert_accumulators_agree(a, b, ULPS)



def test_deepspeed_zero2_kill_and_resume_equals_the_uninterrupted_zero2_run(runs, tmp_path: Path) -> None:
    """Every process of a ZeRO-2 launch killed (SIGKILL) after 2 committed steps; ``--resume`` then records the
    remaining steps, and the run equals the uninterrupted ZeRO-2 run bit for bit. (The run has 12 steps of ~0.1 s
    after minutes of start-up, so the kill comes early to land before the end.)"""
    reference = open_run(runs("zero2"))
    out = tmp_path / "run"
    kill_after_committed(accelerate_gradlens_cmd("zero2", *RECORD, "--out", str(out)), out, 2)
    killed = open_run(out)
    n = killed.steps[-1]
    assert killed.steps == list(range(1, n + 1)) and 2 <= n < STEPS and not killed.meta["complete"]

    launched("zero2", *RECORD, "--out", str(out), "--resume", tmp=tmp_path)
    run = open_run(out)
    assert run.meta["config"]["recorder"]["sharding"] == "DeepSpeed ZeRO-2"
    assert_resumed_equals(run, reference)


def test_deepspeed_zero3_grpo_with_accumulation_records_what_ddp_records(tmp_path: Path) -> None:
    """GRPO under ZeRO-3 (TRL's pairing for PEFT), two micro-batches an optimizer step (DeepSpeed steps at the
    boundary only) and every second step recorded: the same generation batches, rewards, losses and gradients as
    DDP."""
    args = ["record", "--regime", "grpo", "--max_steps", "4", "--num_generations", "4",
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--every_n_steps", "2",
            "--beta", "0.0", "--disable_tqdm", "true", "--logging_steps", "100"]
    for config in ("ddp", "zero3"):
        launched(config, *args, "--out", str(tmp_path / config), tmp=tmp_path)
    a, b = open_run(tmp_path / "ddp"), open_run(tmp_path / "zero3")
    assert b.meta["config"]["recorder"]["sharding"] == "DeepSpeed ZeRO-3" and a.steps == b.steps == [2, 4]
    fields = ("generation_batch", "reward_mean", "reward_std", "frac_reward_zero_std", "zero_reward_std",
              "zero_gradient", "learning_rate")
    assert [[r[k] for k in fields] for r in b.step_records] == [[r[k] for k in fields] for r in a.step_records]
    assert_step_records_agree(a, b, ULPS, ("loss", "grad_norm", "clip_coef", "b_grad_norm"))
    assert_gradients_agree(a, b, ULPS, ULPS, "zero3")  # the first recorded step is the second: after an update


def test_deepspeed_without_zero_is_refused_in_one_line(tmp_path: Path) -> None:
    """DeepSpeed without ZeRO (stage 0) keeps each process's gradient local until its step: refused before anything
    is written, exit code 2, one line."""
    proc = accelerate_gradlens("zero0", "record", "--max_steps", "2", "--out", str(tmp_path / "run"),
                               config_file=zero_config(tmp_path, 0))
    assert proc.returncode != 0
    said = [line for line in proc.stderr.splitlines() if line.startswith("gradlens record: error:")]
    assert said and all(line == said[0] for line in said), proc.stderr[-3000:]
    assert said[0].startswith("gradlens record: error: DeepSpeed without ZeRO (zero_stage: 0) is not recorded")
    assert "FSDP2" in said[0]
    # Each process exits 2 with that line, no traceback of its own (the launcher reports the failed child).
    assert "exitcode  : 2 " in proc.stderr and "GradlensError" not in proc.stderr
    assert not (tmp_path / "run" / "manifest.json").exists()
