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
from gradlens.cli.main import main
from gradlens.errors import GradlensError

QUIET = ["--logging_steps", "100", "--disable_tqdm", "true", "--n_train", "64"]


def gradlens(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real command in a fresh process (slow to start: use for what needs a process of its own)."""
    return subprocess.run([sys.executable, "-m", "gradlens.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout)


def gradlens_inproc(capsys: pytest.CaptureFixture, *args: str) -> subprocess.CompletedProcess:
    """The same entry point in this process: exit code, stdout and stderr as a CompletedProcess."""
    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out, err)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("gradlens ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


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
    from gradlens.record import record

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


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(tmp_path: Path) -> None:
    """SIGKILL mid-run leaves a readable run up to its last full shard; --resume completes it exactly."""
    args = ["record", "--regime", "sft", "--max_steps", "24", "--steps_per_shard", "4", "--seed", "1",
            "--logging_steps", "100", "--disable_tqdm", "true", "--n_train", "256"]
    ref = tmp_path / "ref"
    assert gradlens(*args, "--out", str(ref)).returncode == 0

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "gradlens.cli.main", *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        manifest = out / "manifest.json"
        if manifest.is_file() and len(json.loads(manifest.read_text())["steps"]) >= 8:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)

    partial = open_run(out)
    n = len(partial.steps)
    assert 8 <= n < 24 and n % 4 == 0 and partial.steps == list(range(1, n + 1))
    assert partial.meta["complete"] is False
    partial.gradients(partial.modules[0])  # every listed shard reads

    resumed = gradlens(*args, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run, reference = open_run(out), open_run(ref)
    assert run.steps == reference.steps == list(range(1, 25))
    assert run.meta["complete"] is True
    for module in run.modules:
        np.testing.assert_allclose(run.gradients(module), reference.gradients(module), rtol=1e-5, atol=1e-8)
    acc, acc_ref = run.accumulators(), reference.accumulators()
    for module in run.modules:
        np.testing.assert_allclose(acc[module].sum, acc_ref[module].sum, rtol=1e-5, atol=1e-8)
        assert acc[module].count == acc_ref[module].count == 24


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
