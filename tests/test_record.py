"""``gradlens record`` end to end on the toy world: the CLI, its settings, its errors, and kill -9 + ``--resume``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gradlens import open_run
from gradlens.errors import GradlensError
from tests.helpers.cli import QUIET, assert_one_line_error, gradlens, gradlens_inproc
from tests.helpers.store import committed_steps


def test_record_sft_cli_writes_run_with_provenance(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text("max_steps: 4\nper_device_train_batch_size: 8\nmodules: [v_proj, down_proj]\n")
    proc = gradlens("record", "--regime", "sft", "--out", str(out), "--config", str(cfg), "--seed", "3", *QUIET)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"gradlens record: {out}: 4 steps,"), summary
    run = open_run(out)
    assert run.steps == [1, 2, 3, 4]
    assert sorted({s.proj for s in run.specs}) == ["down", "v"] and len(run.modules) == 4
    meta = run.meta
    assert meta["seed"] == 3
    assert meta["config"]["record"]["max_steps"] == 4
    assert meta["config"]["record"]["modules"] == ["v_proj", "down_proj"]
    assert meta["config"]["training_args"]["per_device_train_batch_size"] == 8  # YAML extra reached TRL
    assert meta["config"]["training_args"]["seed"] == 3
    assert {"torch", "transformers", "trl", "peft"} <= set(meta["versions"])
    for rec in meta["steps"]:
        assert rec["loss"] > 0 and rec["learning_rate"] > 0 and rec["grad_norm"] > 0 and 0 < rec["clip_coef"] <= 1
    assert (out / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--modules", "nonexistent_proj"], ["nonexistent_proj", "matches none"]),
        (["--model", "/no/such/model/dir"], ["/no/such/model/dir", "does not exist"]),
        (["--model", "toy:nope"], ["nope", "unknown toy preset"]),
        (["--lora_target_modules", "qkv_fused"], ["qkv_fused"]),
        (["--no_such_trl_field", "1"], ["no_such_trl_field"]),
        (["--max_steps", "0"], ["max_steps"]),
        (["--task", "/no/such/task.jsonl"], ["/no/such/task.jsonl"]),
    ],
)
def test_record_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str],
                                      needles: list[str]) -> None:
    proc = gradlens_inproc(capsys, "record", "--regime", "sft", "--out", str(tmp_path / "run"), "--max_steps", "2",
                           *QUIET, *args)
    assert_one_line_error(proc, *needles)


def test_record_refuses_existing_run_without_resume(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert gradlens_inproc(capsys, "record", "--out", str(out), "--max_steps", "1", *QUIET).returncode == 0
    assert_one_line_error(gradlens_inproc(capsys, "record", "--out", str(out), "--max_steps", "1", *QUIET),
                          str(out), "already holds a run")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a run")
    assert_one_line_error(gradlens_inproc(capsys, "record", "--out", str(tmp_path / "other"), *QUIET),
                          "not a gradlens run")


def test_record_task_file(tmp_path: Path) -> None:
    """A user's own prompt/answer file (here written by the test) trains through the same path."""
    from gradlens.config import RecordConfig
    from gradlens.training import record

    rows = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(10, 40)]
    task = tmp_path / "task.jsonl"
    task.write_text("\n".join(json.dumps(r) for r in rows))
    result = record(RecordConfig(regime="grpo", out=str(tmp_path / "run"), task=str(task), max_steps=2,
                                 trl={"per_device_train_batch_size": 8, "num_generations": 4,
                                      "max_completion_length": 4, "logging_steps": 100, "disable_tqdm": True}))
    assert result.steps == 2
    steps = open_run(result.path).meta["steps"]
    assert [s["generation_batch"] for s in steps] == [0, 1]
    assert all(0.0 <= s["reward_mean"] <= 1.0 for s in steps)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "1+1=", "answer": "2"}))
    with pytest.raises(GradlensError, match="lacks column"):
        record(RecordConfig(regime="sft", out=str(tmp_path / "bad"), task=str(bad), max_steps=1))


KILL_STEPS = 40
KILL_ARGS = ["record", "--regime", "sft", "--max_steps", str(KILL_STEPS), "--steps_per_shard", "2", "--seed", "1",
             "--logging_steps", "100", "--disable_tqdm", "true", "--n_train", "256"]


def kill_when(argv: list[str], out: Path, target: int | None, delay: float, log: Path) -> None:
    """Run ``gradlens *argv`` and SIGKILL it ``delay`` s after ``out`` exists (``target`` None) or lists ``target``
    committed steps."""
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "gradlens.cli.main", *argv], stdout=subprocess.DEVNULL,
                                stderr=err)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if out.exists() and (target is None or committed_steps(out) >= target):
                break
            time.sleep(0.01)
        time.sleep(delay)
        assert proc.poll() is None, f"gradlens exited ({proc.returncode}) before the kill: {log.read_text()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_kill_at_random_points_and_resume_equals_uninterrupted(tmp_path: Path) -> None:
    """kill -9 at 10 seeded random points: the first before any commit, then a few steps past the last commit (in
    the middle of a shard or of a commit), or during start-up and replay once the run nears its end. After each kill
    every committed step reads back whole and equal to an uninterrupted run, and the next --resume (itself killed, 9
    times) continues it; the last one finishes the run with the uninterrupted run's gradients and accumulators."""
    from gradlens.config import RecordConfig
    from gradlens.training import record

    reference = open_run(record(RecordConfig(regime="sft", out=str(tmp_path / "ref"), max_steps=KILL_STEPS,
                                             steps_per_shard=2, seed=1, n_train=256,
                                             trl={"logging_steps": 100, "disable_tqdm": True}), progress=False).path)
    ref = {m: reference.gradients(m) for m in reference.modules}
    out = tmp_path / "killed"
    argv = [*KILL_ARGS, "--out", str(out)]
    rng = np.random.default_rng(9)
    committed = 0
    for kill in range(10):
        target = None if kill == 0 else committed + int(rng.integers(1, 3))
        delay = float(rng.uniform(0, 0.05 if kill == 0 else 0.1))
        if target is not None and target > KILL_STEPS - 12:  # keep the run from finishing before its kill
            target, delay = None, float(rng.uniform(0.5, 3.0))
        kill_when(argv + (["--resume"] if kill else []), out, target, delay, tmp_path / f"kill{kill}.log")
        if not (out / "manifest.json").exists():
            assert committed == 0  # killed before its first commit: there was nothing to lose
            continue
        run = open_run(out)
        n = len(run.steps)
        assert run.steps == list(range(1, n + 1)) and committed <= n < KILL_STEPS, (kill, run.steps)
        assert run.meta["complete"] is False
        acc = run.accumulators()
        for module in run.modules:  # every committed step reads whole, and equals the uninterrupted run's
            np.testing.assert_allclose(run.gradients(module), ref[module][:n], rtol=1e-5, atol=1e-8)
            assert acc[module].count == n
            np.testing.assert_allclose(acc[module].sum, ref[module][:n].sum(0, dtype=np.float64), rtol=1e-4,
                                       atol=1e-7)
        committed = n

    resumed = gradlens(*argv, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = open_run(out)
    assert run.steps == reference.steps == list(range(1, KILL_STEPS + 1)) and run.meta["complete"] is True
    acc, acc_ref = run.accumulators(), reference.accumulators()
    for module in run.modules:
        np.testing.assert_allclose(run.gradients(module), ref[module], rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(acc[module].sum, acc_ref[module].sum, rtol=1e-5, atol=1e-8)
        assert acc[module].count == acc_ref[module].count == KILL_STEPS


def test_info_and_damaged_runs_name_the_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    args = ("record", "--out", str(out), "--max_steps", "3", "--steps_per_shard", "1", *QUIET)
    assert gradlens_inproc(capsys, *args).returncode == 0
    info = gradlens_inproc(capsys, "info", str(out))
    assert info.returncode == 0 and "sft run, complete" in info.stdout and "3 (steps 1..3)" in info.stdout

    shard = out / "shards" / "shard-000001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated
    assert_one_line_error(gradlens_inproc(capsys, "info", str(out)), "shard-000001.safetensors")
    assert_one_line_error(gradlens_inproc(capsys, *args, "--resume"), "shard-000001.safetensors")
    shard.unlink()  # missing
    assert_one_line_error(gradlens_inproc(capsys, "info", str(out)), "shard-000001.safetensors")
    assert_one_line_error(gradlens_inproc(capsys, "info", str(tmp_path / "nothing")), "nothing")
