"""Faults and bad input: damaged run directories, a full disk, NaN steps, two writers, hostile files, determinism.

Each test is one promise of docs/guarantees.md. Runs are written by ``RunWriter`` with the synthetic
gradients of ``tests/helpers/store.py`` where the fault is in the files, and recorded by real TRL training (nothing
mocked) where it is in the recording; a full disk is a real size-limited tmpfs where the machine lets a test mount one,
and an ENOSPC raised at gradlens's own file-write boundary everywhere.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

import gradlens.store.writer as store_writer
from gradlens import GradientRecorder, open_run
from gradlens.analysis.analyze import analyze_runs
from gradlens.budget import Budget
from gradlens.config import AnalyzeConfig, RecordConfig
from gradlens.placement.selectors import INFORMED, SELECTORS, scores, select
from gradlens.sparse.masks import load_mask, shapes_of
from gradlens.store import ModuleSpec, RunWriter
from gradlens.training import record
from tests.helpers.cli import QUIET, assert_one_line_error, gradlens_inproc, raises_one_line
from tests.helpers.recorder import sft_trainer
from tests.helpers.store import SPECS, Touch, make_grads, meta, write_run

REPO = Path(__file__).resolve().parents[1]
STEPS = list(range(6))  # three shards of two steps
INTACT = [0, 1, 4, 5]  # the steps left when the middle shard is bad
TRL_QUIET = {"logging_steps": 100, "disable_tqdm": True}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    write_run(path, STEPS, steps_per_shard=2)
    return path


def assert_intact_steps_read(path: Path, steps: list[int] = INTACT) -> None:
    """``skip_bad`` drops only the bad shard: every other step reads back exactly as written."""
    run = open_run(path, skip_bad=True)
    assert run.steps == steps and len(run.skipped) == 1
    for i, name in enumerate(run.modules):
        np.testing.assert_array_equal(run.gradients(name), np.stack([make_grads(s)[i] for s in steps]))


# --------------------------------------------------------------------------------------------------------------------
# Corrupt input


def test_shard_truncated_at_every_byte_is_a_one_line_error_and_other_shards_read(run_dir: Path) -> None:
    shard = run_dir / "shards" / "shard-000001.safetensors"
    data = shard.read_bytes()
    for cut in range(len(data)):
        shard.write_bytes(data[:cut])
        message = raises_one_line("shard-000001.safetensors: ", open_run, run_dir)
        assert any(word in message for word in ("truncated", "corrupt", "not a safetensors")), (cut, message)
        if cut % 16 == 0:
            assert_intact_steps_read(run_dir)


@pytest.mark.parametrize("bit", [0x01, 0x20, 0x80])
def test_every_flipped_shard_header_byte_is_a_one_line_error(run_dir: Path, bit: int) -> None:
    shard = run_dir / "shards" / "shard-000001.safetensors"
    data = shard.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    for i in range(header_end):
        flipped = bytearray(data)
        flipped[i] ^= bit
        shard.write_bytes(bytes(flipped))
        raises_one_line("shard-000001.safetensors: ", open_run, run_dir)
    assert_intact_steps_read(run_dir)


def damage(run_dir: Path, kind: str) -> tuple[str, str]:
    """Damage ``run_dir`` one way; returns (the file the error must name, what it must say is wrong)."""
    shard = run_dir / "shards" / "shard-000001.safetensors"
    manifest = run_dir / "manifest.json"
    if kind == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:-7])
        return shard.name, "truncated or corrupt shard file"
    if kind == "flipped header byte":
        data = bytearray(shard.read_bytes())
        data[20] ^= 0x01
        shard.write_bytes(bytes(data))
        return shard.name, "safetensors"
    if kind == "missing shard":
        shard.unlink()
        return shard.name, "shard file missing"
    if kind == "missing manifest":
        manifest.unlink()
        return manifest.name, "manifest missing"
    manifest.write_text(manifest.read_text()[:-40])
    return manifest.name, "manifest is not valid JSON"


SHARD_DAMAGE = ["truncated shard", "flipped header byte", "missing shard"]
MANIFEST_DAMAGE = ["missing manifest", "manifest not JSON"]


@pytest.mark.parametrize("kind", SHARD_DAMAGE + MANIFEST_DAMAGE)
def test_damaged_run_is_a_one_line_error_naming_the_file(run_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture, kind: str) -> None:
    file, what = damage(run_dir, kind)
    for argv in (["info", str(run_dir)], ["analyze", str(run_dir), "--out", str(tmp_path / "a"), "--no-progress"],
                 ["select", str(run_dir), "--out", str(tmp_path / "s")]):
        assert_one_line_error(gradlens_inproc(capsys, *argv), file, what)
    if kind in SHARD_DAMAGE:
        assert_intact_steps_read(run_dir)


@pytest.mark.parametrize("kind", SHARD_DAMAGE)
def test_analyze_skip_bad_analyses_the_intact_shards_and_reports_the_bad_one(run_dir: Path, tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture,
                                                                             kind: str) -> None:
    file, _ = damage(run_dir, kind)
    out = tmp_path / "analysis"
    proc = gradlens_inproc(capsys, "analyze", str(run_dir), "--out", str(out), "--skip_bad", "--no-progress",
                           "--no-figures", "--lags", "2")
    assert proc.returncode == 0, proc.stderr
    assert f"Skipped (run): {run_dir / 'shards' / file}: " in proc.stdout
    summary = json.loads((out / "provenance.json").read_text())
    assert [s["file"] for s in summary["runs"][0]["skipped_shards"]] == [f"shards/{file}"]
    result = analyze_runs([run_dir], None, AnalyzeConfig(skip_bad=True, progress=False, lags=2))
    assert result.runs[0].steps == INTACT and result.summary["skipped_shards"].tolist() == [1]
    intact = tmp_path / "intact"
    write_run(intact, INTACT, steps_per_shard=2)  # the same steps, undamaged: the same statistics
    clean = analyze_runs([intact], None, AnalyzeConfig(progress=False, lags=2))
    for column in ("cos_lag1_mean", "erank_traj", "erank_step_mean", "sign_stability_mean"):
        assert result.summary[column][0] == pytest.approx(clean.summary[column][0], rel=1e-12), column


@pytest.mark.parametrize("kind", MANIFEST_DAMAGE)
def test_analyze_skip_bad_leaves_out_a_run_that_cannot_be_opened(run_dir: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture, kind: str) -> None:
    good = tmp_path / "good"
    write_run(good, STEPS, steps_per_shard=2)
    file, what = damage(run_dir, kind)
    out = tmp_path / "analysis"
    proc = gradlens_inproc(capsys, "analyze", str(good), str(run_dir), "--out", str(out), "--skip_bad",
                           "--no-progress", "--no-figures")
    assert proc.returncode == 0, proc.stderr
    assert f"Skipped run: {run_dir / file}: {what}" in proc.stdout
    assert (out / "summary.csv").read_text().count("\n") == 2  # header + the good run
    assert json.loads((out / "provenance.json").read_text())["skipped_runs"][0]["path"] == str(run_dir)
    assert_one_line_error(gradlens_inproc(capsys, "analyze", str(run_dir), "--out", str(tmp_path / "again"),
                                          "--skip_bad"), "no run could be analysed", file)


# --------------------------------------------------------------------------------------------------------------------
# A full disk


def _enospc_on_shard(monkeypatch: pytest.MonkeyPatch, fail_at: int) -> None:
    """The ``fail_at``-th shard write (from 0) leaves half its bytes on disk and raises ENOSPC, as a full disk does."""
    real = store_writer.safetensors.torch.save_file
    calls = {"n": 0}

    def save_file(tensors, filename, metadata=None):
        calls["n"] += 1
        real(tensors, filename, metadata=metadata)
        if calls["n"] == fail_at + 1:
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    monkeypatch.setattr(store_writer.safetensors.torch, "save_file", save_file)


def test_full_disk_stops_recording_with_a_clear_message_and_keeps_the_committed_steps(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC injected at gradlens's file-write boundary (for machines where no small filesystem can be mounted)."""
    out = tmp_path / "run"
    argv = ["record", "--out", str(out), "--max_steps", "10", "--steps_per_shard", "2", *QUIET]
    _enospc_on_shard(monkeypatch, fail_at=2)
    proc = gradlens_inproc(capsys, *argv)
    monkeypatch.undo()
    assert_one_line_error(proc, "shard-000002.safetensors: cannot write it: disk full",
                          "keeps its 4 committed step(s) (through step 4)", "--resume")
    run = open_run(out)
    assert run.steps == [1, 2, 3, 4] and run.meta["complete"] is False
    kept = {m: run.gradients(m) for m in run.modules}
    assert not list(out.rglob("*.tmp"))  # the half-written temp file was removed
    assert gradlens_inproc(capsys, *argv, "--resume").returncode == 0
    resumed = open_run(out)
    assert resumed.steps == list(range(1, 11)) and resumed.meta["complete"] is True
    for m, grads in kept.items():
        np.testing.assert_array_equal(resumed.gradients(m, [1, 2, 3, 4]), grads)


def _mount_tmpfs_script(disk: Path, size: str, then: str) -> list[str]:
    """``then`` run in a private mount namespace where ``disk`` is a fresh tmpfs of ``size`` (exit 90: no mount)."""
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
            f"mount -t tmpfs -o size={size} tmpfs '{disk}' || exit 90; {then}"]


@pytest.mark.slow
def test_full_real_filesystem_stops_recording_and_the_run_stays_valid(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """A real 1.2 MB tmpfs fills up during recording (the accumulators alone take 2 x 0.37 MB)."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) to mount a small filesystem")
    disk, copy = tmp_path / "disk", tmp_path / "copy"
    disk.mkdir()
    argv = ["record", "--max_steps", "40", "--steps_per_shard", "2", *QUIET]
    record_cmd = " ".join([sys.executable, "-m", "gradlens.cli.main", *argv, "--out", f"'{disk}/run'"])
    script = f"{record_cmd} 2> '{tmp_path}/err'; echo $? > '{tmp_path}/rc'; cp -a '{disk}/run' '{copy}'"
    proc = subprocess.run(_mount_tmpfs_script(disk, "1200k", script), capture_output=True, text=True, timeout=300)
    if proc.returncode == 90 or "unshare" in proc.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()[:200]}")
    err = (tmp_path / "err").read_text()
    assert_one_line_error(subprocess.CompletedProcess(argv, int((tmp_path / "rc").read_text()), "", err),
                          "cannot write it: disk full", "--resume")
    run = open_run(copy)
    n = len(run.steps)
    assert 2 <= n < 40 and run.steps == list(range(1, n + 1)) and run.meta["complete"] is False
    kept = {m: run.gradients(m) for m in run.modules}
    assert not list(copy.rglob("*.tmp"))
    assert gradlens_inproc(capsys, *argv, "--out", str(copy), "--resume").returncode == 0  # room again: it goes on
    resumed = open_run(copy)
    assert resumed.steps == list(range(1, 41)) and resumed.meta["complete"] is True
    for m, grads in kept.items():
        np.testing.assert_array_equal(resumed.gradients(m, list(range(1, n + 1))), grads)


# --------------------------------------------------------------------------------------------------------------------
# NaN and Inf


class NaNLossOnStep(TrainerCallback):
    """Makes one optimizer step's loss NaN (its input embeddings times NaN); after the recorder has read that step,
    zeroes the non-finite gradients, as trainers that skip a bad step do, so training goes on."""

    def __init__(self, model: torch.nn.Module, step: int) -> None:
        self.step = step
        self.active = False
        model.get_input_embeddings().register_forward_hook(
            lambda module, args, output: output * float("nan") if self.active else None)

    def on_step_begin(self, args, state, control, **kwargs):
        self.active = state.global_step + 1 == self.step

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.active = False
        for p in model.parameters():
            if p.grad is not None:
                p.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def test_nan_loss_step_is_recorded_flagged_reported_and_excluded(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    trainer = sft_trainer(tmp_path, max_steps=7)
    GradientRecorder.attach(trainer, out)
    trainer.add_callback(NaNLossOnStep(trainer.model, step=4))  # after the recorder
    trainer.train()

    run = open_run(out)
    assert run.steps == list(range(1, 8)) and run.meta["nonfinite_steps"] == [4]
    assert [r["step"] for r in run.step_records if r["nonfinite"]] == [4]
    assert not np.isfinite(run.step_vector(4)).any() and np.isfinite(run.step_vector(5)).all()
    info = gradlens_inproc(capsys, "info", str(out))
    assert info.returncode == 0 and "1 non-finite" in info.stdout

    result = analyze_runs([out], None, AnalyzeConfig(progress=False, lags=3))
    assert result.runs[0].excluded == [4] and result.runs[0].steps == [1, 2, 3, 5, 6, 7]
    assert "1 non-finite step(s) excluded: 4" in result.findings
    assert result.summary["nonfinite_steps"].tolist() == [1]
    for name in ("summary", "modules", "proj", "layers", "hist"):
        numbers = getattr(result, name).select_dtypes("number")
        assert np.isfinite(numbers.to_numpy(np.float64)).all(), name  # no NaN anywhere, let alone a whole table

    finite = [s for s in run.steps if s != 4]
    acc = run.accumulators()
    fisher = scores("fisher", acc)
    for name in run.modules:
        assert acc[name].count == 6
        g = run.gradients(name, finite).astype(np.float64)
        np.testing.assert_allclose(fisher[name], (g**2).sum(0), rtol=1e-5, atol=1e-12)
    budget = Budget.parse("5%")
    for method in INFORMED:
        assert all(np.isfinite(s).all() for s in scores(method, acc).values()), method
        mask = select(method, budget, shapes_of(run.specs), accumulators=acc)
        assert sum(int(m.sum()) for m in mask.values()) == budget.counts(shapes_of(run.specs))


# --------------------------------------------------------------------------------------------------------------------
# Two writers


HOLD_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
from tests.helpers.store import SPECS, make_grads, meta
from gradlens.store import RunWriter
w = RunWriter({path!r}, SPECS, steps_per_shard=2)
for s in range(4):
    w.add_step(s, make_grads(s), meta(s))
print("holding", flush=True)
sys.stdin.readline()
for s in range(4, 8):
    w.add_step(s, make_grads(s), meta(s))
w.close()
"""


def test_second_writer_is_refused_by_the_lock_and_the_first_is_unharmed(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT.format(repo=str(REPO), path=str(path))],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "holding", first.stderr.read()
        raises_one_line(f"is locked by another writer (pid {first.pid})", RunWriter, path, SPECS, resume=True)
        proc = gradlens_inproc(capsys, "record", "--out", str(path), "--resume", "--max_steps", "2", *QUIET)
        assert_one_line_error(proc, f"locked by another writer (pid {first.pid})")
        first.stdin.write("go\n")
        first.stdin.close()
        assert first.wait(timeout=60) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
    run = open_run(path)
    assert run.steps == list(range(8)) and run.meta["complete"] is True
    for i, name in enumerate(run.modules):
        np.testing.assert_array_equal(run.gradients(name), np.stack([make_grads(s)[i] for s in range(8)]))


# --------------------------------------------------------------------------------------------------------------------
# Hostile input


@pytest.mark.parametrize("target", ["accumulators", "mask"])
def test_pickle_accumulators_and_mask_are_refused_never_unpickled(run_dir: Path, tmp_path: Path, target: str) -> None:
    import pickle

    marker = tmp_path / "unpickled"
    payload = pickle.dumps({"m0.sum": Touch(marker), "pad": np.zeros(64)})
    if target == "accumulators":
        (run_dir / "accumulators.safetensors").write_bytes(payload)
        (run_dir / "accumulators.prev.safetensors").write_bytes(payload)
        raises_one_line("accumulators", open_run(run_dir).accumulators)
    else:
        (tmp_path / "mask.safetensors").write_bytes(payload)
        raises_one_line("mask.safetensors: ", load_mask, tmp_path / "mask.safetensors")
    assert not marker.exists()


def absurd_safetensors(path: Path, key: str, dtype: str, meta: dict[str, str]) -> None:
    """A well-formed header whose tensor claims 2^42 bytes, followed by 16 bytes of data."""
    header = {"__metadata__": meta, key: {"dtype": dtype, "shape": [2**40, 1], "data_offsets": [0, 2**40 * 4]}}
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(16))


def test_absurd_sizes_in_a_header_are_refused_before_allocating(run_dir: Path, tmp_path: Path) -> None:
    shard = run_dir / "shards" / "shard-000000.safetensors"
    absurd_safetensors(shard, "m0", "F32", {"format": "gradlens-shard", "steps": "[0, 1]"})
    absurd_safetensors(run_dir / "accumulators.safetensors", "m0.sum", "F32", {"generation": "3"})
    absurd_safetensors(tmp_path / "mask.safetensors", "m", "U8", {"gradlens_mask_format": "1", "k": "1"})
    tracemalloc.start()
    try:
        raises_one_line("shard-000000.safetensors: truncated or corrupt", open_run, run_dir)
        raises_one_line("accumulators.safetensors: truncated or corrupt", open_run(run_dir, skip_bad=True)
                        .accumulators)
        raises_one_line("mask.safetensors: ", load_mask, tmp_path / "mask.safetensors")
        assert tracemalloc.get_traced_memory()[1] < 16 * 2**20  # nothing near the claimed 4 TiB was allocated
    finally:
        tracemalloc.stop()
    shard.write_bytes((95 * 2**20).to_bytes(8, "little") + b"{}")  # a header length just under the bound
    raises_one_line("shard-000000.safetensors: truncated shard file (header needs", open_run, run_dir)


HOSTILE_NAMES = ["../../escape.v_proj", "model.layers.0/../../../up.down_proj", "..\\..\\win.o_proj",
                 "model.layers.1.<img src=x onerror=alert(1)>"]


def test_path_like_module_names_never_make_gradlens_write_outside_its_outputs(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run whose manifest names modules like paths (one absolute, into this test's directory): analyze, report and
    select write only their own outputs, and the report escapes the names."""
    names = [*HOSTILE_NAMES, str(tmp_path / "absolute.k_proj")]
    specs = [ModuleSpec.from_name(name, (4, 2)) for name in names]
    path = tmp_path / "runs" / "run"
    rng = np.random.default_rng(0)
    with RunWriter(path, specs, steps_per_shard=2) as w:
        for s in range(5):
            w.add_step(s, [rng.standard_normal(sp.shape).astype(np.float32) for sp in specs], meta(s))
    work = tmp_path / "work" / "cwd"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)  # relative escapes would land inside tmp_path, where the listing below sees them
    before = {p for p in tmp_path.rglob("*")}
    outputs = [tmp_path / "out" / "analysis", tmp_path / "out" / "select", tmp_path / "out" / "report.html"]
    for argv in (["analyze", str(path), "--out", str(outputs[0]), "--no-progress"],
                 ["select", str(path), "--out", str(outputs[1]), "--methods", "sign", "random", "--budgets", "10%"],
                 ["report", str(path), "--out", str(outputs[2])]):
        proc = gradlens_inproc(capsys, *argv)
        assert proc.returncode == 0, proc.stderr
    created = {p for p in tmp_path.rglob("*")} - before
    stray = [p for p in created if not any(p == o or o in p.parents for o in outputs) and p not in
             (tmp_path / "out",)]
    assert not stray, stray
    mask, _ = load_mask(outputs[1] / "masks" / "sign-10pct.safetensors")
    assert sorted(mask) == sorted(names)  # the names are tensor keys in the mask file, never file names
    page = outputs[2].read_text()
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page


# --------------------------------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_same_gradients_statistics_and_masks(tmp_path: Path) -> None:
    """Two CPU recordings with one seed (SFT and GRPO) are bitwise equal, and so are their statistics and masks.
    (The same seed gives the same toy base model: tests/test_toy_world.py::test_recipe_is_deterministic_per_seed.)"""
    runs = {}
    for regime, trl in (("sft", {}), ("grpo", {"per_device_train_batch_size": 8, "num_generations": 4})):
        for copy in ("a", "b"):
            out = tmp_path / regime / copy
            record(RecordConfig(regime=regime, out=str(out), max_steps=4, seed=5, n_train=64,
                                trl={**TRL_QUIET, **trl}), progress=False)
            runs[regime, copy] = open_run(out)
    for regime in ("sft", "grpo"):
        a, b = runs[regime, "a"], runs[regime, "b"]
        assert a.steps == b.steps == [1, 2, 3, 4]
        for name in a.modules:
            np.testing.assert_array_equal(a.gradients(name), b.gradients(name))
        stats = [analyze_runs([r.path], None, AnalyzeConfig(progress=False, lags=2, window=3)) for r in (a, b)]
        for table in ("summary", "modules", "proj", "layers", "hist"):
            x, y = (getattr(s, table).drop(columns=["run", "path"], errors="ignore") for s in stats)
            assert x.equals(y), (regime, table)
        shapes = shapes_of(a.specs)
        for method in SELECTORS:
            kwargs = {"reference": select("sign", Budget.parse("5%"), shapes, accumulators=a.accumulators())}
            ma, mb = (select(method, Budget.parse("5%"), shapes, accumulators=r.accumulators(), seed=3, **kwargs)
                      for r in (a, b))
            assert all(np.array_equal(ma[n], mb[n]) for n in shapes), (regime, method)
