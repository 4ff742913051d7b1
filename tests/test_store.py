"""Tests for the run-directory store: round trips, exact accumulators, crash safety, resume, locking and bad input."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import gradlens.store.writer as store_writer
from gradlens.errors import GradlensError
from gradlens.store import AsyncRunWriter, ModuleSpec, RunWriter, open_run
from tests.helpers.store import (
    NAMES_SHAPES,
    SPECS,
    Touch,
    assert_accumulators,
    assert_same_accumulators,
    make_grads,
    meta,
    write_run,
)

REPO = Path(__file__).resolve().parents[1]


# --- specs --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "proj", "layer"), [
    ("model.layers.12.self_attn.q_proj", "q", 12),
    ("model.layers.3.mlp.gate_proj", "gate", 3),
    ("transformer.h.7.attn.c_attn", "attn.c_attn", 7),
    ("transformer.h.7.attn.c_proj", "attn.c_proj", 7),  # GPT-2: two c_proj roles, two labels
    ("transformer.h.7.mlp.c_proj", "mlp.c_proj", 7),
    ("encoder.blocks.0.mlp.up_proj", "up", 0),
    ("lm_head", "lm_head", None),
])
def test_module_spec_from_name(name, proj, layer):
    spec = ModuleSpec.from_name(name, [16, 4])
    assert (spec.proj, spec.layer, spec.shape) == (proj, layer, (16, 4))


# --- round trips --------------------------------------------------------------------------------------------------


def test_round_trip_float32_several_shards(tmp_path):
    steps = [0, 1, 2, 3, 5, 6, 7, 9, 10, 12]
    write_run(tmp_path / "run", steps, steps_per_shard=4, config={"lr": 1e-4}, seed=3)
    run = open_run(tmp_path / "run")
    assert run.steps == steps and run.modules == [n for n, _ in NAMES_SHAPES] and run.specs == SPECS
    assert [s["steps"] for s in run.meta["shards"]] == [steps[:4], steps[4:8], steps[8:]]
    assert run.meta["complete"] is True and run.meta["config"] == {"lr": 1e-4} and run.meta["seed"] == 3
    assert {"python", "numpy", "torch", "safetensors", "gradlens"} <= set(run.meta["versions"])
    assert run.step_records[4]["step"] == 5 and run.step_records[4]["offset"] == 0
    assert run.step_records[4]["loss"] == pytest.approx(1 / 6) and run.step_records[4]["nonfinite"] is False
    for i, spec in enumerate(SPECS):
        got = run.gradients(spec.name)
        assert got.dtype == np.float32 and got.shape == (len(steps), *spec.shape)
        np.testing.assert_array_equal(got, np.stack([make_grads(s)[i] for s in steps]))
    window = [12, 3, 6, 7]  # across shards and out of order
    np.testing.assert_array_equal(run.gradients(SPECS[1].name, window), np.stack([make_grads(s)[1] for s in window]))
    np.testing.assert_array_equal(run.step_vector(6), np.concatenate([g.ravel() for g in make_grads(6)]))
    seen = []
    for chunk_steps, arrays in run.iter_steps([SPECS[2].name, SPECS[0].name]):
        for j, s in enumerate(chunk_steps):
            np.testing.assert_array_equal(arrays[0][j], make_grads(s)[2])
            np.testing.assert_array_equal(arrays[1][j], make_grads(s)[0])
        seen += chunk_steps
    assert seen == steps


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_round_trip_half_precision_equals_torch_cast(tmp_path, dtype):
    steps = list(range(5))
    write_run(tmp_path / "run", steps, dtype=dtype, steps_per_shard=2)
    run = open_run(tmp_path / "run")
    torch_dtype = getattr(torch, dtype)
    for i, spec in enumerate(SPECS):
        want = np.stack([torch.from_numpy(make_grads(s)[i]).to(torch_dtype).float().numpy() for s in steps])
        np.testing.assert_array_equal(run.gradients(spec.name), want)
    assert_accumulators(run, steps)  # from the float32 input, not the rounded shards


def test_default_steps_per_shard_from_shard_bytes(tmp_path):
    bytes_per_step = sum(a * b for _, (a, b) in NAMES_SHAPES) * 2
    write_run(tmp_path / "run", range(7), dtype="bfloat16", shard_bytes=3 * bytes_per_step + 1)
    run = open_run(tmp_path / "run")
    assert run.meta["steps_per_shard"] == 3
    assert [len(s["steps"]) for s in run.meta["shards"]] == [3, 3, 1]


# --- accumulators -------------------------------------------------------------------------------------------------


def test_accumulators_equal_numpy_over_raw_arrays(tmp_path):
    steps = [0, 1, 2, 4, 5, 8, 9]
    write_run(tmp_path / "run", steps, steps_per_shard=3)
    run = open_run(tmp_path / "run")
    assert_accumulators(run, steps)
    acc = run.accumulators()[SPECS[0].name]
    raw = run.gradients(SPECS[0].name).astype(np.float64)
    np.testing.assert_allclose(acc.sum, raw.sum(0), rtol=1e-12, atol=1e-12)
    assert np.isnan(acc.dot_prev[0]) and acc.nonzero.dtype == np.int64


def test_nonfinite_step_is_written_flagged_and_excluded(tmp_path):
    path = tmp_path / "run"
    with RunWriter(path, SPECS, steps_per_shard=2) as w:
        for s in range(6):
            grads = make_grads(s)
            if s == 2:
                grads[1][0, 0] = np.nan
            if s == 4:
                grads[2][1, 1] = np.inf
            w.add_step(s, grads, meta(s))
    run = open_run(path)
    assert run.steps == list(range(6))
    assert [r["nonfinite"] for r in run.step_records] == [False, False, True, False, True, False]
    assert run.meta["nonfinite_steps"] == [2, 4]
    assert np.isnan(run.gradients(SPECS[1].name, [2])[0, 0, 0])
    assert_accumulators(run, [0, 1, 3, 5])


def test_save_raw_false_keeps_accumulators_only(tmp_path):
    path = tmp_path / "run"
    write_run(path, range(5), save_raw=False, steps_per_shard=2)
    run = open_run(path)
    assert run.steps == list(range(5)) and run.meta["shards"] == [] and not (path / "shards").exists()
    assert all(r["shard"] is None for r in run.step_records)
    assert_accumulators(run, list(range(5)))
    with pytest.raises(GradlensError, match="raw shards were not saved"):
        run.gradients(SPECS[0].name)


# --- crash safety and resume --------------------------------------------------------------------------------------

CRASH_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from helpers.store import SPECS, make_grads, meta
    from gradlens.store import RunWriter
    w = RunWriter({path!r}, SPECS, steps_per_shard=3)
    for s in range({n}):
        w.add_step(s, make_grads(s), meta(s))
    os.kill(os.getpid(), signal.SIGKILL)
""")


def crash_after(path: Path, n_steps: int) -> None:
    """Write ``n_steps`` in a child process that then dies by SIGKILL, without flushing or closing."""
    script = CRASH_SCRIPT.format(tests=str(REPO / "tests"), path=str(path), n=n_steps)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr


def test_killed_writer_leaves_readable_run_and_resume_matches_uninterrupted(tmp_path):
    path = tmp_path / "run"
    crash_after(path, 8)  # shards of steps 0-2 and 3-5 committed; 6, 7 lost with the process
    (path / "shards" / "shard-000002.safetensors").write_bytes(b"stale orphan from a dead writer")
    (path / "shards" / ".shard-000002.safetensors.tmp").write_bytes(b"half-written")
    run = open_run(path)
    assert run.steps == list(range(6)) and run.meta["complete"] is False
    np.testing.assert_array_equal(run.gradients(SPECS[0].name), np.stack([make_grads(s)[0] for s in range(6)]))
    assert_accumulators(run, list(range(6)))

    with RunWriter(path, SPECS, steps_per_shard=3, resume=True) as w:
        assert w.last_step == 5
        for s in range(2, 10):  # the trainer resumed from an older checkpoint and replays steps 2..5
            w.add_step(s, make_grads(s), meta(s))
    write_run(tmp_path / "ref", range(10), steps_per_shard=3)
    resumed, ref = open_run(path), open_run(tmp_path / "ref")
    assert resumed.steps == ref.steps == list(range(10)) and resumed.meta["complete"] is True
    assert [r["loss"] for r in resumed.step_records] == [r["loss"] for r in ref.step_records]
    for name in ref.modules:
        np.testing.assert_array_equal(resumed.gradients(name), ref.gradients(name))
    assert_same_accumulators(resumed.accumulators(), ref.accumulators())


def test_kill_between_accumulators_and_manifest(tmp_path, monkeypatch):
    """The accumulators are already newer than the manifest: readers and resume fall back to the committed ones."""
    path = tmp_path / "run"
    real_dump = store_writer.json_dump
    calls = {"n": 0}

    def dump_then_die(obj, target):
        calls["n"] += 1
        if calls["n"] == 3:  # 1: initial manifest, 2: first shard, 3: second shard
            raise OSError("simulated kill")
        real_dump(obj, target)

    monkeypatch.setattr(store_writer, "json_dump", dump_then_die)
    w = RunWriter(path, SPECS, steps_per_shard=2)
    with pytest.raises(GradlensError, match="manifest.json: cannot write it: simulated kill"):
        for s in range(4):
            w.add_step(s, make_grads(s), meta(s))
    with pytest.raises(GradlensError, match="broken"):
        w.add_step(4, make_grads(4), meta(4))
    w.close()
    monkeypatch.undo()

    run = open_run(path)
    assert run.steps == [0, 1] and run.meta["shards"][-1]["file"] == "shards/shard-000000.safetensors"
    assert_accumulators(run, [0, 1])

    def fail_save(*args, **kwargs):
        raise OSError("disk full")

    w = RunWriter(path, SPECS, steps_per_shard=2, resume=True)  # a second failure, now after the accumulators rotated
    monkeypatch.setattr(store_writer, "COMPACT_RATIO", 0)  # every commit compacts: the accumulators are rewritten
    monkeypatch.setattr(store_writer.safetensors.numpy, "save_file", fail_save)
    with pytest.raises(GradlensError, match="accumulators.safetensors: cannot write it: disk full"):
        for s in (2, 3):
            w.add_step(s, make_grads(s), meta(s))
    w.close()
    monkeypatch.undo()
    assert_accumulators(open_run(path), [0, 1])

    write_run(path, range(6), steps_per_shard=2, resume=True)
    write_run(tmp_path / "ref", range(6), steps_per_shard=2)
    assert open_run(path).steps == list(range(6))
    assert_same_accumulators(open_run(path).accumulators(), open_run(tmp_path / "ref").accumulators())


def test_existing_run_needs_resume_and_matching_layout(tmp_path):
    path = tmp_path / "run"
    write_run(path, range(2))
    with pytest.raises(GradlensError, match=r"already holds a run \(RunWriter\(..., resume=True\) continues it\)"):
        RunWriter(path, SPECS)
    with pytest.raises(GradlensError, match="model.layers.1.self_attn.v_proj"):
        RunWriter(path, [*SPECS[:2], ModuleSpec.from_name(SPECS[2].name, (5, 3))], resume=True)
    with pytest.raises(GradlensError, match="run has 3 modules"):
        RunWriter(path, SPECS[:2], resume=True)
    with pytest.raises(GradlensError, match="stores float32, this writer bfloat16"):
        RunWriter(path, SPECS, dtype="bfloat16", resume=True)
    write_run(path, range(4), resume=True)  # refused attempts released the lock
    assert open_run(path).steps == list(range(4))


def test_lock_refuses_second_writer_and_first_keeps_working(tmp_path):
    path = tmp_path / "run"
    first = RunWriter(path, SPECS, steps_per_shard=2)
    first.add_step(0, make_grads(0), meta(0))
    with pytest.raises(GradlensError, match=rf"locked by another writer \(pid {os.getpid()}\)"):
        RunWriter(path, SPECS, resume=True)
    for s in range(1, 3):
        first.add_step(s, make_grads(s), meta(s))
    first.close()
    assert open_run(path).steps == [0, 1, 2]
    write_run(path, [3], resume=True)
    assert open_run(path).steps == [0, 1, 2, 3]


# --- input validation ---------------------------------------------------------------------------------------------


def test_add_step_validates_input(tmp_path):
    with RunWriter(tmp_path / "run", SPECS) as w:
        with pytest.raises(GradlensError, match="has 2 gradients, expected 3"):
            w.add_step(0, make_grads(0)[:2], {})
        bad = make_grads(0)
        bad[1] = np.zeros((4, 6), np.float32)
        with pytest.raises(GradlensError, match=r"model\.layers\.0\.mlp\.down_proj.*\(4, 6\)"):
            w.add_step(0, bad, {})
        with pytest.raises(GradlensError, match="reserved"):
            w.add_step(0, make_grads(0), {"offset": 3})
        with pytest.raises(GradlensError, match="not JSON-serialisable"):
            w.add_step(0, make_grads(0), {"obj": object()})
        w.add_step(5, make_grads(5), {})
        with pytest.raises(GradlensError, match="step 5 is not after the last recorded step 5"):
            w.add_step(5, make_grads(5), {})
        assert w.last_step == 5


# --- background writer --------------------------------------------------------------------------------------------


def test_async_writer_matches_sync_writer(tmp_path):
    steps = list(range(7))
    with AsyncRunWriter(RunWriter(tmp_path / "async", SPECS, dtype="bfloat16", steps_per_shard=3), max_queue=2) as aw:
        for s in steps:
            aw.submit(s, make_grads(s), meta(s))
    write_run(tmp_path / "sync", steps, dtype="bfloat16", steps_per_shard=3)
    a, b = open_run(tmp_path / "async"), open_run(tmp_path / "sync")
    assert a.steps == b.steps == steps and a.meta["complete"] is True
    assert [r["loss"] for r in a.step_records] == [r["loss"] for r in b.step_records]
    for name in a.modules:
        np.testing.assert_array_equal(a.gradients(name), b.gradients(name))
    assert_same_accumulators(a.accumulators(), b.accumulators())


def test_async_writer_propagates_thread_error(tmp_path):
    aw = AsyncRunWriter(RunWriter(tmp_path / "run", SPECS, steps_per_shard=2))
    aw.submit(0, make_grads(0), meta(0))
    aw.submit(1, make_grads(1)[:1], meta(1))  # wrong number of gradients: fails in the thread
    with pytest.raises(GradlensError, match="background gradient writer failed: .*has 1 gradients") as err:
        for s in range(2, 50):
            aw.submit(s, make_grads(s), meta(s))
    assert isinstance(err.value.__cause__, GradlensError)
    with pytest.raises(GradlensError, match="background gradient writer failed"):
        aw.close()
    assert open_run(tmp_path / "run").steps == [0]  # the good step was flushed and the lock released
    write_run(tmp_path / "run", [1], resume=True)


# --- reading errors -----------------------------------------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path) -> Path:
    path = tmp_path / "run"
    write_run(path, range(6), steps_per_shard=2)
    return path


def edit_manifest(path: Path, change) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_missing_directory_and_manifest(tmp_path):
    with pytest.raises(GradlensError, match="nowhere: run directory does not exist"):
        open_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GradlensError, match="manifest.json: manifest missing"):
        open_run(tmp_path / "empty")


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "manifest.json: manifest is not valid JSON"),
    ('{"format": "something-else", "format_version": 1}', "manifest.json: not a gradlens run manifest"),
    ('{"format": "gradlens-run", "format_version": 99}', "manifest.json: format_version 99 is not supported"),
    ('{"format": "gradlens-run", "format_version": 1}', "manifest.json: malformed manifest"),
])
def test_bad_manifest(run_dir, text, message):
    (run_dir / "manifest.json").write_text(text)
    with pytest.raises(GradlensError, match=message):
        open_run(run_dir)


def test_missing_shard(run_dir):
    (run_dir / "shards" / "shard-000001.safetensors").unlink()
    with pytest.raises(GradlensError, match="shard-000001.safetensors: shard file missing"):
        open_run(run_dir)


def test_truncated_shard(run_dir):
    shard = run_dir / "shards" / "shard-000001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(GradlensError, match="shard-000001.safetensors: truncated or corrupt shard file"):
        open_run(run_dir)
    shard.write_bytes(shard.read_bytes()[:20])
    with pytest.raises(GradlensError, match="shard-000001.safetensors: truncated shard file"):
        open_run(run_dir)


def test_corrupt_shard_header(run_dir):
    shard = run_dir / "shards" / "shard-000002.safetensors"
    data = bytearray(shard.read_bytes())
    data[8] = ord("#")  # the header's opening brace
    shard.write_bytes(bytes(data))
    with pytest.raises(GradlensError, match="shard-000002.safetensors: not a safetensors file .*not valid JSON"):
        open_run(run_dir)
    shard.write_bytes((2**40).to_bytes(8, "little") + b"{}")
    with pytest.raises(GradlensError, match="shard-000002.safetensors: not a safetensors file .*absurd"):
        open_run(run_dir)


def test_pickle_shard_is_refused_not_unpickled(run_dir, tmp_path):
    marker = tmp_path / "unpickled"
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        with open(run_dir / "shards" / "shard-000000.safetensors", "wb") as f:
            pickle.dump({"m0": Touch(marker), "pad": np.zeros(100)}, f, protocol=protocol)
        with pytest.raises(GradlensError, match="shard-000000.safetensors: "):
            open_run(run_dir)
        run = open_run(run_dir, skip_bad=True)
        with pytest.raises(GradlensError):
            run.step_vector(0)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../evil.safetensors", "/etc/passwd", "shards/../../evil.safetensors"])
def test_shard_path_traversal_refused(run_dir, name):
    def change(m):
        m["shards"][0]["file"] = name
        for rec in m["steps"][:2]:
            rec["shard"] = name
    edit_manifest(run_dir, change)
    with pytest.raises(GradlensError, match="manifest.json: shard file name .* not a relative path"):
        open_run(run_dir)


def test_shard_steps_must_match_manifest(run_dir):
    edit_manifest(run_dir, lambda m: m["shards"][1].update(steps=[2, 7]))
    with pytest.raises(GradlensError, match="manifest.json: malformed manifest .*step 3 is not at offset 1"):
        open_run(run_dir)

    def change(m):
        m["steps"][3]["step"] = 7
    edit_manifest(run_dir, change)  # now self-consistent, but the shard itself holds steps 2 and 3
    with pytest.raises(GradlensError, match="shard-000001.safetensors: shard steps do not match the manifest"):
        open_run(run_dir)


def test_skip_bad_drops_steps_of_bad_shards(run_dir):
    (run_dir / "shards" / "shard-000001.safetensors").write_bytes(b"garbage")
    run = open_run(run_dir, skip_bad=True)
    assert run.steps == [0, 1, 4, 5]
    assert [f for f, _ in run.skipped] == ["shards/shard-000001.safetensors"]
    assert "shard-000001.safetensors" in run.skipped[0][1]
    np.testing.assert_array_equal(run.gradients(SPECS[0].name), np.stack([make_grads(s)[0] for s in [0, 1, 4, 5]]))
    assert [s for s, _ in run.iter_steps()] == [[0, 1], [4, 5]]
    with pytest.raises(GradlensError, match="step\\(s\\) \\[2\\] not among"):
        run.gradients(SPECS[0].name, [2])
    assert_accumulators(run, list(range(6)))  # accumulators never depended on the shards


def test_missing_or_corrupt_accumulators(run_dir):
    (run_dir / "accumulators.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(GradlensError, match="accumulators.safetensors: truncated accumulators file"):
        open_run(run_dir).accumulators()
    (run_dir / "accumulators.safetensors").unlink()
    (run_dir / "accumulators.prev.safetensors").unlink(missing_ok=True)  # a compaction's fallback, gone once done
    with pytest.raises(GradlensError, match="accumulators.safetensors: accumulators missing"):
        open_run(run_dir).accumulators()


def test_unknown_module_name(run_dir):
    with pytest.raises(GradlensError, match="no module named 'nope'"):
        open_run(run_dir).gradients("nope")
