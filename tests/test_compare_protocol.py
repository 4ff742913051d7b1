"""The comparison protocol: paired differences and shares of the full-LoRA gain against independent computations on
a hand-made placement table, the edge-of-grid extension of the rate sweep, and divergence marking on a real
compare whose outcome is forced (a rate that must wreck the model)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from gradlens.compare.protocol import sweep_rates
from gradlens.compare.tables import paired_differences, summarize


def _t_ci(x: np.ndarray) -> tuple[float, float, float]:
    """Independent reference: mean and 95% t-interval by the textbook formula."""
    m, se = float(np.mean(x)), float(np.std(x, ddof=1) / math.sqrt(len(x)))
    q = stats.t.ppf(0.975, len(x) - 1)
    return m, m - q * se, m + q * se


@pytest.fixture
def table() -> pd.DataFrame:
    rng = np.random.default_rng(7)
    rows = [{"regime": "grpo", "method": "base", "budget": "", "seed": 0, "lr": 0.0, "steps": 0, "k": None,
             "accuracy": 0.30, "sampled_accuracy": 0.3, "diverged": False}]
    for seed in range(5):
        full = 0.70 + 0.02 * rng.standard_normal()
        rows.append({"regime": "grpo", "method": "full", "budget": "", "seed": seed, "lr": 1e-3, "steps": 10,
                     "k": None, "accuracy": full, "sampled_accuracy": full, "diverged": False})
        for method, level in (("random", 0.40), ("sign", 0.62), ("fisher", 0.55), ("random_matched", 0.45)):
            acc = level + 0.03 * rng.standard_normal()
            diverged = method == "fisher" and seed == 3  # one diverged run: left out of means and pairs
            rows.append({"regime": "grpo", "method": method, "budget": "1%", "seed": seed, "lr": 0.1, "steps": 10,
                         "k": 50, "accuracy": 0.05 if diverged else acc, "sampled_accuracy": acc,
                         "diverged": diverged})
    return pd.DataFrame(rows)


def test_paired_differences_match_a_per_seed_computation(table: pd.DataFrame) -> None:
    paired = paired_differences(table).set_index("method")
    acc = table.pivot_table(index="seed", columns="method", values="accuracy")
    want = _t_ci((acc["sign"] - acc["random"]).to_numpy())
    got = paired.loc["sign"]
    assert (got.n_pairs, got.n_excluded) == (5, 0)
    assert (got.diff_mean, got.ci95_lo, got.ci95_hi) == pytest.approx(want, rel=1e-12)
    keep = [0, 1, 2, 4]  # seed 3 of fisher diverged
    want = _t_ci((acc["fisher"] - acc["random"]).loc[keep].to_numpy())
    got = paired.loc["fisher"]
    assert (got.n_pairs, got.n_excluded) == (4, 1)
    assert (got.diff_mean, got.ci95_lo, got.ci95_hi) == pytest.approx(want, rel=1e-12)
    # the control random_matched is paired with random too; random is never paired with itself
    want = _t_ci((acc["random_matched"] - acc["random"]).to_numpy())
    got = paired.loc["random_matched"]
    assert (got.diff_mean, got.ci95_lo, got.ci95_hi) == pytest.approx(want, rel=1e-12)
    assert set(paired.index) == {"sign", "fisher", "random_matched"}
    # paired: the interval of the per-seed differences is narrower here than the unpaired one would be
    assert paired.loc["sign"].ci95_hi - paired.loc["sign"].ci95_lo > 0


def test_summary_leaves_diverged_runs_out_and_gives_the_gain_share_per_seed(table: pd.DataFrame) -> None:
    summary = summarize(table).set_index("method")
    fisher = table[(table.method == "fisher") & ~table.diverged]
    assert summary.loc["fisher"].n_diverged == 1 and summary.loc["fisher"].n_seeds == 4
    assert summary.loc["fisher"].accuracy_mean == pytest.approx(fisher.accuracy.mean(), rel=1e-12)
    full = table[table.method == "full"].set_index("seed").accuracy
    shares = [(r.accuracy - 0.30) / (full[r.seed] - 0.30) for r in table[table.method == "sign"].itertuples()]
    got = summary.loc["sign"]
    assert (got.gain_recovered, got.gain_recovered_lo, got.gain_recovered_hi) == pytest.approx(
        _t_ci(np.array(shares)), rel=1e-12)
    assert summary.loc["full"].gain_recovered == 1.0 and summary.loc["base"].gain_recovered == 0.0


def test_sweep_extends_the_grid_at_its_edge_and_says_so() -> None:
    peak = 0.9  # a score that peaks above the grid: the top rate wins until the grid reaches the peak

    def score(lr: float) -> float:
        return -abs(math.log(lr / peak))

    best, notes = sweep_rates([0.01, 0.03, 0.1], score, extensions=3)
    assert best == pytest.approx(0.9) and len(notes) == 3  # 0.1 -> 0.3 -> 0.9 -> 2.7 (worse): 0.9 is interior
    assert [n.rsplit(" ", 1)[-1] for n in notes] == ["0.3", "0.9", "2.7"]
    best, notes = sweep_rates([0.01, 0.03, 0.1], score, extensions=1)
    assert best == pytest.approx(0.3) and "still sits at the top" in notes[-1]
    best, notes = sweep_rates([0.01, 0.03, 0.1], score, extensions=0)
    assert best == 0.1 and notes == ["best rate 0.1 still sits at the top of the grid 0.01, 0.03, 0.1"]
    best, notes = sweep_rates([1.0, 3.0], lambda lr: -lr, extensions=1)  # the bottom edge: extended downwards
    assert best == pytest.approx(1 / 3, rel=1e-2) and "bottom" in notes[0]
    best, notes = sweep_rates([1.0, 3.0], lambda lr: -math.inf, extensions=2)  # every rate diverged
    assert best == 1.0 and notes == ["every swept rate diverged; using the smallest, 1"]
    best, notes = sweep_rates([0.1, 0.3, 1.0], lambda lr: -abs(lr - 0.3), extensions=2)  # interior: no extension
    assert best == 0.3 and notes == []


@pytest.mark.slow
def test_a_rate_that_must_diverge_is_marked_and_not_averaged(tmp_path) -> None:
    from gradlens.compare import compare
    from gradlens.config import CompareConfig

    config = CompareConfig(out=str(tmp_path / "c"), model="toy:tiny", regimes=["sft"], methods=["random"],
                           budgets=["10%"], seeds=[0], sweep_seeds=[5], max_steps=3, probe_steps=2, full_lrs=[2e-3],
                           sparse_lrs=[1e-2, 1e4], grid_extensions=0, n_val=20, n_eval=20, eval_samples=0,
                           export=False, progress=False, trl={"per_device_train_batch_size": 8})
    result = compare(config)
    sweep = result.sweep.set_index("lr")
    assert bool(sweep.loc[1e4, "diverged"]) and not bool(sweep.loc[1e-2, "diverged"])
    row = result.placement[result.placement.method == "random"].iloc[0]
    assert row.lr == 1e-2  # the diverging rate is never chosen
    assert any("lr 10000 diverged" in n for n in result.findings.splitlines())
    # the yardstick of "diverged (accuracy below base)" on the validation prompts is printed, not only used
    val_base = [n for n in result.findings.splitlines() if "base model's accuracy on the validation prompts" in n]
    assert len(val_base) == 1 and 0.0 <= float(val_base[0].rsplit(" ", 1)[-1]) <= 1.0


@pytest.mark.slow
def test_resume_with_more_budgets_and_another_rate_uses_only_this_configuration(tmp_path) -> None:
    from dataclasses import replace

    from gradlens.compare import compare
    from gradlens.config import CompareConfig

    first = CompareConfig(out=str(tmp_path / "c"), model="toy:tiny", regimes=["sft"], methods=["sign"],
                          budgets=["10%"], seeds=[0], sweep_seeds=[5], max_steps=3, probe_steps=2, full_lrs=[2e-3],
                          sparse_lrs=[1e-2], grid_extensions=0, n_val=20, n_eval=20, eval_samples=0, export=False,
                          progress=False, trl={"per_device_train_batch_size": 8})
    compare(first)
    # More budgets than the saved probe has masks for, and another rate: the probe runs again (it is seeded), and
    # the tables hold only the runs of this configuration, not the first one's run at 1e-2 as well.
    result = compare(replace(first, budgets=["10%", "30%"], sparse_lrs=[3e-2], resume=True))
    sign = result.placement[result.placement.method == "sign"]
    assert sorted(sign.budget) == ["10%", "30%"] and set(sign.lr) == {3e-2}
    on_disk = pd.read_csv(tmp_path / "c" / "placement.csv", dtype={"budget": str})
    assert len(on_disk[on_disk.method == "sign"]) == 2
    assert len(result.paired) and set(result.paired.budget) == {"10%", "30%"}
