"""experiments.rivals: every measurement against an independent numpy computation on known inputs (Gaussian
references, a synthetic recorded run, a hand-made adapter, hand-made placement rows), and one end-to-end probe-to-run
recording on the tiny toy model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from experiments.rivals import (
    agreement,
    energy_count_share,
    gap_table,
    gaussian_step_erank,
    gaussian_traj_erank,
    persistence,
    rank_table,
    update_sparsity,
)
from gradlens.errors import GradlensError
from gradlens.modules import ModuleSpec
from gradlens.store import RunWriter, open_run

# Float64 spectra of O(1) float32 data through a Gram (eigvalsh) against a direct SVD: rounding far below 1e-8.
RTOL = 1e-8


def np_erank(s: np.ndarray) -> float:
    s = s[s > max(s.max(), 0) * 1e-12]
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def write_raw_run(path: Path, grads: list[np.ndarray], names: list[str], stats_only: bool = False) -> Path:
    """A run whose module i at step t holds ``grads[i][t]``."""
    specs = [ModuleSpec.from_name(n, g.shape[1:]) for n, g in zip(names, grads, strict=True)]
    with RunWriter(path, specs, save_raw=not stats_only) as w:
        for t in range(len(grads[0])):
            w.add_step(t + 1, [g[t].astype(np.float32) for g in grads], {"loss": 1.0})
    return path


def test_gaussian_references_match_a_direct_svd() -> None:
    draws = 5
    got = gaussian_step_erank((40, 6), draws, np.random.default_rng(3))
    x = np.random.default_rng(3).standard_normal((draws, 40, 6))
    want = np.mean([np_erank(np.linalg.svd(m, compute_uv=False)) for m in x])
    assert got == pytest.approx(want, rel=RTOL)
    assert 5 < got < 6  # a tall Gaussian matrix is close to full rank

    norms = np.array([4.0, 2.0, 1.0, 0.5, 0.0, 0.25])  # a zero step is left out, as analyze leaves it out
    got = gaussian_traj_erank(norms, 300, 2, np.random.default_rng(5))
    rng = np.random.default_rng(5)
    raw, unit = [], []
    for _ in range(2):
        x = rng.standard_normal((5, 300))
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        raw.append(np_erank(np.linalg.svd(u * norms[norms > 0][:, None], compute_uv=False)))
        unit.append(np_erank(np.linalg.svd(u, compute_uv=False)))
    assert got["erank_traj"] == pytest.approx(np.mean(raw), rel=RTOL)
    assert got["erank_traj_unit"] == pytest.approx(np.mean(unit), rel=RTOL)
    assert got["erank_traj"] < got["erank_traj_unit"] <= 5  # decaying norms lower the raw rank, not the unit one


def test_rank_table_against_numpy_on_a_structured_run(tmp_path: Path) -> None:
    from gradlens.analysis.driver import analyze_run

    rng = np.random.default_rng(0)
    t, d, r = 12, 32, 4
    direction = rng.standard_normal((d, r))
    rank1 = np.stack([np.outer(rng.standard_normal(d), rng.standard_normal(r)) for _ in range(t)])  # rank-1 steps
    same = np.stack([(1 + 0.01 * k) * direction + 0.01 * rng.standard_normal((d, r)) for k in range(t)])  # ~1 dir.
    names = ["model.layers.0.self_attn.v_proj", "model.layers.0.mlp.down_proj"]
    run = write_raw_run(tmp_path / "run", [rank1, same], names)
    table = rank_table(analyze_run(run, lags=1), draws=4, seed=1)
    v = table[table["name"] == "v"].iloc[0]
    down = table[table["name"] == "down"].iloc[0]
    f32 = [g.astype(np.float32).astype(np.float64) for g in (rank1, same)]
    assert v["erank_step"] == pytest.approx(1.0, rel=1e-6)  # rank-1 steps, far below a Gaussian's ~r
    assert v["erank_step_gaussian"] > 3 and v["erank_step_ratio"] < 0.4
    want_step = np.mean([np_erank(np.linalg.svd(m, compute_uv=False)) for m in f32[1]])
    assert down["erank_step"] == pytest.approx(want_step, rel=RTOL)
    want_traj = np_erank(np.linalg.svd(f32[1].reshape(t, -1), compute_uv=False))
    assert down["erank_traj"] == pytest.approx(want_traj, rel=RTOL) and down["erank_traj"] < 1.5
    assert down["erank_traj_ratio"] < 0.2
    assert down["erank_traj_unit_gaussian"] > 10  # 12 random directions in 128 dimensions
    adapter = table[table["scope"] == "adapter"].iloc[0]
    both = np.concatenate([g.reshape(t, -1) for g in f32], axis=1)
    assert adapter["erank_traj"] == pytest.approx(np_erank(np.linalg.svd(both, compute_uv=False)), rel=RTOL)
    assert adapter["erank_step_gaussian"] == pytest.approx(
        np.mean(table[table["scope"] == "proj"]["erank_step_gaussian"]), rel=RTOL)  # same shapes: one reference
    assert adapter["rank_cap"] == r


def save_adapter(path: Path, b: dict[str, np.ndarray]) -> Path:
    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    tensors = {f"base_model.model.{n}.lora_B.weight": w.astype(np.float32) for n, w in b.items()}
    tensors |= {f"base_model.model.{n}.lora_A.weight": np.ones((w.shape[1], 3), np.float32) for n, w in b.items()}
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def test_update_sparsity_against_numpy(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    v = rng.standard_normal((20, 4)) * 1e-3
    v[rng.random(v.shape) < 0.5] = 0.0  # half the entries never moved
    down = np.zeros((30, 4))
    down[0, 0] = 1.0  # one entry carries the whole update
    path = save_adapter(tmp_path / "adapter", {"model.layers.0.self_attn.v_proj": v,
                                               "model.layers.0.mlp.down_proj": down})
    table = update_sparsity(path, tolerances=(1e-5, 1e-3)).set_index("group")
    v32 = v.astype(np.float32)
    assert table.at["v", "moved_1e-05"] == pytest.approx(float((np.abs(v32) > 1e-5).mean()))
    assert table.at["v", "moved_0.001"] == pytest.approx(float((np.abs(v32) > 1e-3).mean()))
    assert table.at["down", "energy90_share"] == pytest.approx(1 / down.size)
    assert table.at["adapter", "entries"] == v.size + down.size
    assert table.at["adapter", "moved_1e-05"] == pytest.approx(
        (int((np.abs(v32) > 1e-5).sum()) + 1) / (v.size + down.size))
    with pytest.raises(GradlensError, match="not a saved adapter"):
        update_sparsity(tmp_path)


def test_energy_count_share_brute_force() -> None:
    x = np.random.default_rng(2).standard_normal(501)
    e = np.sort(x**2)[::-1]
    want = next(k for k in range(1, e.size + 1) if e[:k].sum() >= 0.9 * e.sum()) / e.size
    assert energy_count_share(x) == pytest.approx(want)
    assert math.isnan(energy_count_share(np.zeros(3)))
    assert energy_count_share(np.random.default_rng(0).standard_normal(200_000)) == pytest.approx(0.45, abs=0.01)


def np_sign_topk(g: np.ndarray, k: int) -> set[int]:
    """The documented sign score (consistency, ties by |sum| scaled into half a level), top-k by numpy."""
    t = len(g)
    s = np.abs(g.sum(0))
    score = np.abs(np.sign(g).sum(0)) / t + 0.5 / t * s / s.max()
    return set(np.argsort(-score, kind="stable")[:k].tolist())


def test_persistence_against_numpy(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    n, t = 400, 30
    g = rng.standard_normal((t, n)) + np.where(np.arange(n) < 40, 1.5, 0.0)  # 40 entries with a drift
    names = ["model.layers.0.mlp.down_proj"]
    probe = write_raw_run(tmp_path / "probe", [g[:8].reshape(8, 100, 4)], names, stats_only=True)
    full = write_raw_run(tmp_path / "full", [g.reshape(t, 100, 4)], names, stats_only=True)
    pr, fr = open_run(probe), open_run(full)
    shapes = {s.name: tuple(s.shape) for s in fr.specs}
    table = persistence(pr.accumulators(), fr.accumulators(), shapes, ["10%", "k=40"]).set_index("budget")
    g32 = g.astype(np.float32).astype(np.float64)
    for budget, k in (("10%", 40), ("k=40", 40)):
        a, b = np_sign_topk(g32[:8], k), np_sign_topk(g32, k)
        assert table.at[budget, "shared"] == len(a & b)
        assert table.at[budget, "jaccard"] == pytest.approx(len(a & b) / len(a | b))
    assert table.at["10%", "share"] > 3 * table.at["10%", "share_chance"]  # the drifting entries persist
    same = persistence(fr.accumulators(), fr.accumulators(), shapes, ["5%"]).iloc[0]
    assert same["jaccard"] == 1.0 and same["share"] == 1.0


def placement_rows() -> pd.DataFrame:
    rows = [("sft", "base", "", 0, 0.4, False)]
    accs = {0: (0.9, 0.8, 0.6), 1: (0.8, 0.7, 0.7), 2: (1.0, 0.9, 0.5), 3: (0.9, 0.85, 0.1)}  # full, sign, random
    for seed, (full, sign, rnd) in accs.items():
        rows += [("sft", "full", "", seed, full, False), ("sft", "sign", "1%", seed, sign, False),
                 ("sft", "random", "1%", seed, rnd, seed == 3)]  # seed 3's random run diverged
    df = pd.DataFrame(rows, columns=["regime", "method", "budget", "seed", "accuracy", "diverged"])
    return df.assign(k=[None if m in ("base", "full") else 10 for m in df["method"]])


def test_gap_table_pairs_per_seed_and_leaves_out_diverged_runs() -> None:
    from scipy import stats

    table = gap_table(placement_rows()).iloc[0]
    share = {s: ((sign - 0.4) / (full - 0.4), (rnd - 0.4) / (full - 0.4))
             for s, (full, sign, rnd) in {0: (0.9, 0.8, 0.6), 1: (0.8, 0.7, 0.7), 2: (1.0, 0.9, 0.5)}.items()}
    diffs = np.array([a - b for a, b in share.values()])
    half = stats.t.ppf(0.975, 2) * diffs.std(ddof=1) / math.sqrt(3)
    assert table["n_pairs"] == 3 and table["n_excluded"] == 1
    assert table["gap"] == pytest.approx(diffs.mean()) and table["gap_lo"] == pytest.approx(diffs.mean() - half)
    want = np.mean([b for _, b in share.values()]) / np.mean([a for a, _ in share.values()])
    assert table["measured_recovery"] == pytest.approx(want)


def test_agreement_rank_correlation_and_wrong_cells() -> None:
    measured = np.array([0.9, 0.2, 0.6, 0.95, 0.1])
    predicted = np.array([0.8, 0.3, 0.4, 0.7, 0.05])  # the third cell is on the other side of 0.5
    cells = pd.DataFrame({"cell": "c", "regime": ["sft"] * 5, "budget": list("abcde"), "gap": 0.0, "gap_lo": 0.0,
                          "gap_hi": 0.0, "measured_recovery": measured, "predicted_recovery": predicted,
                          "predicted_recovery_run": predicted})
    out = agreement(cells)
    rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731 (no ties)
    assert out["spearman_predicted_recovery"]["rho"] == pytest.approx(np.corrcoef(rank(measured),
                                                                                   rank(predicted))[0, 1])
    assert [w["budget"] for w in out["wrong"]] == ["c"]


@pytest.mark.slow
def test_record_like_probe_records_the_run_the_probe_was_for(tmp_path: Path) -> None:
    from experiments.rivals import record_like_probe
    from gradlens.config import ProbeConfig
    from gradlens.placement.probe import probe

    cfg = ProbeConfig(regime="sft", out=str(tmp_path / "probe"), max_steps=2, train_steps=4, learning_rate=5e-3,
                      seed=3, methods=["sign"], trl={"per_device_train_batch_size": 4})
    probe(cfg, progress=False)
    run = open_run(record_like_probe(tmp_path / "probe", tmp_path / "run"))
    assert len(run.steps) == 4 and run.meta["seed"] == 3 and run.meta.get("save_raw", True)
    assert run.meta["config"]["record"]["learning_rate"] == 5e-3
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    first_probe = open_run(tmp_path / "probe" / "run").accumulators()
    assert set(first_probe.modules) == set(run.accumulators().modules)
    probe(ProbeConfig(regime="sft", out=str(tmp_path / "p2"), max_steps=2, methods=["sign"],
                      trl={"per_device_train_batch_size": 4}), progress=False)
    with pytest.raises(GradlensError, match="train_steps"):
        record_like_probe(tmp_path / "p2", tmp_path / "run2")


def test_grown_grid_keeps_the_runs_at_the_rate_the_grown_sweep_picks(tmp_path: Path, load_script) -> None:
    """scripts/findings_tables.py --grown_grid: a cell resumed with a larger grid holds random at its old rate (0.3)
    and its new one (1.0, seeds 0-1 only); the table must pair sign (tie in the sweep: the smaller rate) with random
    at 1.0 on seeds 0-1, checked against the shares computed by hand."""
    tables = load_script("scripts/findings_tables.py")

    def row(method: str, budget: str, seed: int, lr: float, acc: float) -> dict:
        return {"regime": "sft", "method": method, "budget": budget, "seed": seed, "lr": lr, "accuracy": acc,
                "k": 10 if budget else None, "diverged": False}

    full = {0: 0.9, 1: 0.8, 2: 1.0}
    runs = [row("base", "", 0, 0.0, 0.3), *(row("full", "", s, 0.01, a) for s, a in full.items()),
            *(row("random", "1%", s, 0.3, 0.5) for s in range(3)), row("random", "1%", 0, 1.0, 0.7),
            row("random", "1%", 1, 1.0, 0.6), *(row("sign", "1%", s, 0.3, a) for s, a in enumerate([0.8, 0.7, 0.9]))]
    sweep = [row("full", "", 1000, 0.01, 0.9), row("random", "1%", 1000, 0.3, 0.4),
             row("random", "1%", 1000, 1.0, 0.6), row("sign", "1%", 1000, 0.3, 0.8), row("sign", "1%", 1000, 1.0, 0.8)]
    cell = tmp_path / "cell"
    cell.mkdir()
    pd.DataFrame(runs).to_csv(cell / "placement.csv", index=False)
    pd.DataFrame(sweep).to_csv(cell / "sweep.csv", index=False)
    [line] = tables.grown_grid(cell)
    shares = {m: [(a - 0.3) / (full[s] - 0.3) for s, a in enumerate(accs)]
              for m, accs in {"sign": [0.8, 0.7], "random": [0.7, 0.6]}.items()}
    gap = np.mean(np.subtract(shares["sign"], shares["random"]))
    cols = [c.strip() for c in line.strip("|").split("|")]
    assert cols[3] == "0.650 (1)" and cols[4] == "0.750 (0.3)"
    assert cols[5].startswith("+0.100") and cols[5].endswith("(2)")
    assert cols[6].startswith(f"{gap:+.3f}")


def test_phase_results_bundle_holds_every_cell_table_as_written(tmp_path: Path) -> None:
    """experiments.bundle (scripts/phase_diagram.py --results): phase.json and each cell's provenance and tables in
    one JSON, rows equal to the CSVs (budgets stay strings such as "0.1%"); a missing provenance is named in one
    line."""
    from experiments.bundle import phase_bundle

    (tmp_path / "phase.json").write_text(json.dumps({"config": {"seeds": [0]}, "rows": []}))
    cell = tmp_path / "toy-math-60steps-sft"
    cell.mkdir()
    (cell / "provenance.json").write_text(json.dumps({"versions": {"torch": "x"}}))
    tables = {"summary": [{"method": "random", "budget": "0.1%", "accuracy_mean": 0.28}],
              "paired": [{"budget": "10%", "diff_mean": 0.008}],
              "sweep": [{"method": "sign", "budget": "1%", "lr": 0.1, "accuracy": 0.39}],
              "placement": [{"method": "full", "budget": None, "seed": 2, "accuracy": 0.365}]}
    for name, rows in tables.items():
        pd.DataFrame(rows).to_csv(cell / f"{name}.csv", index=False)
    bundle = phase_bundle(tmp_path)
    assert bundle["phase"]["config"] == {"seeds": [0]}
    got = bundle["cells"]["toy-math-60steps-sft"]
    assert got["provenance"] == {"versions": {"torch": "x"}}
    for name, rows in tables.items():
        assert got[name] == rows, name
    (cell / "provenance.json").unlink()
    with pytest.raises(GradlensError, match="provenance.json"):
        phase_bundle(tmp_path)
