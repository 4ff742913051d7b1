"""Tests for ``gradlens analyze`` and ``gradlens.analyze.analyze_runs`` on two real toy runs (SFT and GRPO).

The runs are recorded once per module by ``gradlens.record`` (real TRL training, nothing mocked); ``summary.csv`` is
checked against a numpy computation done straight from ``open_run(...).gradients(...)``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from gradlens.analyze import analyze_runs
from gradlens.cli.main import main
from gradlens.config import AnalyzeConfig, RecordConfig
from gradlens.errors import GradlensError
from gradlens.store import open_run
from tests.test_stats import reference_row

REQUIRED = ["run", "regime", "module", "proj", "layer", "steps", "cos_lag1_mean", "erank_traj", "erank_traj_unit",
            "erank_step_mean", "stable_rank_traj", "sign_stability_mean", "sign_stable_frac_0.8", "sign_null_mean"]
FIGURES = ["lag_cosine.png", "cosine_series.png", "erank_traj.png", "sign_hist.png", "heatmap.png"]


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    from gradlens.record import record

    root = tmp_path_factory.mktemp("toy_runs")
    paths = {}
    for regime in ("sft", "grpo"):
        paths[regime] = root / regime
        record(RecordConfig(regime=regime, out=str(paths[regime]), max_steps=8, n_train=64,
                            trl={"logging_steps": 100, "disable_tqdm": True}))
    return paths


def _reference_from_store(path, lags: int, window: int | None = None) -> tuple[dict, dict]:
    """(whole adapter, first module) statistics recomputed from the raw gradients of every module."""
    run = open_run(path)
    steps = [r["step"] for r in run.step_records if not r["nonfinite"]]
    if window is not None:
        steps = steps[:window]
    grads = [run.gradients(m, steps) for m in run.modules]
    return reference_row(grads, lags), reference_row(grads[:1], lags)


def _assert_close(row: pd.Series, ref: dict, suffix: str = "") -> None:
    for key, want in ref.items():
        got = float(row[key + suffix])
        if math.isnan(want):
            assert math.isnan(got), key
        else:
            assert got == pytest.approx(want, rel=1e-7, abs=1e-9), (key + suffix, got, want)


def test_cli_on_toy_runs_matches_numpy_and_draws_figures(toy_runs, tmp_path, capsys):
    out = tmp_path / "analysis"
    argv = ["analyze", str(toy_runs["sft"]), str(toy_runs["grpo"]), "--out", str(out), "--window", "4",
            "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Finding: GRPO lag-1 cosine" in printed and "vs SFT" in printed and "(null 0.27)" in printed
    assert f"wrote 16 files to {out}" in printed

    summary = pd.read_csv(out / "summary.csv")
    modules = pd.read_csv(out / "modules.csv")
    assert list(summary["run"]) == ["sft", "grpo"] and list(summary["regime"]) == ["sft", "grpo"]
    assert set(REQUIRED) <= set(modules.columns)
    assert set(REQUIRED) - {"module", "proj", "layer"} <= set(summary.columns)
    for regime in ("sft", "grpo"):
        ref, ref_first = _reference_from_store(toy_runs[regime], lags=10)
        ref_w, _ = _reference_from_store(toy_runs[regime], lags=10, window=4)
        row = summary[summary["run"] == regime].iloc[0]
        assert row["steps"] == 8 and row["steps_w4"] == 4 and row["nonfinite_steps"] == 0
        _assert_close(row, ref)
        _assert_close(row, ref_w, suffix="_w4")
        mods = modules[modules["run"] == regime]
        assert len(mods) == len(open_run(toy_runs[regime]).modules) == 14
        _assert_close(mods.iloc[0], ref_first)
        assert sorted(mods["proj"].unique()) == sorted(["q", "k", "v", "o", "gate", "up", "down"])
    proj = pd.read_csv(out / "proj.csv")
    layers = pd.read_csv(out / "layers.csv")
    assert len(proj) == 2 * 7 and len(layers) == 2 * 2
    assert proj.groupby("run")["entries"].sum().to_dict() == summary.set_index("run")["entries"].to_dict()

    for name in ("summary", "modules", "proj", "layers", "series", "hist"):
        import pyarrow.parquet as pq

        table = pq.read_table(out / f"{name}.parquet")
        prov = json.loads(table.schema.metadata[b"gradlens_provenance"])
        assert [r["seed"] for r in prov["runs"]] == [0, 0]
    pd.testing.assert_frame_equal(pd.read_parquet(out / "summary.parquet"), summary, check_dtype=False)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["config"]["window"] == 4 and prov["versions"]["gradlens"]
    assert [r["path"] for r in prov["runs"]] == [str(toy_runs[r].resolve()) for r in ("sft", "grpo")]
    assert [r["regime"] for r in prov["runs"]] == ["sft", "grpo"] and "summary.csv" in prov["files"]

    from PIL import Image

    for name in FIGURES:
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 600
            assert str(toy_runs["grpo"].resolve()) in im.info["Source"]


def test_library_api_yaml_config_and_no_output(toy_runs, tmp_path, capsys):
    result = analyze_runs([toy_runs["grpo"]], config=AnalyzeConfig(lags=3, progress=False))
    assert result.files == [] and result.summary.loc[0, "regime"] == "grpo"
    assert [c for c in result.summary.columns if c.startswith("cos_lag")] == [f"cos_lag{i}_mean" for i in (1, 2, 3)]
    series = result.series
    adapter_lag1 = series[(series["scope"] == "adapter") & (series["series"] == "cos_lag1")]["value"].to_numpy()
    ref = [open_run(toy_runs["grpo"]).step_vector(s) for s in range(1, 9)]
    want = [float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(ref, ref[1:], strict=False)]
    np.testing.assert_allclose(adapter_lag1, want, rtol=1e-6)
    assert "Finding" not in result.findings and "grpo (grpo, T=8)" in result.findings

    config = tmp_path / "analyze.yaml"
    config.write_text("lags: 2\nwindow: 5\nfigures: false\nprogress: false\n")
    out = tmp_path / "yaml_out"
    assert main(["analyze", str(toy_runs["sft"]), "--config", str(config), "--out", str(out)]) == 0
    summary = pd.read_csv(out / "summary.csv")
    assert "cos_lag2_mean_w5" in summary.columns and "cos_lag3_mean" not in summary.columns
    assert not list(out.glob("*.png"))


@pytest.mark.parametrize("kind", ["missing", "empty", "file"])
def test_not_a_run_exits_2_with_one_line(tmp_path, capsys, kind):
    path = tmp_path / "x"
    if kind == "empty":
        path.mkdir()
    elif kind == "file":
        path.write_text("hello")
    assert main(["analyze", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradlens analyze: error:") and str(path) in lines[0]
    assert captured.out == "" and not (tmp_path / "out").exists()


def test_bad_settings_are_errors(tmp_path, capsys):
    assert main(["analyze", str(tmp_path), "--no-progress"]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path), "--out", str(tmp_path / "o"), "--lags", "0"]) == 2
    assert "lags must be >= 1" in capsys.readouterr().err
    with pytest.raises(GradlensError, match="window must be >= 2"):
        AnalyzeConfig(window=1)
    with pytest.raises(GradlensError, match="no run directories"):
        analyze_runs([], config=AnalyzeConfig(progress=False))
