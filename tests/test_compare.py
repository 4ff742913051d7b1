"""The probe and ``gradlens compare`` on the toy world, for real (tiny model, few steps)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gradlens.config import CompareConfig, ProbeConfig
from gradlens.errors import GradlensError

TINY_COMPARE = dict(model="toy:tiny", methods=["random", "random_matched", "fisher"], budgets=["10%"], seeds=[0, 1],
                    max_steps=4, probe_steps=2, full_lrs=[2e-3], sparse_lrs=[3e-2], n_val=20, n_eval=20,
                    eval_samples=0, progress=False, trl={"per_device_train_batch_size": 8, "num_generations": 4},
                    divergence_margin=1.0)  # 4 steps at a sweep-free rate: keep every run in the means


def _fisher_top_k(run_dir: Path, k: int) -> set[tuple[str, int]]:
    """Independent reference: the k largest sum_t g_t^2 over the raw shards, as (module, flat index) pairs."""
    from gradlens.store import open_run

    run = open_run(run_dir)
    flat, keys = [], []
    for name in run.modules:
        g = run.gradients(name).astype(np.float64)
        s = (g**2).sum(axis=0).ravel()
        flat.append(s)
        keys += [(name, i) for i in range(s.size)]
    scores = np.concatenate(flat)
    order = np.argsort(-scores, kind="stable")[:k]
    return {keys[i] for i in order}


def test_probe_writes_masks_equal_to_top_k_of_its_own_gradients(tmp_path: Path) -> None:
    from gradlens.placement.probe import probe
    from gradlens.placement.run_masks import mask_file
    from gradlens.sparse.masks import load_mask

    config = ProbeConfig(regime="sft", out=str(tmp_path / "p"), max_steps=3, save_raw=True, methods=["fisher", "sign"],
                         budgets=["2%", "50"], train_steps=300, trl={"per_device_train_batch_size": 4})
    res = probe(config)
    assert res.steps == 3 and res.train_seconds > 0
    assert res.cost["fraction_steps"] == pytest.approx(3 / 300)
    assert not res.cost["seconds_measured"]  # estimated from the probe's own seconds per step
    assert res.cost["fraction_seconds"] == pytest.approx(3 / 300)
    mask, meta = load_mask(mask_file(tmp_path / "p", "fisher", "2%"))
    total = sum(m.size for m in mask.values())
    k = round(0.02 * total)
    assert sum(int(m.sum()) for m in mask.values()) == k
    assert {(n, int(i)) for n, m in mask.items() for i in np.flatnonzero(m.ravel())} == _fisher_top_k(res.run, k)
    assert meta["selector"] == "fisher" and meta["source_run"] == str(res.run) and float(meta["scoring_seconds"]) >= 0
    sign, _ = load_mask(res.masks[("sign", "k=50")])
    assert sum(int(m.sum()) for m in sign.values()) == 50
    info = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert info["steps"] == 3 and set(info["masks"]) == {"fisher/2%", "fisher/k=50", "sign/2%", "sign/k=50"}
    assert info["versions"]["torch"]

    # gradlens select on the probe's run rebuilds the same informed mask, and draws exact-k random ones.
    from gradlens.cli.main import main

    out = tmp_path / "sel"
    assert main(["select", str(res.run), "--out", str(out), "--methods", "fisher", "random", "--budgets", "2%",
                 "--seed", "3"]) == 0
    again, sel_meta = load_mask(mask_file(out, "fisher", "2%"))
    assert all(np.array_equal(again[n], mask[n]) for n in mask) and sel_meta["source_run"] == str(res.run)
    rand, rand_meta = load_mask(mask_file(out, "random", "2%"))
    assert sum(int(m.sum()) for m in rand.values()) == k and rand_meta["seed"] == "3"
    sel = json.loads((out / "select.json").read_text())
    assert sel["steps"] == 3 and sel["config"]["budgets"] == ["2%"] and sel["versions"]["torch"]
    # a usage error: random_matched needs a second mask
    assert main(["select", str(res.run), "--out", str(out), "--methods", "random_matched"]) == 2
    assert main(["select", str(tmp_path / "nope"), "--out", str(out)]) == 2


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory):
    from gradlens.compare import compare

    out = tmp_path_factory.mktemp("cmp") / "out"
    return compare(CompareConfig(out=str(out), **TINY_COMPARE))


def test_compare_table_has_every_row_and_the_required_columns(compared) -> None:
    df = pd.read_csv(compared.out / "placement.csv")
    for col in ("regime", "method", "budget", "seed", "lr", "steps", "accuracy", "base_accuracy",
                "full_lora_accuracy", "sampled_accuracy", "k", "train_seconds"):
        assert col in df.columns, col
    for regime in ("sft", "grpo"):
        sub = df[df.regime == regime]
        assert (sub.method == "base").sum() == 1
        assert sorted(sub[sub.method == "full"].seed) == [0, 1]
        for method in TINY_COMPARE["methods"]:
            rows = sub[sub.method == method]
            assert sorted(rows.seed) == [0, 1] and set(rows.budget) == {"10%"}
            assert (rows.lr == 3e-2).all() and (rows.steps == 4).all()
        base = float(sub[sub.method == "base"].accuracy.iloc[0])
        assert np.allclose(sub.base_accuracy.astype(float), base)
        full = sub[sub.method == "full"].set_index("seed").accuracy
        sparse = sub[sub.method == "fisher"]
        assert np.allclose(sparse.full_lora_accuracy.astype(float), full.loc[sparse.seed].to_numpy())
        # every sparse run trained exactly 10% of the adapter's B entries (8192 entries for tiny, r=8)
        assert set(sub[sub.method.isin(TINY_COMPARE["methods"])].k.astype(int)) == {819}


def test_compare_summary_interval_is_the_t_interval(compared) -> None:
    df = compared.placement
    summary = compared.summary
    for regime in ("sft", "grpo"):
        acc = df[(df.regime == regime) & (df.method == "random")].accuracy.to_numpy(float)
        mean, sd = acc.mean(), acc.std(ddof=1)
        half = 12.706204736174698 * sd / np.sqrt(2)  # t_{0.975, 1}
        row = summary[(summary.regime == regime) & (summary.method == "random")].iloc[0]
        assert row.accuracy_mean == pytest.approx(mean)
        assert row.ci95_lo == pytest.approx(mean - half) and row.ci95_hi == pytest.approx(mean + half)


def test_compare_random_matched_copies_module_counts_and_where_table(compared) -> None:
    from gradlens.sparse.masks import load_mask

    adapters = compared.out / "adapters" / "sft"
    fisher, _ = load_mask(adapters / "fisher-10pct-seed0" / "gradlens_mask.safetensors")
    matched, _ = load_mask(adapters / "random_matched-10pct-seed0" / "gradlens_mask.safetensors")
    assert {n: int(m.sum()) for n, m in fisher.items()} == {n: int(m.sum()) for n, m in matched.items()}
    assert any((fisher[n] != matched[n]).any() for n in fisher)
    where = compared.where
    sub = where[(where.regime == "sft") & (where.seed == 0) & (where.group == "proj")]
    assert set(where.method) == {"fisher"}
    v = sub[sub.key == "v"].iloc[0]
    selected_v = sum(int(m.sum()) for n, m in fisher.items() if n.endswith("v_proj"))
    entries_v = sum(m.size for n, m in fisher.items() if n.endswith("v_proj"))
    total = sum(m.size for m in fisher.values())
    assert v.selected == selected_v
    assert v.enrichment == pytest.approx((selected_v / 819) / (entries_v / total))


def test_compare_masked_entries_stayed_zero_in_the_exported_adapters(compared) -> None:
    from safetensors.numpy import load_file

    from gradlens.sparse.masks import load_mask

    for regime in ("sft", "grpo"):
        d = compared.out / "adapters" / regime / "random-10pct-seed1"
        mask, _ = load_mask(d / "gradlens_mask.safetensors")
        weights = load_file(d / "adapter_model.safetensors")
        moved = 0
        for key, w in weights.items():
            if "lora_B" not in key:
                continue
            name = key.removeprefix("base_model.model.").removesuffix(".lora_B.weight")
            assert not w[~mask[name]].any(), key
            moved += int(np.count_nonzero(w[mask[name]]))
        assert moved > 0


def test_compare_outputs_provenance_and_resume(compared, capsys: pytest.CaptureFixture) -> None:
    from gradlens.compare import compare

    for name in ("placement.csv", "summary.csv", "where.csv", "probes.csv", "placement.png", "provenance.json"):
        assert (compared.out / name).is_file(), name
    prov = json.loads((compared.out / "provenance.json").read_text())
    assert prov["config"]["seeds"] == [0, 1] and prov["versions"]["trl"]
    assert "SFT: base" in compared.findings and "GRPO: base" in compared.findings
    probes = pd.read_csv(compared.out / "probes.csv")
    assert (probes.fraction_steps == 2 / 4).all() and probes.seconds_measured.all()
    with pytest.raises(GradlensError, match="already holds a comparison"):
        compare(CompareConfig(out=str(compared.out), **TINY_COMPARE))
    before = pd.read_csv(compared.out / "placement.csv", dtype={"budget": str}).fillna({"budget": ""})
    again = compare(CompareConfig(out=str(compared.out), resume=True, **TINY_COMPARE))
    pd.testing.assert_frame_equal(again.placement.reset_index(drop=True), before, check_dtype=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"seeds": [0, 1], "sweep_seeds": [1]}, r"sweep_seeds \[1\] must differ"),
    ({"sweep_seeds": []}, "sweep_seeds must be distinct"),
    ({"grid_extensions": -1}, "grid_extensions must be >= 0"),
    ({"divergence_margin": 2.0}, "divergence_margin in"),
    ({"methods": ["random", "random_matched"]}, "random_matched needs an informed method"),
    ({"budgets": ["0"]}, "budget"),
    ({"budgets": ["150%"]}, "budget"),
    ({"methods": ["best"]}, "unknown or no placement method"),
    ({"sparse_lrs": [0.0]}, "learning rates must be > 0"),
])
def test_compare_config_rejects_bad_input(kwargs: dict, message: str) -> None:
    with pytest.raises(GradlensError, match=message):
        CompareConfig(out="x", **kwargs)


def test_compare_cli_k_larger_than_adapter_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from gradlens.cli.main import main

    rc = main(["compare", "--out", str(tmp_path / "c"), "--model", "toy:tiny", "--regimes", "sft", "--methods",
               "random", "--budgets", "100000", "--seeds", "0", "--sparse_lrs", "0.01", "--no-progress"])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' weight-loading bar
    assert rc == 2 and last.startswith("gradlens compare: error: ") and "k=100000 exceeds" in last
