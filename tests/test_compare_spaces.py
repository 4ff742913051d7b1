"""``gradlens compare --space lora_b weight`` on toy:tiny: one table with both spaces, at the same share of each space
and at the same count of trainable entries, with paired differences recomputed here from placement.csv."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open
from scipy import stats

from gradlens.sparse.delta import DELTA_FILE
from gradlens.sparse.masks import load_mask
from tests.helpers.cli import gradlens_inproc

ARGS = ["--model", "toy:tiny", "--regimes", "sft", "--methods", "random", "sign", "--budgets", "1%", "--seeds", "0",
        "1", "--max_steps", "3", "--probe_steps", "2", "--full_lrs", "2e-3", "--sparse_lrs", "3e-2", "--n_val", "20",
        "--n_eval", "20", "--eval_samples", "0", "--no-progress", "--divergence_margin", "1.0",
        "--per_device_train_batch_size", "8"]
B_ENTRIES, W_ENTRIES = 8_192, 73_728  # toy:tiny, r=8: B of the 14 projections, and their W


def test_compare_puts_both_spaces_in_one_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    proc = gradlens_inproc(capsys, "compare", "--space", "lora_b", "weight", "--out", str(out), *ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    placement = pd.read_csv(out / "placement.csv", dtype={"budget": str, "lora_b_budget": str})
    placement["budget"] = placement["budget"].fillna("")
    k_b, k_w = math.floor(0.01 * B_ENTRIES + 0.5), math.floor(0.01 * W_ENTRIES + 0.5)
    lora, weight = placement[placement.space == "lora_b"], placement[placement.space == "weight"]
    assert set(lora.budget) == {"", "1%"} and set(weight.budget) == {"", "1%", f"k={k_b}"}
    assert set(lora[lora.budget == "1%"].k) == {k_b} and set(weight[weight.budget == "1%"].k) == {k_w}
    assert set(weight[weight.budget == f"k={k_b}"].k) == {k_b}
    assert set(weight[weight.budget == f"k={k_b}"].lora_b_budget) == {"1%"}
    assert set(lora.entries) == {B_ENTRIES} and set(weight.entries) == {W_ENTRIES}

    spaces = pd.read_csv(out / "spaces.csv", dtype={"budget": str, "weight_budget": str}).fillna({"budget": ""})
    assert set(spaces.default_space) == {"lora_b"}
    assert {(r.method, r.basis) for r in spaces.itertuples()} == {
        ("full", "full"), ("random", "share"), ("random", "count"), ("sign", "share"), ("sign", "count")}
    for r in spaces.itertuples():
        a = lora[(lora.method == r.method) & (lora.budget == r.budget)].set_index("seed").accuracy
        b = weight[(weight.method == r.method) & (weight.budget == (r.weight_budget if r.basis != "full" else ""))]
        diffs = (b.set_index("seed").accuracy - a).loc[[0, 1]].to_numpy()
        half = stats.t.ppf(0.975, 1) * diffs.std(ddof=1) / math.sqrt(2)
        assert r.n_pairs == 2 and r.diff_mean == pytest.approx(diffs.mean(), abs=1e-12)
        if half > 0:
            assert (r.ci95_lo, r.ci95_hi) == pytest.approx((diffs.mean() - half, diffs.mean() + half))
        assert r.share_lora_b == pytest.approx(1.0 if r.basis == "full" else k_b / B_ENTRIES)
        want = {"full": 1.0, "share": k_w / W_ENTRIES, "count": k_b / W_ENTRIES}[r.basis]
        assert r.share_weight == pytest.approx(want)
    assert "weight minus lora_b (the default space) accuracy, paired over seeds" in proc.stdout
    assert "SFT [space weight]: base" in proc.stdout

    # every weight-space sparse run's delta is exactly 0 outside the mask its probe wrote
    mask, _ = load_mask(out / "probes" / "weight-sft-seed0" / "masks" / "sign-1pct.safetensors")
    moved = 0
    with safe_open(out / "adapters" / "weight" / "sft" / "sign-1pct-seed0" / DELTA_FILE, "pt") as f:
        for name, m in mask.items():
            d = f.get_tensor(name)
            assert torch.count_nonzero(d[~torch.from_numpy(m)]) == 0, name
            moved += int(torch.count_nonzero(d))
    assert moved == sum(int(m.sum()) for m in mask.values())  # every selected entry trained
    paired = pd.read_csv(out / "paired.csv")
    assert set(paired.space) == {"lora_b", "weight"} and np.isfinite(paired.diff_mean).all()

    from gradlens.config import CompareConfig

    assert "'lora_b' (the default)" in CompareConfig.__dataclass_fields__["space"].metadata["help"]
