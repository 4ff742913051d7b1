"""Tests for placement budgets, selectors and mask files, against independent numpy computations on known gradients."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from gradlens.errors import GradlensError
from gradlens.placement import INFORMED, SELECTORS, Budget, scores, select
from gradlens.sparse import check_mask_fits, load_mask, save_mask, shapes_of, specs_for, where_table
from gradlens.store import Accumulators, ModuleAccumulator, ModuleSpec, RunWriter, open_run

REPO = Path(__file__).resolve().parents[1]
PROJ_SHAPES = {"self_attn.q_proj": (12, 4), "self_attn.v_proj": (6, 4), "self_attn.o_proj": (12, 4),
               "mlp.down_proj": (10, 4)}
SHAPES = {f"model.layers.{layer}.{proj}": shape for layer in range(2) for proj, shape in PROJ_SHAPES.items()}
TOTAL = sum(d * r for d, r in SHAPES.values())  # 320
T = 9
BUDGETS = [Budget(fraction=0.05), Budget(k=37), Budget(fraction=0.05, scope="per_module"),
           Budget(k=37, scope="per_module")]
META = {"selector": "fisher", "budget": "1%", "scope": "global", "seed": 0, "source_run": "runs/x",
        "scoring_seconds": 0.25}


def make_grads(seed: int = 0, steps: int = T) -> dict[str, np.ndarray]:
    """Known float64 gradients ``(T, d_out, r)`` per module, with exact zeros so sign(0) = 0 is exercised."""
    rng = np.random.default_rng(seed)
    grads = {}
    for name, shape in SHAPES.items():
        g = rng.standard_normal((steps, *shape)) + rng.normal(0, 0.5, shape)  # per-entry drift: varied consistency
        g[rng.random(g.shape) < 0.1] = 0.0
        grads[name] = g
    return grads


def accumulators_of(grads: dict[str, np.ndarray]) -> Accumulators:
    """Accumulators as the store defines them (per-entry sums over steps) of the given gradients."""
    modules = {}
    for name, g in grads.items():
        flat = g.reshape(len(g), -1)
        dots = np.concatenate([[np.nan], (flat[1:] * flat[:-1]).sum(1)])
        modules[name] = ModuleAccumulator(count=len(g), sum=g.sum(0), sumsq=(g**2).sum(0), sumabs=np.abs(g).sum(0),
                                          sumsign=np.sign(g).sum(0), nonzero=(g != 0).sum(0),
                                          sqnorm=(flat**2).sum(1), dot_prev=dots)
    return Accumulators(path=Path("synthetic/accumulators.safetensors"), steps=np.arange(T), modules=modules)


def expected_scores(method: str, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Scores straight from the definitions, computed per entry from the raw gradient series."""
    out = {}
    for name, g in grads.items():
        n = len(g)
        consistency = np.abs(np.mean(np.sign(g), axis=0))
        out[name] = {"magnitude": np.abs(g.mean(0)) * n, "fisher": np.einsum("tij,tij->ij", g, g),
                     "sign": consistency, "sign_magnitude": consistency * np.abs(g).mean(0)}[method]
    return out


def flat_of(per_module: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([per_module[name].ravel() for name in SHAPES])


def expected_top_set(method: str, grads: dict[str, np.ndarray], k: int) -> set[int]:
    """Flat indices of the k best entries; for ``sign`` ordered by consistency, then magnitude (lexicographic)."""
    flat = flat_of(expected_scores(method, grads))
    if method == "sign":
        order = np.lexsort((-flat_of(expected_scores("magnitude", grads)), -flat))
    else:
        order = np.argsort(-flat, kind="stable")
    return set(order[:k].tolist())


def selected_set(mask: dict[str, np.ndarray]) -> set[int]:
    return set(np.flatnonzero(flat_of(mask)).tolist())


def one_line(excinfo: pytest.ExceptionInfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------------------------------------------------
# Budgets


@pytest.mark.parametrize(("text", "k", "fraction", "label"), [
    ("1%", None, 0.01, "1%"), ("0.5%", None, 0.005, "0.5%"), ("0.01", None, 0.01, "1%"), ("500", 500, None, "k=500"),
    (" k=7 ", 7, None, "k=7"), ("100%", None, 1.0, "100%"), ("1e-3", None, 0.001, "0.1%"),
])
def test_budget_parse_and_label(text, k, fraction, label):
    budget = Budget.parse(text, scope="per_module")
    assert (budget.k, budget.scope) == (k, "per_module")
    assert budget.fraction == pytest.approx(fraction, rel=1e-12) if fraction is not None else budget.fraction is None
    assert str(budget) == label
    assert Budget.parse(str(budget), scope="per_module") == budget


@pytest.mark.parametrize(("text", "match"), [
    ("abc", "not a count"), ("", "not a count"), ("1.5", "not a count"), ("-3", "not a count"), ("0", "k must be"),
    ("150%", "fraction must be in"), ("0%", "fraction must be in"), ("1.0", "not a count"),
])
def test_budget_parse_errors_name_the_text(text, match):
    with pytest.raises(GradlensError, match=match) as e:
        Budget.parse(text)
    assert repr(text) in one_line(e)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"k": 0}, "k must be an integer >= 1"), ({"k": -4}, "k must be"), ({"k": 2.5}, "k must be"),
    ({"fraction": 1.5}, r"fraction must be in \(0, 1\]"), ({"fraction": 0.0}, "fraction must be"),
    ({"fraction": float("nan")}, "fraction must be"), ({}, "exactly one"), ({"k": 3, "fraction": 0.1}, "exactly one"),
    ({"k": 3, "scope": "layer"}, "scope 'layer' is not one of global, per_module"),
])
def test_budget_checks(kwargs, match):
    with pytest.raises(GradlensError, match=match) as e:
        Budget(**kwargs)
    one_line(e)


def test_budget_counts_global_rounds_half_up_and_refuses_too_many():
    assert Budget(fraction=0.01).counts(SHAPES) == 3  # 3.2
    assert Budget(fraction=0.0015625).counts(SHAPES) == 1  # 0.5 rounds up
    assert Budget(fraction=1e-6).counts(SHAPES) == 1  # never 0
    assert Budget(k=TOTAL).counts(SHAPES) == TOTAL
    with pytest.raises(GradlensError, match=f"k={TOTAL + 1} exceeds the adapter's {TOTAL} B entries"):
        Budget(k=TOTAL + 1).counts(SHAPES)
    with pytest.raises(GradlensError, match="exceeds"):
        Budget(k=TOTAL + 1, scope="per_module").counts(SHAPES)


def test_budget_counts_per_module_fraction():
    counts = Budget(fraction=0.3125, scope="per_module").counts(SHAPES)
    # 48 * 0.3125 = 15, 24 * 0.3125 = 7.5 -> 8 (half up), 40 * 0.3125 = 12.5 -> 13
    want = {48: 15, 24: 8, 40: 13}
    assert counts == {name: want[d * r] for name, (d, r) in SHAPES.items()}
    assert set(Budget(fraction=0.001, scope="per_module").counts(SHAPES).values()) == {1}


def test_budget_counts_per_module_count_largest_remainder():
    shapes = {"a": (3, 1), "b": (5, 1), "c": (7, 1)}
    # quotas 7*3/15 = 1.4, 7*5/15 = 2.33, 7*7/15 = 3.27: floors 1, 2, 3; the one left goes to the largest remainder a
    assert Budget(k=7, scope="per_module").counts(shapes) == {"a": 2, "b": 2, "c": 3}
    for k in (1, 5, 37, 111, TOTAL):
        counts = Budget(k=k, scope="per_module").counts(SHAPES)
        assert sum(counts.values()) == k
        quotas = {name: Fraction(k * d * r, TOTAL) for name, (d, r) in SHAPES.items()}
        floors = {name: int(q) for name, q in quotas.items()}
        assert all(counts[n] - floors[n] in (0, 1) for n in SHAPES)
        lifted = [quotas[n] - floors[n] for n in SHAPES if counts[n] > floors[n]]
        kept = [quotas[n] - floors[n] for n in SHAPES if counts[n] == floors[n]]
        assert not lifted or not kept or min(lifted) >= max(kept)


# --------------------------------------------------------------------------------------------------------------------
# Selectors


@pytest.mark.parametrize("method", SELECTORS)
@pytest.mark.parametrize("budget", BUDGETS, ids=lambda b: f"{b}-{b.scope}")
def test_every_selector_selects_exactly_the_budget(method, budget):
    acc = accumulators_of(make_grads())
    reference = select("magnitude", budget, SHAPES, accumulators=acc)
    mask = select(method, budget, SHAPES, accumulators=acc, seed=3, reference=reference)
    assert list(mask) == list(SHAPES)
    assert all(m.dtype == np.bool_ and m.shape == SHAPES[n] for n, m in mask.items())
    counts = budget.counts(SHAPES)
    if budget.scope == "global":
        assert sum(int(m.sum()) for m in mask.values()) == counts
    elif method == "modules":  # the per-module budget's total, spread over the v/o/down modules only
        assert sum(int(m.sum()) for m in mask.values()) == sum(counts.values())
    else:
        assert {n: int(m.sum()) for n, m in mask.items()} == counts


@pytest.mark.parametrize("method", INFORMED)
def test_scores_match_their_definitions(method):
    grads = make_grads()
    got = scores(method, accumulators_of(grads))
    want = expected_scores(method, grads)
    for name in SHAPES:
        assert got[name].dtype == np.float64 and got[name].shape == SHAPES[name]
        tol = 0.5 / T if method == "sign" else 0  # sign adds a tie-break term below half a consistency level
        np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=tol + 1e-12, err_msg=name)


@pytest.mark.parametrize("method", INFORMED)
@pytest.mark.parametrize("k", [1, 16, 100, TOTAL - 1])
def test_informed_global_top_k_is_the_numpy_top_k(method, k):
    grads = make_grads(seed=k)
    mask = select(method, Budget(k=k), SHAPES, accumulators=accumulators_of(grads))
    assert selected_set(mask) == expected_top_set(method, grads, k)


@pytest.mark.parametrize("method", INFORMED)
def test_informed_per_module_top_k_within_each_module(method):
    grads = make_grads(seed=5)
    budget = Budget(fraction=0.2, scope="per_module")
    mask = select(method, budget, SHAPES, accumulators=accumulators_of(grads))
    want = expected_scores(method, grads)
    magnitude = expected_scores("magnitude", grads)
    for name, k in budget.counts(SHAPES).items():
        keys = (-magnitude[name].ravel(), -want[name].ravel()) if method == "sign" else (-want[name].ravel(),)
        assert set(np.flatnonzero(mask[name]).tolist()) == set(np.lexsort(keys)[:k].tolist()), name


def test_sign_tie_break_by_magnitude_never_crosses_levels():
    # T = 4 steps of 6 entries: consistency 1, 0.5, 0.5, 0.5, 0, 0 with magnitudes |sum g| 0.004, 10, 8, 0.2, 0, 8
    g = np.array([[0.001, 5, 3, 0.1, 100, 9],
                  [0.001, 5, 3, 0.1, -100, -1],
                  [0.001, 5, 3, 0.1, 100, 0],
                  [0.001, -5, -1, -0.1, -100, 0]])
    grads = {"model.layers.0.self_attn.v_proj": g.reshape(4, 1, 6)}
    acc = accumulators_of(grads)
    shapes = {name: (1, 6) for name in grads}
    picked = []
    for k in range(1, 7):
        (mask,) = select("sign", Budget(k=k), shapes, accumulators=acc).values()
        (new,) = set(np.flatnonzero(mask).tolist()) - set(picked)
        picked.append(new)
    assert picked == [0, 1, 2, 3, 5, 4]  # the entry of consistency 1 first although its magnitude is the smallest
    (score,) = scores("sign", acc).values()
    np.testing.assert_array_equal(np.floor(score * 4).ravel(), [4, 2, 2, 2, 0, 0])  # levels 1/T apart, not crossed
    (mask,) = select("magnitude", Budget(k=1), shapes, accumulators=acc).values()
    assert np.flatnonzero(mask).tolist() == [1]


def test_ties_at_the_threshold_go_to_the_lower_index():
    grads = {name: np.ones((2, *shape)) for name, shape in SHAPES.items()}  # every magnitude equal...
    grads[list(SHAPES)[-1]][:, -1, -1] = 0.0  # ...but one (all tying would be refused: no signal)
    mask = select("magnitude", Budget(k=50), SHAPES, accumulators=accumulators_of(grads))
    assert selected_set(mask) == set(range(50))


@pytest.mark.parametrize("method", ["random", "random_matched", "modules"])
@pytest.mark.parametrize("scope", ["global", "per_module"])
def test_random_selectors_are_deterministic_per_seed(method, scope):
    budget = Budget(fraction=0.1, scope=scope)
    reference = select("fisher", budget, SHAPES, accumulators=accumulators_of(make_grads()))
    a, b, c = (select(method, budget, SHAPES, seed=s, reference=reference) for s in (7, 7, 8))
    assert selected_set(a) == selected_set(b)
    assert selected_set(a) != selected_set(c)


def test_informed_selection_ignores_the_seed():
    acc = accumulators_of(make_grads())
    assert selected_set(select("sign", Budget(k=40), SHAPES, accumulators=acc, seed=1)) == selected_set(
        select("sign", Budget(k=40), SHAPES, accumulators=acc, seed=2))


def test_random_global_spreads_in_proportion_to_module_size():
    k, seeds = 32, 300
    hits = {name: 0 for name in SHAPES}
    for seed in range(seeds):
        for name, m in select("random", Budget(k=k), SHAPES, seed=seed).items():
            hits[name] += int(m.sum())
    for name, (d, r) in SHAPES.items():
        expected = seeds * k * d * r / TOTAL  # 1,440 for a 48-entry module, 720 for a 24-entry one
        assert abs(hits[name] - expected) < 5 * np.sqrt(expected), name


def test_random_matched_copies_the_reference_counts():
    reference = select("sign_magnitude", Budget(fraction=0.1), SHAPES, accumulators=accumulators_of(make_grads()))
    mask = select("random_matched", Budget(fraction=0.1), SHAPES, seed=4, reference=reference)
    assert {n: int(m.sum()) for n, m in mask.items()} == {n: int(m.sum()) for n, m in reference.items()}
    assert selected_set(mask) != selected_set(reference)
    with pytest.raises(GradlensError, match="needs a reference mask"):
        select("random_matched", Budget(fraction=0.1), SHAPES)
    with pytest.raises(GradlensError, match="selects 32 entries but budget k=33"):
        select("random_matched", Budget(k=33), SHAPES, reference=reference)
    with pytest.raises(GradlensError, match="reference mask: has no module model.layers.0.self_attn.q_proj"):
        select("random_matched", Budget(k=32), SHAPES, reference={n: m for n, m in list(reference.items())[1:]})


def test_modules_selector_picks_only_the_chosen_projections():
    mask = mask_default = select("modules", Budget(k=100), SHAPES, seed=0)
    for name, m in mask.items():
        assert (m.sum() > 0) == name.endswith(("v_proj", "o_proj", "down_proj")), name
    mask = select("modules", Budget(k=60, scope="per_module"), SHAPES, seed=0, projections=("q_proj",))
    assert {n: int(m.sum()) for n, m in mask.items() if m.any()} == {
        "model.layers.0.self_attn.q_proj": 30, "model.layers.1.self_attn.q_proj": 30}
    with pytest.raises(GradlensError, match="budget k=97 is 97 entries, more than the 96 entries of the q_proj"):
        select("modules", Budget(k=97), SHAPES, projections=("q_proj",))
    with pytest.raises(GradlensError, match="'up_proj' matches none of the 8 LoRA modules; their roles are: q, v"):
        select("modules", Budget(k=5), SHAPES, projections=("up_proj",))
    # The selector takes the names --modules takes: labels ("v") and projection names ("v_proj") alike.
    by_label = select("modules", Budget(k=100), SHAPES, seed=0, projections=("v", "o", "down"))
    assert all(np.array_equal(by_label[n], mask_default[n]) for n in SHAPES)


def test_select_validates_its_inputs():
    acc = accumulators_of(make_grads())
    with pytest.raises(GradlensError, match="selector 'best' is not one of random, random_matched, magnitude") as e:
        select("best", Budget(k=3), SHAPES)
    one_line(e)
    with pytest.raises(GradlensError, match="selector 'fisher' needs the accumulators"):
        select("fisher", Budget(k=3), SHAPES)
    with pytest.raises(GradlensError, match="seed must be an integer >= 0"):
        select("random", Budget(k=3), SHAPES, seed=-1)
    fewer = {n: s for n, s in SHAPES.items() if "q_proj" not in n}
    with pytest.raises(GradlensError, match="synthetic/accumulators.safetensors: module "
                                            "model.layers.0.self_attn.q_proj is not in the adapter"):
        select("fisher", Budget(k=3), fewer, accumulators=acc)
    wrong = {**SHAPES, "model.layers.1.mlp.down_proj": (10, 8)}
    with pytest.raises(GradlensError, match=r"down_proj has shape \(10, 4\), the adapter's is \(10, 8\)"):
        select("fisher", Budget(k=3), wrong, accumulators=acc)
    with pytest.raises(GradlensError, match="selector 'random' has no scores"):
        scores("random", acc)
    acc.modules["model.layers.0.self_attn.v_proj"].count = T - 1
    with pytest.raises(GradlensError, match=r"selector 'sign' needs one step count for all modules, found \[8, 9\]"):
        select("sign", Budget(k=3), SHAPES, accumulators=acc)
    acc.modules["model.layers.0.self_attn.v_proj"].sum[0, 0] = np.nan
    with pytest.raises(GradlensError, match="'magnitude' scores of module model.layers.0.self_attn.v_proj"):
        select("magnitude", Budget(k=3), SHAPES, accumulators=acc)


def test_select_from_a_recorded_run(tmp_path):
    specs = [ModuleSpec.from_name(name, shape) for name, shape in SHAPES.items()]
    grads = {name: g.astype(np.float32) for name, g in make_grads(seed=11, steps=6).items()}
    with RunWriter(tmp_path / "run", specs, steps_per_shard=4) as writer:
        for step in range(6):
            writer.add_step(step, [grads[name][step] for name in SHAPES], {"loss": 1.0})
    run = open_run(tmp_path / "run")
    shapes = shapes_of(run.specs)
    assert shapes == SHAPES
    raw = {name: g.astype(np.float64) for name, g in grads.items()}
    for method in INFORMED:
        mask = select(method, Budget(k=25), shapes, accumulators=run.accumulators())
        assert selected_set(mask) == expected_top_set(method, raw, 25), method


def test_a_run_without_steps_has_no_scores(tmp_path):
    specs = [ModuleSpec.from_name(name, shape) for name, shape in SHAPES.items()]
    RunWriter(tmp_path / "run", specs).close()
    run = open_run(tmp_path / "run")
    msg = r"no recorded \(finite\) steps for module model.layers.0.self_attn.q_proj; selector 'fisher' needs gradient"
    with pytest.raises(GradlensError, match=msg) as e:
        select("fisher", Budget(k=3), shapes_of(run.specs), accumulators=run.accumulators())
    assert str(tmp_path / "run" / "accumulators.safetensors") in one_line(e)
    assert sum(int(m.sum()) for m in select("random", Budget(k=3), shapes_of(run.specs)).values()) == 3


# --------------------------------------------------------------------------------------------------------------------
# Mask files, fit checks and where-tables


def test_mask_round_trip_with_metadata(tmp_path):
    mask = select("random", Budget(k=40), SHAPES, seed=2)
    path = save_mask(tmp_path / "masks" / "m.safetensors", mask, {**META, "extra": {"a": [1, 2]}})
    assert path == tmp_path / "masks" / "m.safetensors"
    loaded, meta = load_mask(path)
    assert set(loaded) == set(SHAPES)
    for name in SHAPES:
        assert loaded[name].dtype == np.bool_
        np.testing.assert_array_equal(loaded[name], mask[name])
    assert meta == {"selector": "fisher", "budget": "1%", "scope": "global", "seed": "0", "source_run": "runs/x",
                    "scoring_seconds": "0.25", "extra": '{"a": [1, 2]}', "gradlens_mask_format": "1", "k": "40"}
    assert json.loads(meta["extra"]) == {"a": [1, 2]}
    assert not list((tmp_path / "masks").glob(".*tmp"))


def test_save_mask_refuses_bad_input(tmp_path):
    mask = select("random", Budget(k=4), SHAPES)
    path = tmp_path / "m.safetensors"
    with pytest.raises(GradlensError, match="mask metadata lacks scope, seed"):
        save_mask(path, mask, {"selector": "x", "budget": "1%", "source_run": "r", "scoring_seconds": 0})
    with pytest.raises(GradlensError, match="may not set k"):
        save_mask(path, mask, {**META, "k": 4})
    with pytest.raises(GradlensError, match="model.layers.0.self_attn.q_proj is int64 \\(12, 4\\), not a 2-D bool"):
        save_mask(path, {**mask, "model.layers.0.self_attn.q_proj": np.zeros((12, 4), np.int64)}, META)
    assert not path.exists()


def test_load_mask_refuses_foreign_truncated_and_invalid_files(tmp_path):
    pickled = tmp_path / "mask.pkl"
    pickled.write_bytes(pickle.dumps({"model.layers.0.self_attn.q_proj": np.ones((12, 4), bool)}))
    with pytest.raises(GradlensError, match="not a safetensors file") as e:
        load_mask(pickled)
    assert one_line(e).startswith(str(pickled))

    good = save_mask(tmp_path / "good.safetensors", select("random", Budget(k=9), SHAPES), META)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-7])
    with pytest.raises(GradlensError, match="truncated or corrupt mask file") as e:
        load_mask(truncated)
    assert one_line(e).startswith(str(truncated))

    import safetensors.numpy

    other = tmp_path / "other.safetensors"
    safetensors.numpy.save_file({"a": np.ones((2, 2), np.uint8)}, other, metadata={"format": "x"})
    with pytest.raises(GradlensError, match="not a gradlens mask"):
        load_mask(other)
    twos = tmp_path / "twos.safetensors"
    safetensors.numpy.save_file({"a": np.full((2, 2), 2, np.uint8)}, twos, metadata={"gradlens_mask_format": "1",
                                                                                       "k": "8"})
    with pytest.raises(GradlensError, match="module a holds values other than 0 and 1"):
        load_mask(twos)
    miscounted = tmp_path / "miscounted.safetensors"
    safetensors.numpy.save_file({"a": np.ones((2, 2), np.uint8)}, miscounted, metadata={"gradlens_mask_format": "1",
                                                                                         "k": "5"})
    with pytest.raises(GradlensError, match="metadata says k='5' but the mask selects 4 entries"):
        load_mask(miscounted)
    floats = tmp_path / "floats.safetensors"
    safetensors.numpy.save_file({"a": np.ones((2, 2), np.float32)}, floats, metadata={"gradlens_mask_format": "1"})
    with pytest.raises(GradlensError, match="tensor 'a' is F32 \\[2, 2\\], not a 2-D U8 mask"):
        load_mask(floats)
    with pytest.raises(GradlensError, match="mask file missing"):
        load_mask(tmp_path / "absent.safetensors")


def test_check_mask_fits():
    mask = select("random", Budget(k=4), SHAPES)
    check_mask_fits(mask, SHAPES)
    first, *rest = SHAPES
    with pytest.raises(GradlensError, match=f"m.safetensors: has no module {first} of the adapter "
                                            r"\(7 modules, the adapter 8\)") as e:
        check_mask_fits({n: mask[n] for n in rest}, SHAPES, where="m.safetensors")
    one_line(e)
    with pytest.raises(GradlensError, match=r"mask: module model.layers.9.mlp.up_proj is not in the adapter \(9 mod"):
        check_mask_fits({**mask, "model.layers.9.mlp.up_proj": np.zeros((3, 4), bool)}, SHAPES)
    with pytest.raises(GradlensError, match=rf"mask: module {first} has shape \(12, 8\), the adapter's is \(12, 4\)"):
        check_mask_fits({**mask, first: np.zeros((12, 8), bool)}, SHAPES)


def test_where_table_shares_and_enrichment():
    # Layer 0 q/v/o/down hold 48/24/48/40 entries, layer 1 the same: 320 in all.
    chosen = {"model.layers.0.self_attn.q_proj": 6, "model.layers.0.self_attn.v_proj": 10,
              "model.layers.1.self_attn.v_proj": 2, "model.layers.1.mlp.down_proj": 2}
    mask = {}
    for name, shape in SHAPES.items():
        flat = np.zeros(shape[0] * shape[1], bool)
        flat[: chosen.get(name, 0)] = True
        mask[name] = flat.reshape(shape)
    table = where_table(mask)
    assert list(table.columns) == ["group", "key", "selected", "selected_share", "entries", "entry_share",
                                   "enrichment"]
    rows = {(g, k): r for g, k, r in zip(table["group"], table["key"], table.to_dict("records"), strict=True)}
    assert list(rows) == [("proj", "q"), ("proj", "v"), ("proj", "o"), ("proj", "down"), ("layer", "0"),
                          ("layer", "1")]
    # by hand: 20 selected; v holds 12 of them in 48 of 320 entries -> share 0.6, entry share 0.15, enrichment 4
    want = {("proj", "q"): (6, 96), ("proj", "v"): (12, 48), ("proj", "o"): (0, 96), ("proj", "down"): (2, 80),
            ("layer", "0"): (16, 160), ("layer", "1"): (4, 160)}
    for key, (sel, entries) in want.items():
        row = rows[key]
        assert (row["selected"], row["entries"]) == (sel, entries)
        assert row["selected_share"] == pytest.approx(sel / 20)
        assert row["entry_share"] == pytest.approx(entries / 320)
        assert row["enrichment"] == pytest.approx((sel / 20) / (entries / 320))
    assert rows[("proj", "v")]["enrichment"] == pytest.approx(4.0)
    specs = [ModuleSpec.from_name(n, s) for n, s in SHAPES.items()]
    assert table.equals(where_table(mask, specs))
    assert [s.proj for s in specs_for(mask)] == [s.proj for s in specs]


def test_placement_imports_without_torch():
    code = "import sys, gradlens.placement; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.parametrize("method", sorted(INFORMED))
def test_informed_selectors_refuse_statistics_in_which_every_score_ties(method):
    """A run whose reward was always 0 has all-zero gradients: a 'sign' mask would be the first k entries of the
    first module (ties go to the lowest index). That is refused in one line, not written as a mask."""
    zero = {name: np.zeros_like(g) for name, g in make_grads().items()}
    with pytest.raises(GradlensError, match=f"every entry has the same {method!r} score"):
        select(method, Budget(k=10), SHAPES, accumulators=accumulators_of(zero))
    select(method, Budget(k=10), SHAPES, accumulators=accumulators_of(make_grads()))  # real statistics still work
