"""Issue 26: run states that tell the truth (complete, stopped and why, being written), outputs that never mix runs,
and recording that describes the adapter it recorded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from transformers import TrainerCallback

from gradlens import open_run
from gradlens.errors import GradlensError
from gradlens.store import RunWriter
from tests.helpers.cli import assert_one_line_error, gradlens, gradlens_inproc
from tests.helpers.store import SPECS, committed_steps, make_grads, meta, write_run

SIGINT_STEPS = 40
SIGINT_ARGS = ["record", "--regime", "sft", "--max_steps", str(SIGINT_STEPS), "--steps_per_shard", "2", "--seed",
               "1", "--logging_steps", "100", "--disable_tqdm", "true", "--n_train", "256"]


def test_writer_states_being_written_complete_stopped_killed_and_old(tmp_path: Path, capsys) -> None:
    """A run open for writing says so with its pid; close() says complete, close(stopped=...) says stopped with the
    planned steps; a run whose writer died without closing it is stopped; a manifest from before run states opens."""
    path = tmp_path / "run"
    writer = RunWriter(path, SPECS, steps_per_shard=2, planned_steps=10)
    for s in range(1, 5):
        writer.add_step(s, make_grads(s), meta(s))
    info = gradlens_inproc(capsys, "info", str(path))
    assert f"being written by pid {os.getpid()}; describing the 4 steps committed so far" in info.stdout
    writer.close(stopped="interrupted")
    manifest = json.loads((path / "manifest.json").read_text())
    assert (manifest["status"], manifest["planned_steps"], manifest["stop_reason"]) == ("stopped", 10, "interrupted")
    assert manifest["complete"] is False
    info = gradlens_inproc(capsys, "info", str(path))
    assert "stopped at 4 of 10 steps (interrupted; GradientRecorder(..., resume=True) continues it)" in info.stdout

    write_run(path, range(1, 11), resume=True, planned_steps=10)
    assert "run, complete: 10 of 10 steps" in gradlens_inproc(capsys, "info", str(path)).stdout

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(status="writing", writer={**manifest["writer"], "pid": int(dead.stdout)})
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert (f"stopped at 10 of 10 steps (its writer, pid {int(dead.stdout)}, ended without closing it (killed?)"
            in gradlens_inproc(capsys, "info", str(path)).stdout)

    for key in ("status", "planned_steps", "stop_reason", "writer"):
        del manifest[key]
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert open_run(path).steps == list(range(1, 11))
    assert "run state unknown" in gradlens_inproc(capsys, "info", str(path)).stdout


def test_library_errors_speak_python(tmp_path: Path) -> None:
    write_run(tmp_path / "run", range(2))
    with pytest.raises(GradlensError, match=r"already holds a run \(RunWriter\(\.\.\., resume=True\) continues") as e:
        RunWriter(tmp_path / "run", SPECS)
    assert "--resume" not in str(e.value)


class StopAt(TrainerCallback):
    """Interrupt training (``KeyboardInterrupt``) or end it early (``should_training_stop``) after step ``step``."""

    def __init__(self, step: int, interrupt: bool) -> None:
        self.step, self.interrupt = step, interrupt

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            if self.interrupt:
                raise KeyboardInterrupt
            control.should_training_stop = True


@pytest.mark.parametrize(("interrupt", "reason"), [(True, "interrupted"), (False, "training ended early, at step 3")])
def test_library_run_stopped_by_an_interrupt_or_early_end_is_stopped_not_complete(
        tmp_path: Path, capsys, interrupt: bool, reason: str) -> None:
    """A user's own Trainer with the recorder: Ctrl-C at step 3 of 8 (the recorder closed as the exception passes,
    as ``finally`` or the exit hook does), or a callback ending training there, leaves a stopped run, not a complete
    one; the message speaks Python."""
    from gradlens.record import GradientRecorder
    from tests.helpers.recorder import sft_trainer

    trainer = sft_trainer(tmp_path, max_steps=8, logging_steps=100)
    trainer.add_callback(StopAt(3, interrupt))
    recorder = GradientRecorder.attach(trainer, tmp_path / "run")
    try:
        trainer.train()
    except KeyboardInterrupt:
        recorder.close()
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert (manifest["status"], manifest["stop_reason"], manifest["planned_steps"]) == ("stopped", reason, 8)
    assert [r["step"] for r in manifest["steps"]] == [1, 2, 3] and manifest["complete"] is False
    info = gradlens_inproc(capsys, "info", str(tmp_path / "run")).stdout
    assert f"stopped at 3 of 8 steps ({reason}; GradientRecorder(..., resume=True) continues it)" in info


@pytest.mark.slow
def test_sigint_leaves_a_stopped_run_and_resume_equals_the_uninterrupted_run(tmp_path: Path, capsys) -> None:
    """Ctrl-C in the middle of ``gradlens record``: while it runs, info says it is being written; after the
    interrupt the command prints the --resume line, info says stopped with the planned steps, analyze and select say
    it on the console and in their provenance; --resume then gives the uninterrupted run bit for bit."""
    reference = gradlens(*SIGINT_ARGS, "--out", str(tmp_path / "ref"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    out = tmp_path / "run"
    argv = [*SIGINT_ARGS, "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "gradlens.cli.main", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while proc.poll() is None and committed_steps(out) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    live = gradlens_inproc(capsys, "info", str(out))
    assert proc.poll() is None, "the run ended before it could be interrupted"
    assert f"being written by pid {proc.pid}; describing the" in live.stdout, live.stdout
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "gradlens: recording 14 LoRA-B modules" in stdout  # the recorder's line at train begin

    run = open_run(out)
    n = run.steps[-1]
    assert run.steps == list(range(1, n + 1)) and 4 <= n < SIGINT_STEPS
    assert (run.meta["status"], run.meta["planned_steps"], run.meta["stop_reason"]) == ("stopped", SIGINT_STEPS,
                                                                                        "interrupted")
    stopped = f"stopped at {n} of {SIGINT_STEPS} steps (interrupted; --resume continues it)"
    resume_line = [ln for ln in stderr.splitlines() if "continue it with:" in ln]
    assert len(resume_line) == 1 and stopped in resume_line[0] and resume_line[0].endswith(" --resume"), stderr
    assert f"--out {out}" in resume_line[0]
    assert f"sft run, {stopped}" in gradlens_inproc(capsys, "info", str(out)).stdout

    analysis = gradlens_inproc(capsys, "analyze", str(out), "--out", str(tmp_path / "a"), "--no-figures",
                               "--no-progress")
    assert analysis.returncode == 0 and f"warning: run: {stopped}" in analysis.stderr, analysis.stderr
    prov = json.loads((tmp_path / "a" / "provenance.json").read_text())
    assert prov["runs"][0]["run_state"]["status"] == "stopped" and any(stopped in x for x in prov["notes"])
    select = gradlens_inproc(capsys, "select", str(out), "--out", str(tmp_path / "s"))
    assert select.returncode == 0 and stopped in select.stderr
    assert json.loads((tmp_path / "s" / "select.json").read_text())["run_state"]["planned_steps"] == SIGINT_STEPS

    resumed = gradlens(*argv, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run, ref = open_run(out), open_run(tmp_path / "ref")
    assert run.steps == ref.steps == list(range(1, SIGINT_STEPS + 1)) and run.meta["status"] == "complete"
    assert f"complete: {SIGINT_STEPS} of {SIGINT_STEPS} steps" in gradlens_inproc(capsys, "info", str(out)).stdout
    acc, acc_ref = run.accumulators(), ref.accumulators()
    for module in run.modules:
        np.testing.assert_array_equal(run.gradients(module), ref.gradients(module))
        np.testing.assert_array_equal(acc[module].sum, acc_ref[module].sum)


def test_used_out_is_refused_unless_overwrite_and_select_reads_a_probe_dir(tmp_path: Path, capsys) -> None:
    """select, analyze, report and diagnose refuse an --out that holds something (one line, exit 2); --overwrite
    replaces it, and select's replaces the old masks instead of leaving them beside the new ones. select accepts a
    probe directory, as diagnose does."""
    one, two = tmp_path / "one", tmp_path / "two"
    write_run(one, range(6), steps_per_shard=2)
    write_run(two, range(3), steps_per_shard=2)
    sel = tmp_path / "sel"
    assert gradlens_inproc(capsys, "select", str(one), "--out", str(sel), "--methods", "fisher").returncode == 0
    assert_one_line_error(gradlens_inproc(capsys, "select", str(two), "--out", str(sel), "--methods", "sign"),
                          f"{sel} already holds files", "--overwrite")
    assert [p.name for p in (sel / "masks").iterdir()] == ["fisher-1pct.safetensors"]
    assert gradlens_inproc(capsys, "select", str(two), "--out", str(sel), "--methods", "sign",
                           "--overwrite").returncode == 0
    assert [p.name for p in (sel / "masks").iterdir()] == ["sign-1pct.safetensors"]
    assert json.loads((sel / "select.json").read_text())["run"] == str(two)

    for argv in (["analyze", str(one), "--no-figures", "--no-progress"], ["report", str(one)], ["diagnose", str(one)]):
        used = tmp_path / ("used.html" if argv[0] == "report" else "used")
        if argv[0] == "report":
            used.write_text("an earlier report")
        else:
            used.mkdir(exist_ok=True)
            (used / "something").write_text("x")
        assert_one_line_error(gradlens_inproc(capsys, *argv, "--out", str(used)), str(used), "--overwrite")
        assert gradlens_inproc(capsys, *argv, "--out", str(used), "--overwrite").returncode == 0, argv

    probe = tmp_path / "probe"
    probe.mkdir()
    os.symlink(one, probe / "run")
    (probe / "probe.json").write_text(json.dumps({"config": {"train_steps": 100}, "steps": 6}))
    assert gradlens_inproc(capsys, "select", str(probe), "--out", str(tmp_path / "p")).returncode == 0
    record = json.loads((tmp_path / "p" / "select.json").read_text())
    assert record["run"] == str(probe / "run") and record["probe"]["path"] == str(probe)


# ----------------------------------------------------------------------------------------------------------------
# The smaller problems of issue 26, each of which failed before


def test_full_lora_that_gained_nothing_recovers_no_share_of_a_gain() -> None:
    """full = base = 0: the summary and the finding say n/a, not "100% of the gain"."""
    from gradlens.compare.tables import findings, format_pct, summarize

    rows = [{"regime": "sft", "method": m, "budget": b, "seed": s, "lr": 0.1, "steps": 4, "k": None,
             "accuracy": 0.0, "sampled_accuracy": 0.0, "diverged": False}
            for m, b, seeds in (("base", "", [0]), ("full", "", [0, 1]), ("random", "1%", [0, 1])) for s in seeds]
    summary = summarize(pd.DataFrame(rows)).set_index("method")
    assert np.isnan(summary.loc["full"].gain_recovered) and format_pct(summary.loc["full"].gain_recovered) == "n/a"
    assert "100%" not in findings(summary.reset_index(), pd.DataFrame())


def test_erank_figure_of_an_all_zero_run_with_raw_shards_says_why(tmp_path: Path, monkeypatch) -> None:
    import gradlens.analysis.figures
    from gradlens.analysis.analyze import analyze_runs
    from gradlens.config import AnalyzeConfig

    with RunWriter(tmp_path / "zero", SPECS, steps_per_shard=2) as writer:
        for s in range(4):
            writer.add_step(s, [np.zeros(spec.shape, np.float32) for spec in SPECS], meta(s))
    said: list[str] = []
    monkeypatch.setattr(gradlens.analysis.figures, "_no_data", lambda ax, text: said.append(text))
    analyze_runs([tmp_path / "zero"], tmp_path / "a", AnalyzeConfig(progress=False))
    erank = [text for text in said if "trajectory erank" in text]
    assert erank == ["zero: trajectory erank is undefined: 0 of 4 steps have a non-zero, finite gradient"], said


def test_adapter_dir_as_model_and_empty_data_files_are_one_line_errors(tmp_path: Path, capsys) -> None:
    adapter = tmp_path / "my-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "myorg/tiny-base",
                                                             "peft_type": "LORA"}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    assert_one_line_error(gradlens_inproc(capsys, "record", "--model", str(adapter), "--out", str(tmp_path / "r")),
                          f"{adapter} is a PEFT adapter", "base_model_name_or_path='myorg/tiny-base'")
    empty, blank = tmp_path / "empty.jsonl", tmp_path / "blank.jsonl"
    empty.write_text("")
    blank.write_text("\n  \n")
    for task, what in ((f"gsm8k:{empty}", "math task file"), (str(blank), "task file")):
        path = task.removeprefix("gsm8k:")
        assert_one_line_error(gradlens_inproc(capsys, "record", "--task", task, "--out", str(tmp_path / "r")),
                              f"{what} {path} is empty")


def test_record_leaves_no_empty_trainer_dir(tmp_path: Path, capsys) -> None:
    from gradlens.fsio import remove_if_empty

    out = tmp_path / "run"
    assert gradlens_inproc(capsys, "record", "--out", str(out), "--max_steps", "2", "--logging_steps", "100",
                           "--disable_tqdm", "true", "--n_train", "32").returncode == 0
    assert (out / "manifest.json").is_file() and not (out / "trainer").exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "file").write_text("x")
    assert remove_if_empty(tmp_path / "kept") is False and remove_if_empty(tmp_path / "nothing") is False


@pytest.mark.slow
def test_saved_tiny_base_report_is_what_toy_base_measures() -> None:
    """The report saved next to the shipped `tiny` model (which tests/test_docs.py checks the docs' accuracy table
    against) is what ``gradlens toy base`` measures with this install: greedy, sampled and pass@8, exactly."""
    from gradlens.toy.model import shipped_model_path
    from gradlens.toy_base_report import evaluate_base_model, saved_base_report

    saved = saved_base_report(shipped_model_path("tiny", 0))
    acc = evaluate_base_model("tiny", 0, rebuild=False, progress=False).accuracy  # the defaults: what the docs show
    assert (acc.n, acc.k, acc.greedy, acc.sampled, acc.pass_at_k) == (saved["n"], saved["k"], saved["greedy"],
                                                                     saved["sampled"], saved["pass_at_k"])
