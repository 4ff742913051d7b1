"""``gradlens.analysis.figures``: panels of a fixed size in inches with fixed margins (no layout engine), PNGs whose
metadata names the source runs, and figures for a run recorded without raw shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gradlens.analysis.analyze import analyze_runs
from gradlens.analysis.figures import FIGURES, MARGINS, make_figures, new_figure
from gradlens.config import AnalyzeConfig
from tests.helpers.stats import random_grads, write

DPI = 110  # what the figures are saved at
# Panel size (inches) and rows of each figure for two runs side by side.
PANELS = {"lag_cosine.png": (4.6, 3.4, 1), "cosine_series.png": (5.2, 3.4, 1), "erank_traj.png": (4.6, 3.4, 1),
          "sign_hist.png": (4.6, 3.4, 1), "heatmap.png": (4.2, 3.2, 2)}


@pytest.mark.parametrize(("rows", "cols", "width", "height"), [(1, 1, 4.6, 3.4), (1, 3, 5.2, 3.4), (2, 2, 4.2, 3.2)])
def test_new_figure_has_fixed_margins_in_inches(rows: int, cols: int, width: float, height: float) -> None:
    fig, axes = new_figure(rows, cols, width, height)
    w, h = fig.get_size_inches()
    assert (w, h) == pytest.approx((width * cols, height * rows)) and axes.shape == (rows, cols)
    first, last = axes[0, 0].get_position(), axes[-1, -1].get_position()
    assert first.x0 * w == pytest.approx(MARGINS["left"]) and (1 - last.x1) * w == pytest.approx(MARGINS["right"])
    assert (1 - first.y1) * h == pytest.approx(MARGINS["top"]) and last.y0 * h == pytest.approx(MARGINS["bottom"])
    boxes = [ax.get_position() for ax in axes.ravel()]
    assert all(a.x1 < b.x0 or a.y1 < b.y0 or b.x1 < a.x0 or b.y1 < a.y0
               for i, a in enumerate(boxes) for b in boxes[i + 1:])  # no two panels overlap


def test_pngs_have_the_panel_size_and_name_their_runs(tmp_path: Path) -> None:
    runs = [write(tmp_path / "sft", list(range(8)), random_grads(8, seed=1)),
            write(tmp_path / "grpo", list(range(8)), random_grads(8, seed=2), regime="grpo")]
    result = analyze_runs(runs, tmp_path / "out", AnalyzeConfig(lags=3, progress=False))
    assert sorted(p.name for p in result.files if p.suffix == ".png") == sorted(FIGURES) == sorted(PANELS)
    for name, (width, height, rows) in PANELS.items():
        with Image.open(tmp_path / "out" / name) as im:
            assert im.size == (round(2 * width * DPI), round(rows * height * DPI)), name
            assert json.loads(im.info["Source"]) == [{"path": str(p.resolve()), "seed": 7} for p in runs]
            assert json.loads(im.info["Description"])["config"] == result.provenance["config"]
            assert im.info["Software"] == f"gradlens {result.provenance['versions']['gradlens']}"


def test_a_run_without_raw_shards_still_gets_every_figure(tmp_path: Path) -> None:
    """Its trajectory erank is NaN (it needs the raw gradients): the panel says so instead of failing."""
    run = write(tmp_path / "probe", list(range(6)), random_grads(6, seed=3), save_raw=False)
    result = analyze_runs([run], config=AnalyzeConfig(lags=2, progress=False, figures=False))
    assert np.isnan(result.summary["erank_traj"].iloc[0])
    paths = make_figures(result, tmp_path)
    assert [p.name for p in paths] == list(FIGURES) and all(p.stat().st_size > 0 for p in paths)


def test_worlds_spaces_figure_plots_the_committed_paired_differences(tmp_path: Path, load_script) -> None:
    """scripts/worlds_spaces_figure.py: every point is a sign - random difference exactly as the committed result
    files hold it (toy:small: both spaces and regimes; toy:math: B, both regimes), and the PNG names its sources."""
    root = Path(__file__).resolve().parents[1]
    script = load_script("scripts/worlds_spaces_figure.py")
    small = json.loads((root / "benchmarks/results/param_small.json").read_text())
    math_ = json.loads((root / "benchmarks/results/phase_math.json").read_text())
    df = script.points(small, math_).set_index(["world", "space", "regime", "budget"])
    for r in small["rows"]:
        got = df.loc[("toy:small", r["space"], r["regime"], r["budget"])]
        assert (got["diff"], got["lo"], got["hi"]) == (r["sign_minus_random"]["mean"], *r["sign_minus_random"]["ci95"])
    paired = [p for c in math_["cells"].values() for p in c["paired"] if p["method"] == "sign"]
    for p in paired:
        assert df.loc[("toy:math", p["space"], p["regime"], p["budget"]), "diff"] == p["diff_mean"]
    assert len(df) == len(small["rows"]) + len(paired)
    assert set(df.xs("toy:math", level="world").index.get_level_values("regime")) == {"sft", "grpo"}
    png = script.draw(df.reset_index(), tmp_path / "f.png")
    assert "param_small.json" in Image.open(png).info["Source"]
