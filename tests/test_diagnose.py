"""``gradlens diagnose``: its statistics against numpy on the raw gradients, its two extremes (a perfectly coherent
run, where random loses nothing, and a run whose signal sits in k entries, where random loses almost all), the
calibration of its no-signal null, its refusals and its CLI."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from gradlens.budget import Budget
from gradlens.errors import GradlensError
from gradlens.placement.diagnose import COLUMNS, diagnose, horizon_gain, null_moments, sign_flip_null
from gradlens.placement.selectors import select
from gradlens.store import ModuleSpec, RunWriter, open_run
from tests.helpers.cli import assert_one_line_error, gradlens_inproc

METHODS = ("sign", "sign_magnitude", "fisher")
# Float64 sums of O(1) float32 values over at most a few thousand terms: relative error far below 1e-10.
RTOL, ATOL = 1e-10, 1e-12


def specs_for(shapes: list[tuple[int, int]]) -> list[ModuleSpec]:
    return [ModuleSpec.from_name(f"model.layers.{i}.mlp.down_proj", s) for i, s in enumerate(shapes)]


def write_run(path: Path, grads: np.ndarray, shapes: list[tuple[int, int]]) -> Path:
    """A statistics-only run whose step t has the flat gradient ``grads[t]``, split into modules of ``shapes``."""
    ends = np.cumsum([d * r for d, r in shapes])[:-1]
    with RunWriter(path, specs_for(shapes), save_raw=False) as w:
        for t, flat in enumerate(grads):
            parts = np.split(flat.astype(np.float32), ends)
            w.add_step(t + 1, [p.reshape(s) for p, s in zip(parts, shapes, strict=True)], {"loss": 1.0})
    return path


def reference(g: np.ndarray, weights: np.ndarray) -> dict[str, float]:
    """The set statistics straight from the raw ``(T, N)`` gradients (finite steps only), by pairwise products, in
    float64 from the float32 values the run records."""
    g = g[np.isfinite(g).all(axis=1)].astype(np.float32).astype(np.float64)
    n = (g != 0).sum(0)
    q = np.einsum("ti,ti->i", g, g)
    cross = np.einsum("si,ti->i", g, g) - q  # sum over s != t of g_si g_ti
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(n * q > 0, np.abs(g.sum(0)) / np.sqrt(n * q), 0.0)
        drift = np.where((n > 1) & (q > 0), cross / ((n - 1) * q), 0.0)
    summed = g.sum(0)
    coherence = (weights * summed**2).sum() / (weights * q).sum()
    steps = int((np.linalg.norm(g, axis=1) > 0).sum())
    return {"drift": (weights * drift).sum() / weights.sum(), "snr": (weights * snr).sum() / weights.sum(),
            "coherence": coherence, "coherence_norm": (coherence - 1) / (steps - 1),
            "energy_share": (weights * summed**2).sum() / (summed**2).sum()}


def flat_mask(mask: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([m.ravel() for m in mask.values()]).astype(np.float64)


def informed_mask(run_dir: Path, method: str, budget: Budget) -> np.ndarray:
    run = open_run(run_dir)
    return flat_mask(select(method, budget, {s.name: s.shape for s in run.specs}, accumulators=run.accumulators()))


def random_weights(budget: Budget, shapes: list[tuple[int, int]]) -> np.ndarray:
    named = dict(zip((s.name for s in specs_for(shapes)), shapes, strict=True))
    counts = budget.counts(named)
    if isinstance(counts, int):
        return np.full(sum(d * r for d, r in shapes), counts / sum(d * r for d, r in shapes))
    return np.concatenate([np.full(d * r, counts[name] / (d * r)) for name, (d, r) in named.items()])


def mixed_grads(rng: np.random.Generator, t: int, n: int) -> np.ndarray:
    """Noise with a drift on a third of the entries, exact zeros, one all-zero step, one NaN step, one dead entry."""
    g = rng.standard_normal((t, n)) * rng.uniform(0.2, 3.0, n)
    g[:, : n // 3] += rng.choice([-1.0, 1.0], n // 3) * rng.uniform(0.3, 2.0, n // 3)
    g[rng.random((t, n)) < 0.15] = 0.0
    g[:, 5] = 0.0
    g[3] = 0.0
    g[6, 7] = np.nan
    return g


SHAPES = [(24, 4), (40, 4), (9, 2)]


@pytest.mark.parametrize("budget,scope", [("10%", "global"), ("7%", "per_module"), ("k=25", "global")])
def test_statistics_match_numpy_on_the_raw_gradients(tmp_path: Path, budget: str, scope: str) -> None:
    g = mixed_grads(np.random.default_rng(1), 14, sum(d * r for d, r in SHAPES))
    run_dir = write_run(tmp_path / "run", g, SHAPES)
    result = diagnose(run_dir, [budget], scope, train_steps=40)
    b = Budget.parse(budget, scope)
    assert result.steps == [s for s in range(1, 15) if s != 7] and result.zero_steps == [4]
    assert result.nonfinite_steps == [7]
    finite = g[np.isfinite(g).all(axis=1)].astype(np.float32).astype(np.float64)
    whole = reference(g, np.ones(g.shape[1]))
    sq = (finite**2).sum(1)
    cos = [finite[t] @ finite[t - 1] / np.sqrt(sq[t] * sq[t - 1]) for t in range(1, len(finite)) if sq[t] * sq[t - 1]]
    np.testing.assert_allclose([result.adapter[k] for k in ("drift", "snr", "coherence", "coherence_norm")],
                               [whole[k] for k in ("drift", "snr", "coherence", "coherence_norm")], RTOL, ATOL)
    np.testing.assert_allclose(result.adapter["lag1_cosine"], np.mean(cos), RTOL, ATOL)
    assert result.adapter["steps_with_gradient"] == 12 and result.adapter["entries_without_gradient"] == 1
    rand = reference(g, random_weights(b, SHAPES))
    assert [r["method"] for r in result.rows] == list(METHODS)
    for row in result.rows:
        top = reference(g, informed_mask(run_dir, row["method"], b))
        for stat in ("drift", "snr", "coherence", "coherence_norm", "energy_share"):
            np.testing.assert_allclose(row[f"{stat}_top"], top[stat], RTOL, ATOL, err_msg=f"{row['method']} {stat}")
            np.testing.assert_allclose(row[f"{stat}_random"], rand[stat], RTOL, ATOL, err_msg=f"random {stat}")
        np.testing.assert_allclose(row["recovery"], max(rand["drift"], 0) / top["drift"], RTOL)
        psi = [40 * d / (40 * d + 1 - d) for d in (max(rand["drift"], 0), top["drift"])]
        np.testing.assert_allclose(row["recovery_run"], psi[0] / psi[1], RTOL)
        assert row["k"] == int(informed_mask(run_dir, row["method"], b).sum()) and set(row) == set(COLUMNS)


@pytest.mark.parametrize("budget,scope", [("5%", "global"), ("5%", "per_module")])
def test_random_values_are_what_the_random_selector_draws_on_average(tmp_path: Path, budget: str, scope: str) -> None:
    g = mixed_grads(np.random.default_rng(2), 10, sum(d * r for d, r in SHAPES))
    run_dir = write_run(tmp_path / "run", g, SHAPES)
    row = diagnose(run_dir, [budget], scope, methods=["fisher"]).rows[0]
    shapes = {s.name: s.shape for s in open_run(run_dir).specs}
    draws = np.array([[reference(g, flat_mask(select("random", Budget.parse(budget, scope), shapes, seed=s)))[k]
                       for k in ("drift", "snr", "energy_share")] for s in range(300)])
    se = draws.std(0, ddof=1) / np.sqrt(len(draws))
    np.testing.assert_array_less(np.abs(draws.mean(0) - [row["drift_random"], row["snr_random"],
                                                          row["energy_share_random"]]), 5 * se)


def test_perfectly_coherent_run_random_loses_nothing(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    step = rng.choice([-1.0, 1.0], 600) * rng.uniform(0.1, 4.0, 600)  # one gradient, magnitudes spread over 40x
    run_dir = write_run(tmp_path / "run", np.tile(step, (8, 1)), [(100, 4), (50, 4)])
    result = diagnose(run_dir, ["1%", "10%"], train_steps=100)
    eps = 64 * np.finfo(np.float64).eps
    for row in result.rows:
        np.testing.assert_allclose([row["recovery"], row["recovery_run"], row["drift_top"], row["drift_random"],
                                    row["coherence_norm_top"], row["coherence_norm_random"]], 1.0, rtol=eps)
        np.testing.assert_allclose([row["coherence_top"], row["coherence_random"]], 8.0, rtol=eps)
    np.testing.assert_allclose(result.adapter["lag1_cosine"], 1.0, rtol=eps)
    # Only the magnitude-weighted view tells the sets apart: sign's top-k holds the largest entries.
    assert all(r["energy_share_top"] > 2 * r["energy_share_random"] for r in result.rows if r["budget"] == "1%")


def sparse_signal(rng: np.random.Generator, t: int, n: int, k: int) -> np.ndarray:
    """Half-normal magnitudes everywhere; one sign per entry over all steps in the first k entries, fair coins
    elsewhere."""
    signs = rng.choice([-1.0, 1.0], (t, n))
    signs[:, :k] = rng.choice([-1.0, 1.0], k)
    return signs * np.abs(rng.standard_normal((t, n)))


def test_signal_in_k_entries_random_loses_almost_all(tmp_path: Path) -> None:
    g = sparse_signal(np.random.default_rng(4), 16, 2000, 20)
    run_dir = write_run(tmp_path / "run", g, [(150, 8), (100, 8)])
    result = diagnose(run_dir, ["1%"], methods=["sign", "fisher"])
    sign, fisher = result.rows
    want = np.zeros(2000)
    want[:20] = 1
    np.testing.assert_array_equal(informed_mask(run_dir, "sign", Budget.parse("1%")), want)
    top = reference(g, want)
    np.testing.assert_allclose(sign["drift_top"], top["drift"], RTOL)
    assert 0.5 < sign["drift_top"] < 0.8  # a kept sign with half-normal sizes: drift 2/pi of the energy
    assert abs(sign["drift_random"] - 20 / 2000 * sign["drift_top"]) < 0.005  # the k/N share, up to noise
    assert sign["recovery"] < 0.03
    assert sign["drift_null"] < 0.6 * sign["drift_top"]  # the drift is more than selection noise
    assert fisher["recovery"] is None or fisher["recovery"] > 5 * sign["recovery"]  # Fisher does not find them


def test_null_is_calibrated_on_a_pure_noise_run(tmp_path: Path) -> None:
    """On pure noise the sign top-k's drift is selection noise only: the null's value, within sampling error."""
    gaps = []
    for seed in range(6):
        g = sparse_signal(np.random.default_rng(10 + seed), 12, 12000, 0)
        row = diagnose(write_run(tmp_path / f"run{seed}", g, [(1000, 12)]), ["3%"], methods=["sign"],
                       seed=seed).rows[0]
        gaps.append(row["drift_top"] - row["drift_null"])
        assert row["drift_null"] > 0.25  # selecting 360 of 12000 noise entries for their signs shows a large drift
    assert abs(np.mean(gaps)) < 4 * np.std(gaps, ddof=1) / np.sqrt(len(gaps)), gaps


def test_null_moments_are_those_of_every_sign_arrangement() -> None:
    for sizes in ([0.5, 1.0, 2.0, 4.0, 7.0], [3.0, 3.0, 1.0], [2.0, 2.0, 2.0, 2.0], [1.5]):
        a = np.array(sizes)
        for pos in range(len(a) + 1):
            sums = [sum(a[j] if j in plus else -a[j] for j in range(len(a)))
                    for plus in itertools.combinations(range(len(a)), pos)]
            mean, var = null_moments(np.array([2.0 * pos - len(a)]), np.array([len(a)]), np.array([a.sum()]),
                                     np.array([(a * a).sum()]))
            np.testing.assert_allclose([mean[0], var[0]], [np.mean(sums), np.var(sums)], RTOL, ATOL)


def test_sign_flip_null_keeps_the_magnitudes_and_draws_fair_signs(tmp_path: Path) -> None:
    g = mixed_grads(np.random.default_rng(7), 9, sum(d * r for d, r in SHAPES))
    acc = open_run(write_run(tmp_path / "run", g, SHAPES)).accumulators()
    draws = [sign_flip_null(acc, np.random.default_rng(s)) for s in range(200)]
    for name, m in acc.modules.items():
        for key in ("count", "sumabs", "sumsq", "nonzero"):
            assert all(np.array_equal(getattr(d.modules[name], key), getattr(m, key)) for d in draws), key
        signs = np.stack([d.modules[name].sumsign for d in draws])
        assert ((signs + m.nonzero) % 2 == 0).all() and (np.abs(signs) <= m.nonzero).all()
        se = np.sqrt(np.maximum(m.nonzero, 1) / len(draws))  # sd of a sign count is sqrt(n)
        assert (np.abs(signs.mean(0)) < 5 * se).all()
        want = m.sumsq  # E[S^2] over fair signs is Q: the cross terms vanish
        got = np.stack([d.modules[name].sum ** 2 for d in draws]).mean(0)
        assert (np.abs(got - want) <= 6 * np.sqrt(3 * want**2 / len(draws)) + ATOL).all()


def test_horizon_gain_ends() -> None:
    assert horizon_gain(1.0, 500) == 1.0 and horizon_gain(-0.2, 500) == 0.0 and horizon_gain(0.3, 1) == 0.3
    np.testing.assert_allclose(horizon_gain(0.01, 100), 1 / 1.99, RTOL)


def test_refuses_ties_no_steps_and_a_single_step(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    zero = write_run(tmp_path / "zero", np.zeros((4, 40)), [(10, 4)])
    with pytest.raises(GradlensError, match="same 'sign' score"):
        diagnose(zero, ["10%"])
    assert_one_line_error(gradlens_inproc(capsys, "diagnose", str(zero)), str(zero), "same 'sign' score")
    same = write_run(tmp_path / "same", np.full((4, 40), 0.25), [(10, 4)])  # non-zero, but every entry alike
    for method in METHODS:
        with pytest.raises(GradlensError, match=f"same '{method}' score"):
            diagnose(same, ["10%"], methods=[method])
    with RunWriter(tmp_path / "empty", specs_for([(10, 4)]), save_raw=False):
        pass
    assert_one_line_error(gradlens_inproc(capsys, "diagnose", str(tmp_path / "empty")), "no recorded")
    one = np.zeros((3, 40))
    one[1] = np.arange(40)
    assert_one_line_error(gradlens_inproc(capsys, "diagnose", str(write_run(tmp_path / "one", one, [(10, 4)]))),
                          "only 1 of 3 steps")


def test_cli_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = write_run(tmp_path / "run", mixed_grads(np.random.default_rng(5), 8, 40), [(10, 4)])
    for args, needle in [([str(tmp_path / "nowhere")], "nowhere"), ([str(run_dir), "--budgets", "abc"], "abc"),
                         ([str(run_dir), "--train_steps", "0"], "train_steps"),
                         ([str(run_dir), "--methods", "random"], "random"), ([str(run_dir), "--seed", "-1"], "seed"),
                         ([str(run_dir), "--out", ""], "--out")]:
        assert_one_line_error(gradlens_inproc(capsys, "diagnose", *args), needle)
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "probe.json").write_text("{not json")
    assert_one_line_error(gradlens_inproc(capsys, "diagnose", str(tmp_path / "probe")), "probe.json")
    (tmp_path / "probe" / "probe.json").write_text("[1, 2]")
    assert_one_line_error(gradlens_inproc(capsys, "diagnose", str(tmp_path / "probe")), "probe.json", "JSON object")
    (tmp_path / "probe" / "probe.json").write_text("{}")  # a probe record without its run
    probe_run = str(tmp_path / "probe" / "run")
    assert_one_line_error(gradlens_inproc(capsys, "diagnose", str(tmp_path / "probe")), probe_run)


def test_cli_reads_a_probe_dir_and_writes_table_and_provenance(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    g = sparse_signal(np.random.default_rng(6), 10, 400, 30)
    probe_dir = tmp_path / "probe"
    write_run(probe_dir / "run", g, [(50, 8)])
    (probe_dir / "probe.json").write_text(json.dumps({"tool": "gradlens probe", "config": {"train_steps": 50},
                                                      "steps": 10}))
    out = tmp_path / "out"
    proc = gradlens_inproc(capsys, "diagnose", str(probe_dir), "--budgets", "1%", "10%", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    sentences = [ln for ln in proc.stdout.splitlines() if "the heuristic puts random placement at about" in ln]
    assert "Spearman 0.32 (p 0.054) with the measured recovery over 36 points" in proc.stdout
    assert "wrong side of 50% in 26 of them" in proc.stdout and "not checked outside" in proc.stdout
    assert len(sentences) == 2 and "over a 50-step run" in sentences[0] and "k = 1% (4 of 400" in sentences[0]
    result = diagnose(probe_dir, ["1%", "10%"])
    with open(out / "diagnose.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [tuple(r) for r in table] == [COLUMNS] * 6
    for got, want in zip(table, result.rows, strict=True):
        for key, value in want.items():
            assert got[key] == str(value), key
    prov = json.loads((out / "diagnose.json").read_text())
    assert prov["run"] == str(probe_dir / "run") and prov["probe"]["config"] == {"train_steps": 50}
    assert prov["train_steps"] == 50 and prov["steps"] == list(range(1, 11)) and prov["rows"] == result.rows
    assert prov["config"]["budgets"] == ["1%", "10%"] and "numpy" in prov["versions"] and prov["heuristic"]
    from_run = diagnose(probe_dir / "run", ["1%", "10%"])  # the run alone: same numbers, no horizon
    assert [r["recovery"] for r in from_run.rows] == [r["recovery"] for r in result.rows]
    assert all(r["recovery_run"] is None for r in from_run.rows)
