"""The notebooks in ``notebooks/``: saved without outputs, and each executes headless in the small setting.

Execution works on in-memory copies (nothing is written back into ``notebooks/``); every output goes to a temporary
``GRADLENS_OUT``. The notebooks run in file order with one shared output base, so 03 reuses 02's comparison.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

# Files each notebook must leave in GRADLENS_OUT/small/<name>.
EXPECTED = {
    "01_gradient_structure": ["sft/manifest.json", "grpo/manifest.json", "analysis/summary.csv",
                              "analysis/provenance.json", "analysis/lag_cosine.png", "analysis/cosine_series.png",
                              "analysis/erank_traj.png", "analysis/sign_hist.png", "analysis/heatmap.png",
                              "erank_step.png"],
    "02_placement": ["placement.csv", "summary.csv", "where.csv", "probes.csv", "curves.csv", "placement.png",
                     "provenance.json", "curves.png"],
    "03_where_entries_live": ["where.png", "jaccard.png", "overlap.csv"],
    "04_regime_diagnosis": ["phase.csv", "phase.json", "phase.png"],
}


def test_every_notebook_is_known_and_saved_without_outputs() -> None:
    import nbformat

    assert [p.stem for p in NOTEBOOKS] == sorted(EXPECTED)
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert nb.cells[0].cell_type == "markdown", path.name
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear the outputs"
        assert "/work/" not in path.read_text() and "/home/" not in path.read_text(), path.name


def test_settings_and_output_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from experiments.notebook_settings import figures_dir, output_dir, placement_config, repo_root, setting
    from gradlens.errors import GradlensError

    monkeypatch.delenv("GRADLENS_SETTING", raising=False)
    monkeypatch.delenv("GRADLENS_OUT", raising=False)
    monkeypatch.chdir(ROOT / "notebooks")
    assert setting() == "small" and figures_dir() is None and repo_root() == ROOT
    monkeypatch.setenv("GRADLENS_OUT", str(tmp_path))
    assert output_dir("x") == tmp_path / "small" / "x" and (tmp_path / "small" / "x").is_dir()
    monkeypatch.setenv("GRADLENS_SETTING", "FULL")
    assert setting() == "full" and output_dir("x") == tmp_path / "full" / "x"
    assert placement_config(tmp_path).model == "toy:small"
    monkeypatch.setenv("GRADLENS_SETTING", "huge")
    with pytest.raises(GradlensError, match="GRADLENS_SETTING"):
        setting()


@pytest.mark.slow
def test_record_or_load_reuses_a_matching_run_and_refuses_another(tmp_path: Path) -> None:
    from experiments.notebook_settings import record_or_load
    from gradlens.config import RecordConfig
    from gradlens.errors import GradlensError
    from gradlens.store import MANIFEST

    config = RecordConfig(regime="sft", out=str(tmp_path / "sft"), max_steps=2, trl={"per_device_train_batch_size": 4})
    assert record_or_load(config) == tmp_path / "sft"
    manifest = (tmp_path / "sft" / MANIFEST).read_bytes()
    assert record_or_load(config) == tmp_path / "sft" and (tmp_path / "sft" / MANIFEST).read_bytes() == manifest
    with pytest.raises(GradlensError, match="other settings"):
        record_or_load(RecordConfig(regime="sft", out=str(tmp_path / "sft"), max_steps=3))


@pytest.fixture(scope="module")
def out_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("notebooks")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_in_the_small_setting(path: Path, out_base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("GRADLENS_SETTING", "small")
    monkeypatch.setenv("GRADLENS_OUT", str(out_base))
    # The toy models gain nothing from a second thread, and one thread per kernel keeps the time stable when other
    # processes share the cores (oversubscribed OpenMP threads slow these tiny runs several-fold).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = path.read_bytes()
    nb = nbformat.read(path, as_version=4)
    # Like `jupyter nbconvert --execute`: the kernel starts in notebooks/; a cell error raises CellExecutionError.
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    assert path.read_bytes() == before  # nothing written back

    out = out_base / "small" / path.stem
    missing = [f for f in EXPECTED[path.stem] if not (out / f).is_file()]
    assert not missing, f"{path.name} did not write {missing}"
    shown = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert shown, f"{path.name} displayed no figure"

    if path.stem == "01_gradient_structure":
        summary = pd.read_csv(out / "analysis" / "summary.csv")
        assert sorted(summary["regime"]) == ["grpo", "sft"] and (summary["steps"] == 12).all()
    elif path.stem == "02_placement":
        from experiments.notebook_settings import PLACEMENT

        p = PLACEMENT["small"]
        df = pd.read_csv(out / "placement.csv", dtype={"budget": str})
        per_regime = 1 + len(p["seeds"]) * (1 + len(p["methods"]) * len(p["budgets"]))
        assert len(df) == 2 * per_regime
        for regime in ("sft", "grpo"):
            sub = df[df["regime"] == regime]
            assert set(sub["method"]) == {"base", "full", *p["methods"]}
            assert sorted(sub[sub["method"] == "sign"]["seed"]) == p["seeds"]
        curves = pd.read_csv(out / "curves.csv")
        assert set(curves["step"]) == set(range(p["curve_every"], p["max_steps"] + 1, p["curve_every"]))
        assert json.loads((out / "provenance.json").read_text())["findings"]
    elif path.stem == "04_regime_diagnosis":
        from experiments.notebook_settings import PHASE

        p = PHASE["small"]
        phase = pd.read_csv(out / "phase.csv", dtype={"budget": str})
        assert len(phase) == 2 * len(p["budgets"]) and set(phase["regime"]) == {"sft", "grpo"}
        assert set(phase["n_probes"]) == {len(p["seeds"])} and phase["predicted_recovery"].notna().all()
        assert (phase["n_pairs"] + phase["n_excluded"] == len(p["seeds"])).all()
        agree = json.loads((out / "phase.json").read_text())["agreement"]
        assert {"wrong", "spearman_predicted_recovery"} <= set(agree)
    else:
        overlap = pd.read_csv(out / "overlap.csv")
        assert {"seeds", "selectors", "regimes"} <= set(overlap["relation"])
        assert overlap["jaccard"].between(0, 1).all()
