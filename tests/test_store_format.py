"""Tests for run-directory format 2: the Manifest, format-1 runs, the per-commit journal and its compaction (also
killed midway), checksums and ``gradlens info --verify``, and the cap on buffered steps."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import gradlens.store.writer as store_writer
from gradlens.store import Manifest, ModuleSpec, RunWriter, open_run
from gradlens.store.format import load_manifest
from tests.helpers.cli import assert_one_line_error, gradlens_inproc, raises_one_line
from tests.helpers.store import SPECS, assert_accumulators, assert_same_accumulators, make_grads, meta, write_run

REPO = Path(__file__).resolve().parents[1]
V1_RUN = REPO / "tests" / "data" / "run-v1"  # written by the format-1 writer (commit b7a7f9c): steps 0-4, 3 is NaN


def assert_same_runs(a, b) -> None:
    """Bitwise the same steps, records, gradients and accumulators."""
    assert a.steps == b.steps and [r["loss"] for r in a.step_records] == [r["loss"] for r in b.step_records]
    for name in b.modules:
        np.testing.assert_array_equal(a.gradients(name), b.gradients(name))
    assert_same_accumulators(a.accumulators(), b.accumulators())


# --- the manifest -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_manifest_round_trips_and_meta_is_the_json_on_disk(tmp_path, dtype):
    path = tmp_path / "run"
    write_run(path, range(5), dtype=dtype, steps_per_shard=2, config={"lr": 1e-4}, seed=3)
    on_disk = json.loads((path / "manifest.json").read_text())
    run = open_run(path)
    assert run.meta == on_disk and "_specs" not in json.dumps(on_disk)
    manifest = load_manifest(path)
    assert isinstance(manifest, Manifest) and manifest.to_json() == on_disk and manifest.modules == SPECS
    assert on_disk["format_version"] == 2 and on_disk["complete"] is True
    acc = on_disk["accumulators"]
    assert acc["journal"] == ("shards" if dtype == "float32" else "partials")
    assert acc["base"]["file"] == "accumulators.safetensors" and acc["base"]["n_steps"] == 5 and acc["partials"] == []
    assert all(set(s["crc32"]) == {"m0", "m1", "m2"} for s in on_disk["shards"])
    half = ["partials"] if dtype != "float32" else []  # the partials were folded into the base at close
    assert {p.name for p in path.iterdir()} == {".lock", "manifest.json", "accumulators.safetensors", "shards", *half}
    assert not list(path.glob("partials/*"))


def _edit(path: Path, change) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m["steps"].append(dict(m["steps"][0])), "a step is recorded twice, or a shard listed twice"),
    (lambda m: m["shards"].append(m["shards"][0]), "a step is recorded twice, or a shard listed twice"),
    (lambda m: m["accumulators"]["base"].update(file="other.safetensors"), "the base is 'other.safetensors'"),
    (lambda m: m["shards"][0]["crc32"].update(m0="x"), "'x' is not an integer"),
    (lambda m: m["shards"][0]["crc32"].update(m0=2**32), "is not a table of tensor name"),
    (lambda m: m["accumulators"].update(journal="magic"), "journal 'magic' is not one of"),
    (lambda m: m["accumulators"]["base"].update(n_steps=9), "the base covers 9 steps of 4"),
    (lambda m: m["accumulators"]["base"].update(n_steps=1), "do not end at a shard boundary"),
    (lambda m: (m["accumulators"].update(journal="partials"), m["accumulators"]["base"].update(n_steps=2)),
     "the partials after the base hold steps [], not the steps [2, 3] after it"),
    (lambda m: m["modules"][1].update(name=m["modules"][0]["name"]), "module names are not unique"),
    (lambda m: m["steps"][0].update(nonfinite="no"), "nonfinite is not true/false"),
])
def test_malformed_manifest_is_a_one_line_error(tmp_path, change, message):
    path = tmp_path / "run"
    write_run(path, range(4), steps_per_shard=2)
    _edit(path, change)
    assert message in raises_one_line("manifest.json: malformed manifest", open_run, path)


def test_newer_format_names_the_version_it_needs(tmp_path):
    path = tmp_path / "run"
    write_run(path, range(2))
    _edit(path, lambda m: m.update(format_version=3))
    raises_one_line("format_version 3 is not supported (this gradlens reads 1 and 2; a newer gradlens wrote it)",
                    open_run, path)


# --- format 1 -----------------------------------------------------------------------------------------------------


def test_format_1_run_opens_read_only(tmp_path, capsys):
    path = tmp_path / "v1"
    shutil.copytree(V1_RUN, path)
    run = open_run(path)
    assert run.meta["format_version"] == 1 and run.manifest.format_version == 1
    assert run.steps == list(range(5)) and run.meta["nonfinite_steps"] == [3] and run.meta["complete"] is True
    for i, spec in enumerate(SPECS):
        want = np.stack([make_grads(s)[i] for s in range(5)])
        if i == 0:
            want[3, 1, 1] = np.nan
        np.testing.assert_array_equal(run.gradients(spec.name), want)
    assert_accumulators(run, [0, 1, 2, 4])  # float64 sign sums and counts of format 1, read as before

    raises_one_line("a format_version 1 run can be read but not resumed (this gradlens writes format 2)",
                    RunWriter, path, SPECS, steps_per_shard=2, resume=True)
    info = gradlens_inproc(capsys, "info", str(path), "--verify")
    assert info.returncode == 0, info.stderr
    assert "format 1" in info.stdout and "no checksums recorded, only framing and shapes checked" in info.stdout
    for name in ("shard-000000", "shard-000001", "shard-000002", "accumulators.safetensors"):
        assert name in info.stdout
    files = {p.relative_to(path) for p in path.rglob("*") if p.is_file()}
    assert files == {p.relative_to(V1_RUN) for p in V1_RUN.rglob("*") if p.is_file()} | {Path(".lock")}
    for file in files - {Path(".lock")}:  # the refused resume changed nothing
        assert (path / file).read_bytes() == (V1_RUN / file).read_bytes(), file


# --- the journal and compaction -----------------------------------------------------------------------------------

WIDE = [ModuleSpec.from_name("model.layers.0.mlp.up_proj", (64, 8))]


def wide_grads(step: int) -> list[np.ndarray]:
    return [np.random.default_rng(step).standard_normal((64, 8)).astype(np.float32)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_commit_writes_its_own_steps_not_the_whole_runs_statistics(tmp_path, monkeypatch, dtype):
    """Format 1 rewrote every step's statistics at every commit. Now a commit writes its shard and (half precision)
    its own partial sums, of a size that does not grow with the run; the whole run's statistics are rewritten only
    once the journal since the last compaction holds COMPACT_RATIO times their size, and at close."""
    path = tmp_path / "run"
    written: list[tuple[str, int]] = []
    real = store_writer.atomic_write

    def logged(target, write):
        real(target, write)
        written.append((Path(target).relative_to(path).as_posix(), Path(target).stat().st_size))

    monkeypatch.setattr(store_writer, "atomic_write", logged)
    commits = []
    with RunWriter(path, WIDE, dtype=dtype, steps_per_shard=2) as w:
        for s in range(60):
            w.add_step(s, wide_grads(s), {})
            if s % 2:
                commits.append(list(written))
                written.clear()
    final = written
    shard_bytes = sum(b for c in commits for f, b in c if f.startswith("shards/"))
    threshold = store_writer.COMPACT_RATIO * store_writer.BASE_BYTES_PER_ENTRY * 512
    journal = 0  # what the statistics since the last compaction are rebuilt from: float32 shards, or partials
    for k, files in enumerate(commits):
        names = [f for f, _ in files]
        assert names[0] == f"shards/shard-{k:06d}.safetensors", names
        journal += files[0][1] if dtype == "float32" else 0
        if "accumulators.safetensors" in names:  # a compaction, as soon as the journal outweighs the statistics
            assert names == [names[0], "accumulators.safetensors"] and journal >= threshold, (k, files)
            journal = 0
            continue
        assert journal < threshold, (k, journal)
        if dtype == "float32":
            assert names == [names[0]], names  # the float32 shard is the journal: nothing else is written
        else:
            assert names == [names[0], f"partials/partial-{2 * k:09d}.accumulators.safetensors"], names
            assert files[1][1] == commits[0][1][1]  # the partial does not grow with the run
            journal += files[1][1]
    compacted = ["accumulators.safetensors" in [f for f, _ in c] for c in commits]
    assert sum(compacted) >= 1 and [f for f, _ in final] == ([] if compacted[-1] else ["accumulators.safetensors"])
    if dtype == "float32":
        base_bytes = sum(b for c in commits for f, b in c if f == "accumulators.safetensors")
        assert base_bytes <= shard_bytes / store_writer.COMPACT_RATIO  # extra bytes per shard byte, before close
    run = open_run(path)
    assert run.steps == list(range(60))
    acc = run.accumulators()[WIDE[0].name]
    g = np.stack([wide_grads(s)[0] for s in range(60)]).astype(np.float64)
    np.testing.assert_allclose(acc.sum, g.sum(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(acc.sqnorm, (g.reshape(60, -1) ** 2).sum(1), rtol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_statistics_of_an_unfinished_run_merge_base_and_journal_bitwise(tmp_path, monkeypatch, dtype):
    """Whenever compactions happen, the merged statistics equal the closed run's, bitwise, and the independent
    numpy computation; the unfinished run's journal (shards or partials) is merged on read."""
    steps = [s for s in range(14) if s != 5]
    grads = {s: make_grads(s) for s in steps}
    grads[8][2][0, 0] = np.inf  # a non-finite step inside the journal: recorded, not accumulated
    ref = tmp_path / "ref"
    with RunWriter(ref, SPECS, dtype=dtype, steps_per_shard=3) as w:
        for s in steps:
            w.add_step(s, grads[s], meta(s))
    for ratio in (0, 1, 10**9):  # compact at every commit, every few commits, never before close
        monkeypatch.setattr(store_writer, "COMPACT_RATIO", ratio)
        path = tmp_path / f"ratio-{ratio}"
        w = RunWriter(path, SPECS, dtype=dtype, steps_per_shard=3)
        for s in steps:
            w.add_step(s, grads[s], meta(s))
        w.flush()
        unfinished = open_run(path)
        assert unfinished.meta["complete"] is False and unfinished.steps == steps
        partials = len(unfinished.meta["accumulators"]["partials"])
        assert partials == (5 if dtype != "float32" and ratio == 10**9 else 0 if dtype == "float32" or ratio == 0
                            else partials), partials
        assert_accumulators_match(unfinished, [s for s in steps if s != 8])
        merged = unfinished.accumulators()
        w.close()
        assert_same_runs(open_run(path), open_run(ref))
        assert_same_accumulators(merged, open_run(ref).accumulators())


def assert_accumulators_match(run, finite: list[int]) -> None:
    acc = run.accumulators()
    np.testing.assert_array_equal(acc.steps, finite)
    for i, spec in enumerate(SPECS):
        g = np.stack([make_grads(s)[i] for s in finite]).astype(np.float64)
        got = acc[spec.name]
        assert got.count == len(finite) and got.sumsign.dtype == np.float64 and got.nonzero.dtype == np.int64
        np.testing.assert_array_equal(got.nonzero, (g != 0).sum(0))
        np.testing.assert_array_equal(got.sumsign, np.sign(g).sum(0))
        for key, want in (("sum", g.sum(0)), ("sumsq", (g**2).sum(0)), ("sumabs", np.abs(g).sum(0))):
            np.testing.assert_allclose(getattr(got, key), want, rtol=1e-12, atol=1e-12, err_msg=key)


KILL_IN_COMPACTION = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from helpers.store import SPECS, make_grads, meta
    import gradlens.store.writer as sw
    run, point, state = Path({path!r}), {point!r}, {{"n": 0, "compacting": False}}
    real_write, real_dump = sw.atomic_write, sw.json_dump

    def committed():
        return len(json.loads((run / "manifest.json").read_text())["steps"])

    def die(steps):
        print(f"committed={{steps}}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    def atomic_write(path, write):
        if Path(path).name != "accumulators.safetensors":
            return real_write(path, write)
        state["n"] += 1
        if state["n"] == 2:  # the second compaction
            if point == "rotated":  # the committed base was just renamed to accumulators.prev.safetensors
                die(committed())
            real_write(path, write)
            if point == "written":  # the new base is written, the manifest still names the old one
                die(committed())
            state["compacting"] = True
            return
        real_write(path, write)

    def json_dump(obj, path):
        real_dump(obj, path)
        if state["compacting"]:  # the manifest names the new base; the old one and the partials are not yet gone
            die(len(obj["steps"]))

    sw.atomic_write, sw.json_dump, sw.COMPACT_RATIO = atomic_write, json_dump, 1
    w = sw.RunWriter(run, SPECS, dtype={dtype!r}, steps_per_shard=2)
    for s in range(40):
        w.add_step(s, make_grads(s), meta(s))
    print("no kill", flush=True)
""")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("point", ["rotated", "written", "committed"])
def test_kill_during_a_compaction_loses_nothing_committed_and_resume_equals_uninterrupted(tmp_path, dtype, point):
    path = tmp_path / "run"
    script = KILL_IN_COMPACTION.format(tests=str(REPO / "tests"), path=str(path), point=point, dtype=dtype)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    n = int(proc.stdout.split("committed=")[1])
    assert n >= 4
    run = open_run(path)
    assert run.steps == list(range(n)) and run.meta["complete"] is False
    for i, name in enumerate(run.modules):
        want = np.stack([make_grads(s)[i] for s in range(n)])
        got = run.gradients(name)
        np.testing.assert_array_equal(got, want if dtype == "float32" else torch.from_numpy(want).bfloat16().float())
    assert_accumulators(run, list(range(n)))

    write_run(path, range(20), dtype=dtype, steps_per_shard=2, resume=True)
    write_run(tmp_path / "ref", range(20), dtype=dtype, steps_per_shard=2)
    assert_same_runs(open_run(path), open_run(tmp_path / "ref"))
    assert not (path / "accumulators.prev.safetensors").exists() and not list(path.glob("partials/*"))


# --- checksums ----------------------------------------------------------------------------------------------------


def tensor_spans(shard: Path) -> dict[str, tuple[int, int]]:
    data = shard.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]) for k, v in header.items()
            if k != "__metadata__"}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_flipped_byte_of_shard_data_is_a_one_line_error_naming_shard_module_and_steps(tmp_path, dtype):
    path = tmp_path / "run"
    write_run(path, range(6), dtype=dtype, steps_per_shard=2)
    shard = path / "shards" / "shard-000001.safetensors"
    data = shard.read_bytes()
    spans = tensor_spans(shard)
    every = 1 if dtype == "float32" else 3
    for key, (lo, hi) in spans.items():
        i = int(key[1:])
        for pos in range(lo, hi, every):
            flipped = bytearray(data)
            flipped[pos] ^= 0x10
            shard.write_bytes(bytes(flipped))
            run = open_run(path)  # the framing is intact: found when the tensor is read
            message = raises_one_line(f"shard-000001.safetensors: tensor {key} (module {SPECS[i].name}, steps 2..3) "
                                      "is corrupt: crc32", run.gradients, SPECS[i].name)
            assert "differs from the manifest's" in message
            others = [s for j, s in enumerate(SPECS) if j != i]
            assert all(run.gradients(s.name).shape[0] == 6 for s in others)  # the other tensors read
        shard.write_bytes(data)
    run = open_run(path)
    assert all(run.gradients(s.name).shape[0] == 6 for s in SPECS)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_flipped_accumulator_byte_is_a_one_line_error(tmp_path, dtype):
    """The base, a partial (half precision) and a float32 journal shard the statistics are rebuilt from."""
    path = tmp_path / "run"
    w = RunWriter(path, SPECS, dtype=dtype, steps_per_shard=2)
    for s in range(4):
        w.add_step(s, make_grads(s), meta(s))
    journal = "partials/partial-000000002.accumulators.safetensors" if dtype != "float32" else \
        "shards/shard-000001.safetensors"
    target = path / journal
    lo, hi = tensor_spans(target)["m0.sum" if dtype != "float32" else "m0"]
    data = bytearray(target.read_bytes())
    data[(lo + hi) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    raises_one_line(f"{Path(journal).name}: tensor m0", open_run(path).accumulators)
    data[(lo + hi) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    w.close()
    assert_accumulators(open_run(path), list(range(4)))

    write_run(tmp_path / "closed", range(4), dtype=dtype, steps_per_shard=2)
    base = tmp_path / "closed" / "accumulators.safetensors"
    lo, hi = tensor_spans(base)["m1.sumsq"]
    data = bytearray(base.read_bytes())
    data[lo + 3] ^= 0x80
    base.write_bytes(bytes(data))
    raises_one_line("accumulators.safetensors: tensor m1.sumsq (module model.layers.0.mlp.down_proj) is corrupt",
                    open_run(tmp_path / "closed").accumulators)


def test_info_verify_reads_every_tensor_and_names_the_bad_one(tmp_path, capsys):
    path = tmp_path / "run"
    write_run(path, range(5), dtype="bfloat16", steps_per_shard=2)
    proc = gradlens_inproc(capsys, "info", str(path), "--verify")
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("  verify:")]
    files = ["shards/shard-000000.safetensors", "shards/shard-000001.safetensors", "shards/shard-000002.safetensors",
             "accumulators.safetensors"]
    assert [ln.split()[1].rstrip(":") for ln in lines] == files
    assert all(ln.endswith(", ok") for ln in lines) and "3 tensor(s) (m0..m2)" in lines[0]
    n = 3 * 3 + 1 + 3 * 9  # shard tensors; steps and per module count, 3 float sums, sumsign, nonzero, 2 series, prev
    assert f"all {n} tensor(s) match their crc32" in proc.stdout

    shard = path / "shards" / "shard-000002.safetensors"
    lo, _ = tensor_spans(shard)["m2"]
    data = bytearray(shard.read_bytes())
    data[lo] ^= 0x04
    shard.write_bytes(bytes(data))
    proc = gradlens_inproc(capsys, "info", str(path), "--verify")
    assert_one_line_error(proc, f"1 of {n} tensor(s) failed verification", "shard-000002.safetensors: tensor m2",
                          "model.layers.1.self_attn.v_proj", "steps 4..4")
    assert "shards/shard-000002.safetensors: 3 tensor(s) (m0..m2), 0.00 MiB, 1 BAD" in proc.stdout
    assert f"1 of {n} tensor(s) FAILED" in proc.stdout
    plain = gradlens_inproc(capsys, "info", str(path))
    assert plain.returncode == 0  # without --verify only the framing is checked, and it is intact


# --- buffering ----------------------------------------------------------------------------------------------------


def test_run_writer_without_steps_per_shard_buffers_at_most_64_steps(tmp_path):
    """A 64x8 module is 2 KiB a step: a shard of 256 MiB would buffer 131,072 steps, all lost on a kill."""
    path = tmp_path / "run"
    w = RunWriter(path, [ModuleSpec.from_name("model.layers.0.self_attn.q_proj", (64, 8))])
    for s in range(64):
        w.add_step(s, [np.full((64, 8), s, np.float32)], {})
    assert w.steps_per_shard <= 64 and open_run(path).steps == list(range(64))  # committed without a flush
    w.close()
