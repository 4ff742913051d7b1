"""Tests for ``gradlens analyze`` and ``gradlens.analysis.analyze.analyze_runs`` on two real toy runs (SFT and GRPO),
and of the analysis of synthetic runs with exactly zero steps, without raw shards and on different module sets.

The toy runs are recorded once per module by ``gradlens.record`` (real TRL training, nothing mocked); ``summary.csv``
is checked against a numpy computation done straight from ``open_run(...).gradients(...)``. The synthetic runs are
written by ``RunWriter`` and checked against the plain-numpy reference of ``tests/helpers/stats.py``.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest

from gradlens.analysis.analyze import analyze_runs
from gradlens.analysis.driver import analyze_run
from gradlens.analysis.run_stats import ACC_SOURCE, stat_columns
from gradlens.cli.main import main
from gradlens.config import AnalyzeConfig, RecordConfig
from gradlens.errors import GradlensError
from gradlens.stats import core as stats
from gradlens.store import ModuleSpec, open_run
from tests.helpers.stats import (
    LAGS,
    SPECS,
    assert_row,
    random_grads,
    ref_cos,
    reference_row,
    scope_members,
    stacked,
    write,
)

REQUIRED = ["run", "regime", "module", "proj", "layer", "steps", "cos_lag1_mean", "erank_traj", "erank_traj_unit",
            "erank_step_mean", "stable_rank_traj", "sign_stability_mean", "sign_stable_frac_0.8", "sign_null_mean"]
FIGURES = ["lag_cosine.png", "cosine_series.png", "erank_traj.png", "sign_hist.png", "heatmap.png"]


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    from gradlens.training import record

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
    assert f"wrote 16 files to {out}" in printed and "Note:" not in printed  # the same modules in both runs

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
    run = open_run(toy_runs["grpo"])
    ref = [run.step_vector(s).astype(np.float64) for s in range(1, 9)]
    want = [ref_cos(a, b) for a, b in zip(ref, ref[1:], strict=False)]
    np.testing.assert_allclose(adapter_lag1, want, rtol=1e-10)
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


# --------------------------------------------------------------------------------------------------------------------
# Steps with an exactly zero gradient (a GRPO step whose groups all had equal rewards)


def _enumerated_null(counts: np.ndarray, bins: int) -> tuple[float, dict[float, float], np.ndarray]:
    """The random-sign null of entries with ``counts`` non-zero steps, by enumerating every sign sequence in numpy:
    (mean over entries of E|S_n|/n, mean share above 0.5 and 0.8, mean histogram on ``bins`` equal bins)."""
    per_n = {}
    for n in np.unique(counts[counts > 0]):
        walks = np.abs(np.array(list(itertools.product((-1.0, 1.0), repeat=int(n)))).sum(axis=1)) / n
        per_n[int(n)] = (walks.mean(), {t: (walks > t).mean() for t in (0.5, 0.8)},
                         np.histogram(walks, bins=np.linspace(0, 1, bins + 1))[0] / len(walks))
    live = counts[counts > 0].astype(int)
    return (float(np.mean([per_n[n][0] for n in live])),
            {t: float(np.mean([per_n[n][1][t] for n in live])) for t in (0.5, 0.8)},
            np.mean([per_n[n][2] for n in live], axis=0))


def test_half_zero_grpo_run_is_at_chance_over_its_effective_steps(tmp_path):
    """2 effective steps of 4: each entry's null is that of 2 signs (0.5), not of 4 (0.375, the old result)."""
    spec = [ModuleSpec.from_name("model.layers.0.mlp.down_proj", (64, 8))]
    rng = np.random.default_rng(14)
    live = [[rng.standard_normal((64, 8)).astype(np.float32)] for _ in range(2)]
    zero = [np.zeros((64, 8), np.float32)]
    rs = analyze_run(write(tmp_path / "grpo", [1, 2, 3, 4], [live[0], zero, live[1], zero], specs=spec,
                           regime="grpo"), lags=2)
    row = rs.adapter.row
    assert row["sign_null_mean"] == pytest.approx(0.5, rel=1e-12)
    assert rs.zero_steps == [2, 4] and rs.excluded == [] and row["steps"] == 4 and row["nonzero_steps"] == 2
    agree = np.sign(live[0][0]) == np.sign(live[1][0])  # stability 1 where the two signs agree, else 0
    assert row["sign_stability_mean"] == pytest.approx(agree.mean(), rel=1e-12)
    assert row["sign_stable_frac_0.8"] == pytest.approx(agree.mean(), rel=1e-12)
    assert row["sign_null_frac_0.8"] == pytest.approx(0.5, rel=1e-12)
    assert row["cos_lag1_mean"] != row["cos_lag1_mean"]  # every lag-1 pair has a zero step: NaN, not 0


def test_zero_gradient_steps_leave_sign_stability_and_its_null_unbiased(tmp_path):
    """A GRPO-like run with all-zero steps: every sign statistic uses each entry's own non-zero steps, equals the
    same run without those steps, and its null equals the enumerated numpy one."""
    T, zero = 7, (1, 4, 5)
    grads = random_grads(T, seed=12)  # 10% of entries exactly zero at each step as well
    for t in zero:
        grads[t] = [np.zeros(s.shape, np.float32) for s in SPECS]
    rs = analyze_run(write(tmp_path / "grpo", list(range(T)), grads, regime="grpo"), lags=LAGS, window=4)
    counts = np.concatenate([(stacked(grads, i) != 0).sum(axis=0).ravel() for i in range(len(SPECS))])
    assert rs.adapter.row["sign_null_mean"] == pytest.approx(_enumerated_null(counts, rs.bins)[0], rel=1e-12)
    assert rs.zero_steps == list(zero) and rs.excluded == [] and rs.steps == list(range(T))
    kept = [g for t, g in enumerate(grads) if t not in zero]
    alone = analyze_run(write(tmp_path / "effective", list(range(len(kept))), kept), lags=LAGS)
    sign_keys = [k for k in stat_columns(LAGS) if k.startswith("sign_")]
    for sc, other in zip(rs.scopes, alone.scopes, strict=True):
        members = scope_members(sc.scope, sc.name)
        assert_row(sc.row, reference_row([stacked(grads, i) for i in members]))
        assert sc.row["steps"] == T and sc.row["nonzero_steps"] == T - len(zero)
        for key in sign_keys:
            assert sc.row[key] == pytest.approx(other.row[key], rel=1e-12), (sc.name, key)
        np.testing.assert_array_equal(sc.hist, other.hist)
        counts = np.concatenate([(stacked(grads, i) != 0).sum(axis=0).ravel() for i in members])
        mean, share, hist = _enumerated_null(counts, rs.bins)
        assert sc.row["sign_null_mean"] == pytest.approx(mean, rel=1e-12)
        for t in (0.5, 0.8):
            assert sc.row[f"sign_null_frac_{t}"] == pytest.approx(share[t], rel=1e-12, abs=1e-15)
        np.testing.assert_allclose(sc.null_hist, hist, rtol=1e-12, atol=1e-15)
        first = [stacked(grads[:4], i) for i in members]  # the window: steps 0..3, two of them zero
        assert_row(sc.window_row, reference_row(first))
    assert rs.adapter.row["sign_null_mean"] > stats.sign_null_mean(T) * 1.2  # the old null, of all 7 steps


# --------------------------------------------------------------------------------------------------------------------
# A run without raw shards (save_raw=False): what the accumulators allow


def test_run_without_raw_shards_gets_what_its_accumulators_allow(tmp_path):
    T, W = 9, 5
    grads = random_grads(T, seed=13)
    grads[3] = [np.zeros(s.shape, np.float32) for s in SPECS]  # a zero step
    grads[6] = [g.copy() for g in grads[6]]
    grads[6][2][0, 0] = np.nan  # a non-finite step: flagged by the writer, left out of the accumulators
    clip = [1.0, 0.5, 1.0, 1.0, 0.25, 1.0, 1.0, 0.8, 1.0]
    steps = [2 * t for t in range(T)]
    path = write(tmp_path / "probe", steps, grads, clip=clip, save_raw=False)
    rs = analyze_run(path, lags=LAGS, window=W)
    keep = [t for t in range(T) if t != 6]
    clean = [grads[t] for t in keep]
    assert rs.source == ACC_SOURCE and rs.excluded == [12] and rs.zero_steps == [6]
    assert rs.steps == [steps[t] for t in keep] and rs.window == W
    raw_only = ["cos_lag2_mean", "cos_lag3_mean", "cos_lag4_mean", "cos_to_mean_mean", "erank_traj",
                "erank_traj_unit", "stable_rank_traj", "stable_rank_traj_unit", "energy90_traj", "energy90_traj_unit",
                "erank_step_mean", "stable_rank_step_mean", "energy90_step_mean"]
    assert rs.unavailable == raw_only
    assert set(rs.window_unavailable) == {*raw_only, *(k for k in stat_columns(LAGS) if k.startswith("sign_"))}
    for sc in rs.scopes:
        members = scope_members(sc.scope, sc.name)
        ref = reference_row([stacked(clean, i) for i in members])
        want = {k: (math.nan if k in raw_only else v) for k, v in ref.items()}
        assert_row(sc.row, want, rtol=1e-10)
        v = np.concatenate([stacked(clean, i).reshape(len(keep), -1) for i in members], axis=1)
        np.testing.assert_allclose(sc.series["grad_norm"], np.linalg.norm(v, axis=1), rtol=1e-12)
        np.testing.assert_allclose(sc.series["cos_lag1"], [ref_cos(v[t], v[t + 1]) for t in range(len(keep) - 1)],
                                   rtol=1e-10)
        assert set(sc.series) == {"cos_lag1", "grad_norm"}
        ref_w = reference_row([stacked(clean[:W], i) for i in members])
        assert sc.window_row["steps"] == W and sc.window_row["nonzero_steps"] == ref_w["nonzero_steps"]
        assert sc.window_row["cos_lag1_mean"] == pytest.approx(ref_w["cos_lag1_mean"], rel=1e-10)
        assert all(math.isnan(sc.window_row[k]) for k in rs.window_unavailable)
        assert sc.hist.sum() == ref["sign_entries"]
    # The same gradients with raw shards give the same values wherever the accumulators have them.
    raw = analyze_run(write(tmp_path / "raw", steps, grads, clip=clip), lags=LAGS, window=W)
    for a, b in zip(rs.scopes, raw.scopes, strict=True):
        for key in (k for k in stat_columns(LAGS) if k not in raw_only):
            assert a.row[key] == pytest.approx(b.row[key], rel=1e-10), (a.name, key)
        np.testing.assert_allclose(a.null_hist, b.null_hist, rtol=1e-12)
    # unclip: the norms are those of stored / clip_coef, the cosines do not change.
    unclipped = analyze_run(path, lags=LAGS, unclip=True).adapter
    scale = np.array([1 / clip[t] for t in keep])
    np.testing.assert_allclose(unclipped.series["grad_norm"], rs.adapter.series["grad_norm"] * scale, rtol=1e-12)
    np.testing.assert_allclose(unclipped.series["cos_lag1"], rs.adapter.series["cos_lag1"], rtol=1e-12)


# --------------------------------------------------------------------------------------------------------------------
# Synthetic runs: zero-gradient steps, a run without raw shards, runs on different module sets


def test_zero_steps_probe_runs_and_module_sets_are_said_and_stored(tmp_path, capsys):
    grads = random_grads(6, seed=20)
    for t in (2, 3):
        grads[t] = [np.zeros(s.shape, np.float32) for s in SPECS]
    grpo = write(tmp_path / "grpo", list(range(1, 7)), grads, regime="grpo")
    probe = write(tmp_path / "probe", list(range(1, 7)), random_grads(6, seed=21), save_raw=False)
    fewer = write(tmp_path / "fewer", list(range(1, 7)), [g[:3] for g in random_grads(6, seed=22)], specs=SPECS[:3])
    out = tmp_path / "analysis"
    assert main(["analyze", str(grpo), str(probe), str(fewer), "--out", str(out), "--window", "4", "--lags", "3",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "grpo (grpo, T=6)" in printed
    assert ("2 of 6 step(s) had an exactly zero gradient (every GRPO group had equal rewards), so cosines and sign "
            "stability use the 4 others: 3 4") in printed
    assert "probe (sft, T=6): lag-1 cosine" in printed and "accumulators only (save_raw=False)" in printed
    assert "Note: the runs were recorded on different module sets" in printed
    assert "fewer 3 (0 not in every run)" in printed and "model.layers.1.self_attn.v_proj 5x2" in printed

    summary = pd.read_csv(out / "summary.csv").set_index("run")
    assert summary.loc["grpo", "zero_steps"] == 2 and json.loads(summary.loc["grpo", "zero_step_list"]) == [3, 4]
    assert summary.loc["grpo", "nonzero_steps"] == 4 and summary.loc["probe", "zero_steps"] == 0
    assert list(summary["source"]) == ["raw shards", "accumulators", "raw shards"]
    assert "need raw shards" in summary.loc["probe", "note"]
    assert math.isnan(summary.loc["probe", "erank_traj"]) and math.isnan(summary.loc["probe", "cos_lag2_mean"])
    assert math.isnan(summary.loc["probe", "sign_stability_mean_w4"])
    assert np.isfinite(summary.loc["probe", ["cos_lag1_mean", "sign_stability_mean", "sign_null_mean",
                                             "cos_lag1_mean_w4"]].to_numpy(float)).all()
    modules = pd.read_csv(out / "modules.csv")
    assert (modules.loc[modules["run"] == "grpo", "zero_steps"] == 2).all()
    prov = json.loads((out / "provenance.json").read_text())
    runs = {r["label"]: r for r in prov["runs"]}
    assert runs["grpo"]["zero_gradient_steps"] == [3, 4] and runs["probe"]["source"] == "accumulators"
    assert "erank_traj" in runs["probe"]["needs_raw_shards"] and runs["grpo"]["needs_raw_shards"] == []
    assert "sign_stability_mean" in runs["probe"]["window_needs_raw_shards"]
    assert [r["modules"] for r in prov["runs"]] == [4, 4, 3]
    assert len(prov["notes"]) == 1 and prov["notes"][0].startswith("Note: the runs were recorded on different")
    assert all((out / name).is_file() for name in FIGURES)  # drawn for the probe run too

    same = analyze_runs([grpo, probe], config=AnalyzeConfig(lags=2, progress=False))
    assert "Note:" not in same.findings and same.provenance["notes"] == []
