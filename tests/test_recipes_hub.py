"""Every recipe in ``recipes/`` runs through the real CLI (``--config``), its hub id mapped to the offline hub
fixture and its data to a GSM8K-format directory: the recipe's own settings are kept (LoRA rank and alpha, learning
rates, methods, budgets, gradient checkpointing, TRL fields, output paths relative to the working directory), except
those that size the run (steps, batch and generation sizes, lengths, evaluation and validation counts, seeds and the
learning-rate grids). So every field a recipe sets goes through the CLI's parsing, the configs' checks and TRL, and
``gradlens train`` finds the mask where the probe recipe wrote it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import HUB_MODEL_ID
from tests.helpers.cli import gradlens_inproc

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
QUIET = ["--disable_tqdm", "true"]
SIZE = {  # the settings that size a run, per regime: one step on 4 short sequences (GRPO: 4 prompts x 4 samples,
    # so that some group differs in reward and the probe has a signal to rank)
    "sft": ["--max_steps", "1", "--per_device_train_batch_size", "4", "--max_length", "128"],
    "grpo": ["--max_steps", "1", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2",
             "--generation_batch_size", "16", "--num_generations", "4", "--max_completion_length", "8"],
}
EVAL = ["--n_eval", "2", "--eval_max_new_tokens", "4"]


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def assert_kept(own: dict, stored: dict, trl: dict, overridden: list[str]) -> None:
    """Every setting of the recipe ``own`` that the test did not override reached the run: as a gradlens setting in
    ``stored`` or a TRL one in ``trl`` (a key in neither went nowhere)."""
    flags = {f.removeprefix("--") for f in overridden if f.startswith("--")} | {"model", "task"}
    for key, value in own.items():
        if key not in flags:
            assert (stored[key] if key in stored else trl[key]) == value, key


def run_recipe(capsys, command: str, recipe: Path, gsm_dir: Path, *extra: str):
    """``gradlens COMMAND --config RECIPE`` on the hub fixture, sized down; asserts success."""
    regime = load_yaml(recipe).get("regime") or load_yaml(recipe)["regimes"][0]
    proc = gradlens_inproc(capsys, command, "--config", str(recipe), "--model", HUB_MODEL_ID, "--task",
                           f"gsm8k:{gsm_dir}", *SIZE[regime], *extra, *QUIET)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_every_recipe_is_covered() -> None:
    names = {p.relative_to(RECIPES).as_posix() for p in RECIPES.rglob("*.yaml") if p.parent.name != "accelerate"}
    # accelerate's launch configs, not gradlens configs: tests/test_fsdp.py and tests/test_zero.py launch each one
    assert {p.name for p in (RECIPES / "accelerate").glob("*.yaml")} == {"ddp.yaml", "fsdp2.yaml", "zero2.yaml",
                                                                        "zero3.yaml"}
    covered = {f"qwen2.5-1.5b-gsm8k-{r}.yaml" for r in ("sft", "grpo")} | set(TRAIN) | set(COMPARE) | {
        f"qwen2.5-1.5b-gsm8k-probe-{r}.yaml" for r in ("sft", "grpo")}
    assert names == covered
    assert all(load_yaml(RECIPES / n)["model"] == "Qwen/Qwen2.5-1.5B" for n in names)


@pytest.mark.slow
@pytest.mark.parametrize("regime", ["sft", "grpo"])
def test_record_recipe_runs_on_the_hub_fixture(offline_hub, gsm_dir, tmp_path, monkeypatch, capsys, regime) -> None:
    from gradlens import open_run

    recipe = RECIPES / f"qwen2.5-1.5b-gsm8k-{regime}.yaml"
    monkeypatch.chdir(tmp_path)
    run_recipe(capsys, "record", recipe, gsm_dir, *EVAL)
    own = load_yaml(recipe)
    run = open_run(tmp_path / own["out"])
    record, args = run.meta["config"]["record"], run.meta["config"]["training_args"]
    assert record["model"] == HUB_MODEL_ID and record["regime"] == regime and run.steps == [1]
    assert_kept(own, record, args, [*SIZE[regime], *EVAL])
    assert args["activation_checkpointing"] is True and args["logging_steps"] == own["logging_steps"]
    assert json.loads((tmp_path / own["out"] / "eval.json").read_text())["n"] == 2


TRAIN = {f"train/qwen2.5-1.5b-gsm8k-sparse-{r}.yaml": r for r in ("sft", "grpo")}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TRAIN))
def test_probe_then_train_recipes_run_on_the_hub_fixture(offline_hub, gsm_dir, tmp_path, monkeypatch, capsys,
                                                         name: str) -> None:
    """The probe recipe writes the mask the train recipe names (paths relative to the working directory)."""
    regime = TRAIN[name]
    probe_recipe, train_recipe = RECIPES / f"qwen2.5-1.5b-gsm8k-probe-{regime}.yaml", RECIPES / name
    monkeypatch.chdir(tmp_path)
    run_recipe(capsys, "probe", probe_recipe, gsm_dir)
    probe = json.loads((tmp_path / load_yaml(probe_recipe)["out"] / "probe.json").read_text())
    assert probe["config"]["model"] == HUB_MODEL_ID and probe["config"]["budgets"] == ["1%", "0.1%"]
    run_recipe(capsys, "train", train_recipe, gsm_dir, *EVAL, "--max_steps", "2")  # step 1 is warmup's lr 0
    own = load_yaml(train_recipe)
    info = json.loads((tmp_path / own["out"] / "train.json").read_text())
    assert info["sparse"] and info["config"]["mask"] == own["mask"] and info["config"]["model"] == HUB_MODEL_ID
    assert_kept(own, info["config"], info["training_args"], [*SIZE[regime], *EVAL, "--max_steps"])
    assert 0 < info["b_nonzero"] <= 0.01 * info["b_entries"] + 1  # the 1% mask of the recipe trained, no more


COMPARE = [f"compare/qwen2.5-1.5b-gsm8k-{r}{s}.yaml" for r in ("sft", "grpo") for s in ("", "-small")]


@pytest.mark.slow
@pytest.mark.parametrize("name", COMPARE)
def test_compare_recipes_run_on_the_hub_fixture(offline_hub, gsm_dir, tmp_path, monkeypatch, capsys,
                                                name: str) -> None:
    recipe = RECIPES / name
    own = load_yaml(recipe)
    monkeypatch.chdir(tmp_path)
    sizing = ["--seeds", "0", "--probe_steps", "1", "--n_val", "2", "--n_eval", "2", "--eval_samples", "1",
              "--eval_max_new_tokens", "4", "--full_lrs", str(own["full_lrs"][0]), "--sparse_lrs",
              str(own["sparse_lrs"][0]), "--no-progress", "--no-export"]
    run_recipe(capsys, "compare", recipe, gsm_dir, *sizing)
    out = tmp_path / own["out"]
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["config"]["model"] == HUB_MODEL_ID
    assert_kept(own, prov["config"], prov["config"]["trl"], [*SIZE[own["regimes"][0]], *sizing])
    placement = (out / "placement.csv").read_text()
    assert all(m in placement for m in own["methods"])
