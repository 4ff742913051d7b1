"""The diagnose checked where it was not tuned: leave one world out on a hand-made table, against scipy's Spearman."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from gradlens.errors import GradlensError
from gradlens.placement.diagnose_check import leave_one_world_out, verdict
from tests.helpers.cli import assert_one_line_error, gradlens_inproc

# World "small": p1 falls exactly as the gap grows (|rho| 1), p2 rises with it only roughly.
# World "math": p2 rises exactly with the gap (rho 1), p1 only roughly.
SMALL = {"gap": [0.01, 0.02, 0.05, 0.08, 0.12, 0.20], "p1": [0.9, 0.8, 0.6, 0.5, 0.3, 0.1],
         "p2": [0.1, 0.3, 0.2, 0.5, 0.4, 0.6]}
MATH = {"gap": [0.30, 0.02, 0.15, 0.07, 0.11], "p1": [0.2, 0.4, 0.1, 0.3, 0.5],
        "p2": [0.9, 0.1, 0.7, 0.2, 0.4]}


def table() -> pd.DataFrame:
    rows = []
    for world, cols in (("small", SMALL), ("math", MATH)):
        for i in range(len(cols["gap"])):
            rows.append({"world": world, "cell": f"{world}-sft", "budget": f"{i}%",
                         **{k: v[i] for k, v in cols.items()}})
    return pd.DataFrame(rows)


def test_leave_one_world_out_gives_the_known_rank_correlations() -> None:
    result = leave_one_world_out(table(), ["p1", "p2"]).set_index(["train_world", "test_world"])
    small_to_math = result.loc[("small", "math")]
    assert small_to_math["predictor"] == "p1" and small_to_math["direction"] == -1
    assert small_to_math["rho_train"] == pytest.approx(1.0)
    rho, p = stats.spearmanr(-np.array(MATH["p1"]), MATH["gap"])
    assert small_to_math["rho_test"] == pytest.approx(rho) and small_to_math["p_test"] == pytest.approx(p)
    assert small_to_math["n_test"] == 5

    math_to_small = result.loc[("math", "small")]
    assert math_to_small["predictor"] == "p2" and math_to_small["direction"] == 1
    rho_train, _ = stats.spearmanr(MATH["p2"], MATH["gap"])
    assert rho_train == pytest.approx(1.0) and math_to_small["rho_train"] == pytest.approx(1.0)
    rho, p = stats.spearmanr(SMALL["p2"], SMALL["gap"])
    assert math_to_small["rho_test"] == pytest.approx(rho) and math_to_small["p_test"] == pytest.approx(p)
    # -p1 ranks the math gap with Spearman 0.6 but p 0.28 on 5 points: not both directions transfer
    assert rho < 1 and "no probe statistic predicts the gap across worlds" in verdict(result.reset_index())


def test_a_predictor_that_transfers_is_said_to() -> None:
    t = table()
    t["p3"] = -t["gap"] * 10 + 1  # falls exactly with the gap on both worlds
    result = leave_one_world_out(t, ["p3"])
    assert list(result["rho_test"]) == pytest.approx([1.0, 1.0]) and list(result["direction"]) == [-1, -1]
    assert verdict(result).startswith("the chosen predictor ranks the gap on every held-out world")


def test_bad_tables_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(GradlensError, match="lacks column"):
        leave_one_world_out(table().drop(columns="gap"), ["p1"])
    with pytest.raises(GradlensError, match="leaving one out needs at least two"):
        leave_one_world_out(table()[table()["world"] == "math"], ["p1"])
    path = tmp_path / "points.csv"
    table().to_csv(path, index=False)
    assert_one_line_error(gradlens_inproc(capsys, "diagnose", str(tmp_path), "--check", str(path)),
                          "not both or neither")
    assert_one_line_error(gradlens_inproc(capsys, "diagnose", "--check", str(path), "--predictors", "nope"),
                          str(path), "nope")

    proc = gradlens_inproc(capsys, "diagnose", "--check", str(path), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert "small -> math: minus p1" in proc.stdout and "no probe statistic predicts the gap" in proc.stdout
    written = pd.read_csv(tmp_path / "out" / "diagnose_check.csv")
    assert len(written) == 2 and set(written["predictor"]) == {"p1", "p2"}
    prov = json.loads((tmp_path / "out" / "diagnose_check.json").read_text())
    assert prov["predictors"] == ["p1", "p2"] and prov["measured_accuracy"]["spearman"] == 0.32
