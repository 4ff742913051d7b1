"""``gradlens.analysis.runinfo``: the facts ``gradlens info`` prints, against what a synthetic run was written with."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from gradlens.analysis.runinfo import check_verified, format_run_info, format_verify, run_info, verify_info
from gradlens.errors import GradlensError
from gradlens.store import RunWriter
from tests.helpers.store import SPECS, make_grads

STEPS = [0, 1, 2, 3, 4]
CLIPPED = (1, 3)  # steps whose clip coefficient is below 1
NONFINITE = 2  # the step with a NaN gradient
NO_SIGNAL = 4  # the step whose GRPO groups all had equal rewards


def write(path: Path, close: bool = True) -> RunWriter:
    w = RunWriter(path, SPECS, config={"record": {"regime": "grpo"}}, seed=3, steps_per_shard=2)
    for s in STEPS:
        grads = make_grads(s)
        if s == NONFINITE:
            grads[0][0, 0] = np.nan
        w.add_step(s, grads, {"loss": 1.0 / (s + 1), "clip_coef": 0.5 if s in CLIPPED else 1.0,
                              "zero_reward_std": s == NO_SIGNAL})
    if close:
        w.close()
    return w


def disk_bytes(path: Path) -> int:
    return sum(os.path.getsize(Path(d) / f) for d, _, files in os.walk(path) for f in files)


def test_run_info_counts_what_was_written(tmp_path: Path) -> None:
    path = tmp_path / "run"
    write(path)
    info = run_info(path)
    assert {k: info[k] for k in ("regime", "complete", "modules", "steps", "first_step", "last_step", "seed")} == {
        "regime": "grpo", "complete": True, "modules": len(SPECS), "steps": len(STEPS), "first_step": STEPS[0],
        "last_step": STEPS[-1], "seed": 3}
    assert info["entries"] == sum(int(np.prod(s.shape)) for s in SPECS)
    assert info["projections"] == {"q": 1, "down": 1, "v": 1}
    assert (info["nonfinite_steps"], info["clipped_steps"], info["no_signal_steps"]) == (1, len(CLIPPED), 1)
    assert info["loss_first_last"] == (1.0, 1.0 / (STEPS[-1] + 1))
    assert info["bytes"] == disk_bytes(path)


def test_a_trainer_checkpoint_inside_the_run_is_not_counted(tmp_path: Path) -> None:
    path = tmp_path / "run"
    write(path)
    before = run_info(path)["bytes"]
    (path / "trainer").mkdir()
    (path / "trainer" / "optimizer.pt").write_bytes(b"\0" * 10_000)
    assert run_info(path)["bytes"] == before == disk_bytes(path) - 10_000


def test_an_unfinished_run_is_incomplete_and_shows_its_committed_steps(tmp_path: Path) -> None:
    """While the writer is open, the run holds the full shards (steps 0..3 at two a shard): step 4 waits."""
    path = tmp_path / "run"
    writer = write(path, close=False)
    try:
        lines = format_run_info(run_info(path)).splitlines()
    finally:
        writer.close()
    assert lines[0] == f"{path}: grpo run, being written by pid {os.getpid()}; describing the 4 steps committed so far"
    assert lines[1] == f"  steps:    4 (steps 0..3), {len(CLIPPED)} clipped, 1 non-finite"
    assert not [ln for ln in lines if "WARNING" in ln]  # the step without signal is not committed yet


def test_the_printed_facts_warn_of_steps_without_signal(tmp_path: Path) -> None:
    path = tmp_path / "run"
    write(path)
    lines = format_run_info(run_info(path)).splitlines()
    assert lines[0] == f"{path}: grpo run, complete: {len(STEPS)} steps"
    assert lines[1] == f"  steps:    {len(STEPS)} (steps 0..4), {len(CLIPPED)} clipped, 1 non-finite"
    assert lines[2] == f"  modules:  {len(SPECS)} (q:1, down:1, v:1), 66 B entries"
    assert [ln for ln in lines if "WARNING" in ln] == [
        f"  WARNING:  1 of {len(STEPS)} steps had no learning signal (zero_gradient / zero_reward_std in their step "
        "records)"]
    assert lines[-1] == "  loss:     1.0000 -> 0.2000"


def test_verify_reads_every_tensor_and_names_a_flipped_byte(tmp_path: Path) -> None:
    path = tmp_path / "run"
    write(path)
    good = verify_info(path)
    shards = sorted(path.glob("shards/shard-*.safetensors"))
    assert len(shards) == 3 and good["checksums"] and not good["failed"]
    assert sorted(good["files"]) == sorted([*(str(s.relative_to(path)) for s in shards), "accumulators.safetensors"])
    assert format_verify(good).splitlines()[-1].endswith(f"all {len(good['tensors'])} tensor(s) match their crc32")
    check_verified(good)

    data = bytearray(shards[0].read_bytes())
    data[-1] ^= 0xFF  # the last byte of the last tensor's data: the framing stays valid, the checksum does not
    shards[0].write_bytes(bytes(data))
    bad = verify_info(path)
    assert len(bad["failed"]) == 1 and bad["failed"][0]["file"] == str(shards[0].relative_to(path))
    with pytest.raises(GradlensError) as err:
        check_verified(bad)
    assert len(str(err.value).splitlines()) == 1 and str(err.value).startswith(f"{path}: 1 of ")
