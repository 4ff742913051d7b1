"""The instrument of the published-claims scripts (experiments/claims.py): the B-trajectory it keeps is the adapter
the run saves, the recorded gradients are those of the same steps, and its bf16 run keeps B in bf16."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import experiments.claims as claims
from gradlens.store import open_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("claims")
    steps, claims.STEPS = claims.STEPS, 4
    try:
        return {bf16: claims.ensure_run(root, "toy:tiny", "grpo", 0, bf16_master=bf16, resume=False)[0]
                for bf16 in (False, True)}
    finally:
        claims.STEPS = steps


def saved_b(run_dir):
    from safetensors.torch import load_file

    tensors = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    prefix, suffix = "base_model.model.", ".lora_B.weight"
    return {k[len(prefix):-len(suffix)]: v for k, v in tensors.items() if k.endswith(suffix)}


@pytest.mark.parametrize("bf16", [False, True])
def test_trajectory_ends_at_the_saved_adapter_and_has_one_row_per_recorded_step(runs, bf16):
    traj, saved = claims.load_trajectory(runs[bf16]), saved_b(runs[bf16])
    assert set(traj) == set(saved) == set(open_run(runs[bf16]).modules)
    for name, b in traj.items():
        assert b.shape[0] == len(open_run(runs[bf16]).steps) == 4
        np.testing.assert_array_equal(b[-1], saved[name].float().numpy())
        assert saved[name].dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert any(np.count_nonzero(b[-1]) for b in traj.values())


def test_bf16_master_weights_hold_only_bf16_values(runs):
    for b in claims.load_trajectory(runs[True]).values():
        as_bf16 = torch.from_numpy(b).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(as_bf16, b)
    # the float32 run's B is not confined to bf16's grid
    b = np.concatenate([v.ravel() for v in claims.load_trajectory(runs[False]).values()])
    assert (torch.from_numpy(b).to(torch.bfloat16).float().numpy() != b).any()


def test_resume_reuses_a_finished_run(runs):
    out, cost = claims.ensure_run(runs[False].parent, "toy:tiny", "grpo", 0, resume=True)
    assert out == runs[False] and cost == {"reused": True}
