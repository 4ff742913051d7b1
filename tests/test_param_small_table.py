"""scripts/param_small_table.py: the weight-vs-lora_b table of docs/weight-space.md, checked on hand-made cells
against numpy/scipy (no training)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from experiments.rivals import cell_dir


def _row(space: str, method: str, budget: str, seed: int, acc: float, diverged: bool = False) -> dict:
    return {"space": space, "regime": "grpo", "method": method, "budget": budget, "seed": seed,
            "lr": 0.0 if method == "base" else 0.1, "steps": 60, "k": 10.0 if budget else None,
            "entries": 1000, "accuracy": acc, "sampled_accuracy": None, "diverged": diverged}


FULL = {"lora_b": [0.9, 0.8, 1.0], "weight": [0.7, 0.8, 0.6]}
RANDOM = {"lora_b": [0.5, 0.6, 0.4], "weight": [0.65, 0.7, 0.9]}
SIGN = {"lora_b": [0.8, 0.7, 0.9], "weight": [0.6, 0.75, 0.1]}  # weight sign seed 2 diverged


def _write_cells(out: Path) -> None:
    for space in ("lora_b", "weight"):
        rows = [_row(space, "base", "", 0, 0.4)]
        for s in range(3):
            rows += [_row(space, "full", "", s, FULL[space][s]), _row(space, "random", "1%", s, RANDOM[space][s]),
                     _row(space, "sign", "1%", s, SIGN[space][s], diverged=space == "weight" and s == 2)]
        cell = cell_dir(out, "toy:small", 60, "grpo", space)
        cell.mkdir(parents=True)
        pd.DataFrame(rows).to_csv(cell / "placement.csv", index=False)


def _t(x: list[float]) -> tuple[float, float]:
    a = np.asarray(x)
    return a.mean(), stats.t.ppf(0.975, a.size - 1) * a.std(ddof=1) / math.sqrt(a.size)


def test_table_pairs_per_seed_and_counts_diverged_runs(tmp_path: Path, load_script) -> None:
    _write_cells(tmp_path / "runs")
    log = tmp_path / "grpo.log"
    log.write_text("noise\nTIME grpo weight wall 12.5 user 20.25 sys 1.5\n")
    out = tmp_path / "param.json"
    script = load_script("scripts/param_small_table.py")
    assert script.main([str(tmp_path / "runs"), "--regimes", "grpo", "--json", str(out), "--log", str(log),
                        "--command", "cmd", "--note", "reduced"]) == 0
    result = json.loads(out.read_text())
    rows = {r["space"]: r for r in result["rows"]}
    assert set(rows) == {"lora_b", "weight"}
    # random minus its own seed's full gain share, lora_b: (acc - base) / (full - base)
    shares = [(r - 0.4) / (f - 0.4) for r, f in zip(RANDOM["lora_b"], FULL["lora_b"], strict=True)]
    assert rows["lora_b"]["random"]["gain_share"] == pytest.approx(np.mean(shares))
    mean, half = _t([s - r for s, r in zip(SIGN["lora_b"], RANDOM["lora_b"], strict=True)])
    got = rows["lora_b"]["sign_minus_random"]
    assert got["mean"] == pytest.approx(mean) and got["ci95"][0] == pytest.approx(mean - half)
    # the diverged weight sign run is counted, never averaged or paired
    assert rows["weight"]["sign"]["n_diverged"] == 1 and rows["weight"]["sign"]["mean"] == pytest.approx(0.675)
    assert rows["weight"]["sign_minus_random"]["n_pairs"] == 2
    spaces = {(s["method"], s["budget"] or ""): s for s in result["weight_minus_lora_b"]}
    mean, half = _t([w - b for w, b in zip(RANDOM["weight"], RANDOM["lora_b"], strict=True)])
    assert spaces[("random", "1%")]["diff_mean"] == pytest.approx(mean)
    assert spaces[("random", "1%")]["ci95_hi"] == pytest.approx(mean + half)
    assert spaces[("sign", "1%")]["n_pairs"] == 2
    assert result["timings"] == [{"regime": "grpo", "space": "weight", "wall_s": 12.5, "cpu_s": 21.8,
                                  "log": str(log)}]
    assert result["commands"] == ["cmd"] and result["reduced"] == ["reduced"] and "torch" in result["versions"]


def test_no_cells_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], load_script) -> None:
    script = load_script("scripts/param_small_table.py")
    assert script.main([str(tmp_path / "nothing"), "--json", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("param_small_table: error: ") and "no finished cells" in err and err.count("\n") == 1
    assert not (tmp_path / "x.json").exists()
