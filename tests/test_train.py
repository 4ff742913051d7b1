"""``gradlens train``: full-B and sparse-B runs on a local model directory (the shipped toy base model), the saved
PEFT adapter against the trained model, masks checked against the adapter before anything is written, the base-weight
drift guard, the recipes, and the GPU check's no-CUDA path."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gradlens import open_run
from gradlens.config import TrainConfig
from gradlens.evaluate import wilson_interval
from gradlens.sparse import MASK_FILE
from gradlens.sparse.masks import check_mask_adapter, load_mask, save_mask
from tests.helpers.cli import assert_one_line_error, gradlens_inproc

ROOT = Path(__file__).resolve().parent.parent
QUIET = ["--logging_steps", "100", "--disable_tqdm", "true", "--n_train", "64"]
# Small GRPO groups, so 3 CPU steps stay quick; a high rate so that 3 steps move every trainable entry visibly.
SETTINGS = {"sft": {"per_device_train_batch_size": 8},
            "grpo": {"per_device_train_batch_size": 16, "num_generations": 4, "max_completion_length": 4}}
PROVENANCE = {"selector": "random", "budget": "10%", "scope": "global", "seed": 0, "source_run": None,
              "scoring_seconds": 0.0}


@pytest.fixture(scope="module")
def model_dir() -> str:
    """The shipped toy base model as a from_pretrained directory: the path a real model would be given by."""
    from gradlens.toy.model import ensure_base_model

    return str(ensure_base_model("tiny"))


@pytest.fixture(scope="module")
def recorded(model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``gradlens train --record`` (full-B, YAML + TRL passthrough, held-out accuracy), then ``gradlens select`` on its
    run: the masks the sparse tests train with, carrying the adapter they were scored on."""
    from gradlens.cli.main import main

    tmp = tmp_path_factory.mktemp("train")
    cfg = tmp / "train.yaml"
    cfg.write_text(f"model: {model_dir}\nmax_steps: 3\nn_eval: 12\nper_device_train_batch_size: 8\n")
    out = tmp / "full"
    assert main(["train", "--config", str(cfg), "--out", str(out), "--record", *QUIET]) == 0
    assert main(["select", str(out / "run"), "--out", str(tmp / "sel"), "--methods", "fisher", "random",
                 "--budgets", "10%"]) == 0
    return {"full": out, "fisher": tmp / "sel" / "masks" / "fisher-10pct.safetensors",
            "random": tmp / "sel" / "masks" / "random-10pct.safetensors"}


def test_full_b_run_writes_adapter_eval_provenance_and_run(recorded: dict[str, Path], model_dir: str) -> None:
    out = recorded["full"]
    info = json.loads((out / "train.json").read_text())
    assert info["steps"] == 3 and info["sparse"] is False and info["mask"] is None and info["regime"] == "sft"
    assert info["config"]["model"] == model_dir and info["training_args"]["per_device_train_batch_size"] == 8
    assert info["device"] == "cpu" and info["model_dtype"] == "float32" and info["prompt_format"] == "plain"
    assert info["task"]["task"] == "addition" and info["versions"]["trl"] and info["versions"]["peft"]
    assert info["b_nonzero"] == info["b_entries"] > 0 and info["warnings"] == []  # full-B: every entry moved
    guard = info["drift_guard"]
    assert guard["checked"] and not guard["drifted"] and guard["max_abs_change"] == 0.0 and guard["layers"] == 14
    assert guard["checksum_begin"] == guard["checksum_end"]
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["n"] == 12 and evaluation["split"] == "heldout"
    assert evaluation["ci95"] == pytest.approx(list(wilson_interval(evaluation["correct"], 12)))
    assert {p.name for p in (out / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    run = open_run(out / "run")  # a recorded run like record's, with the guard's final report in its manifest
    assert run.steps == [1, 2, 3] and run.meta["config"]["record"]["model"] == model_dir
    assert run.meta["config"]["drift_guard"] == guard
    _, meta = load_mask(recorded["fisher"])  # select stored the adapter the mask was scored on
    assert (meta["model"], meta["lora_r"], meta["lora_alpha"], meta["lora_seed"]) == (model_dir, "8", "16", "0")


def _adapter_b(adapter: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k.removeprefix("base_model.model.").removesuffix(".lora_B.weight"): v
            for k, v in load_file(adapter / "adapter_model.safetensors").items() if ".lora_B." in k}


@pytest.mark.parametrize("regime", ["sft", "grpo"])
def test_sparse_b_trains_only_the_mask_and_the_adapter_reproduces_the_model(regime: str, recorded, model_dir: str,
                                                                           tmp_path: Path) -> None:
    from peft import PeftModel

    from gradlens.lora import lora_b_parameters
    from gradlens.models import load_model
    from gradlens.training import train

    mask_path = recorded["fisher" if regime == "sft" else "random"]
    mask, _ = load_mask(mask_path)
    config = TrainConfig(model=model_dir, regime=regime, out=str(tmp_path / "out"), mask=str(mask_path), max_steps=3,
                         learning_rate=1e-2, n_train=64, trl={**SETTINGS[regime], "disable_tqdm": True,
                                                              "logging_steps": 100})
    result = train(config, progress=False)
    assert result.adapter == tmp_path / "out" / "adapter" and (result.adapter / MASK_FILE).is_file()
    saved = _adapter_b(result.adapter)
    trained = {n: p.detach() for n, p in lora_b_parameters(result.trainer.model)}
    assert saved.keys() == mask.keys() == trained.keys()
    for name, keep in mask.items():
        keep = torch.from_numpy(keep)
        assert torch.equal(saved[name], trained[name].cpu())
        assert not saved[name][~keep].any(), name  # exactly 0 outside the mask
        assert saved[name][keep].count_nonzero() == keep.sum(), name  # B starts at 0: every selected entry moved
    k = sum(int(m.sum()) for m in mask.values())
    assert result.info["mask"]["k"] == k == result.info["b_nonzero"] and result.info["sparse"]
    assert not result.info["drift_guard"]["drifted"] and result.info["drift_guard"]["max_abs_change"] == 0.0

    base, tokenizer = load_model(model_dir)
    ids = tokenizer(["37+45=82", "12+34=46", "99+1=100"], add_special_tokens=False, padding=True,
                    return_tensors="pt")
    model = result.trainer.model.eval()
    with torch.no_grad():
        expected = model(**ids).logits
        got = PeftModel.from_pretrained(base, result.adapter).eval()(**ids).logits
        plain = load_model(model_dir)[0].eval()(**ids).logits
    # Same weights, same ops: at most rounding of the accumulated float32 matmuls, relative to the logit scale.
    tol = 64 * torch.finfo(torch.float32).eps * float(expected.abs().max())
    assert (got - expected).abs().max() <= tol
    assert (plain - expected).abs().max() > 1e3 * tol  # and the adapter did change the model


def _mask_for(shapes: dict[str, tuple[int, int]], path: Path, **adapter) -> str:
    rng = np.random.default_rng(0)
    save_mask(path, {n: rng.random(s) < 0.1 for n, s in shapes.items()}, {**PROVENANCE, **adapter})
    return str(path)


@pytest.fixture(scope="module")
def shapes(model_dir: str) -> dict[str, tuple[int, int]]:
    from gradlens.lora import attach_lora, lora_b_parameters
    from gradlens.models import load_model

    return {n: tuple(p.shape) for n, p in lora_b_parameters(attach_lora(load_model(model_dir)[0], r=8))}


@pytest.mark.parametrize(("case", "needles"), [
    ("missing", ["--mask", "nope.safetensors: no such file"]),
    ("shape", ["has shape (3, 8), the adapter's is (64, 8)"]),
    ("module", ["module model.layers.9.mlp.up_proj is not in the adapter"]),
    ("rank", ["lora_r=4, this run has --lora_r 8"]),
    ("seed", ["lora_seed=1, this run has --seed 0"]),
    ("not_a_mask", ["not a gradlens mask"]),
    ("trl_field", ["unknown SFTConfig field(s): no_such_field"]),
    ("resume", ["--resume: gradlens train does not resume"]),
    ("steps", ["max_steps must be >= 1"]),
    ("out", ["exists and is not an empty directory"]),
])
def test_bad_input_is_one_line_before_anything_is_written(case: str, needles: list[str], shapes, model_dir: str,
                                                          tmp_path: Path, capsys) -> None:
    from safetensors.numpy import save_file

    first = next(iter(shapes))
    adapter = {"model": model_dir, "lora_r": 8, "lora_alpha": 16, "lora_seed": 0}
    path = tmp_path / "m.safetensors"
    masks = {
        "missing": lambda: str(tmp_path / "nope.safetensors"),
        "shape": lambda: _mask_for({**shapes, first: (3, 8)}, path, **adapter),
        "module": lambda: _mask_for({**shapes, "model.layers.9.mlp.up_proj": (256, 8)}, path, **adapter),
        "rank": lambda: _mask_for({n: (d, 4) for n, (d, _) in shapes.items()}, path, **{**adapter, "lora_r": 4}),
        "seed": lambda: _mask_for(shapes, path, **{**adapter, "lora_seed": 1}),
        "not_a_mask": lambda: save_file({"w": np.zeros((2, 2), dtype=np.float32)}, path) or str(path),
    }
    flags = {"trl_field": ["--no_such_field", "1"], "resume": ["--resume"], "steps": ["--max_steps", "0"]}
    extra = flags.get(case, [])
    out = tmp_path / "out"
    if case == "out":
        out.mkdir()
        (out / "something").write_text("x")
    argv = ["train", "--model", model_dir, "--out", str(out), *extra, *QUIET]
    if case in masks:
        argv += ["--mask", masks[case]()]
    assert_one_line_error(gradlens_inproc(capsys, *argv), *needles)
    assert (not out.exists()) if case != "out" else sorted(p.name for p in out.iterdir()) == ["something"]


def test_a_mask_without_adapter_metadata_trains_with_a_warning(shapes, model_dir: str, tmp_path: Path,
                                                               capsys) -> None:
    mask = _mask_for(shapes, tmp_path / "old.safetensors")
    out = tmp_path / "out"
    proc = gradlens_inproc(capsys, "train", "--model", model_dir, "--out", str(out), "--mask", mask,
                           "--max_steps", "1", *QUIET)
    assert proc.returncode == 0, proc.stderr[-2000:]
    warned = [ln for ln in proc.stderr.splitlines() if ln.startswith("gradlens train: warning:")]
    assert len(warned) == 1 and "cannot be checked" in warned[0], proc.stderr[-2000:]
    assert "model, lora_r, lora_alpha, lora_seed" in warned[0]
    assert json.loads((out / "train.json").read_text())["warnings"] == [warned[0].split("warning: ", 1)[1]]
    assert "sparse-B" in proc.stdout


def test_check_mask_adapter_names_what_differs() -> None:
    adapter = {"model": "m", "lora_r": 8, "lora_alpha": 16, "lora_seed": 0}
    meta = {"model": "m", "lora_r": "8", "lora_alpha": "16", "lora_seed": "0"}
    assert check_mask_adapter(meta, adapter) == []
    notes = check_mask_adapter({**meta, "model": "other", "lora_alpha": "32"}, adapter)
    assert len(notes) == 2 and "lora_alpha=32" in notes[0] and "'other'" in notes[1]
    with pytest.raises(Exception, match="lora_seed is 'x', not an integer"):
        check_mask_adapter({**meta, "lora_seed": "x"}, adapter)


# --------------------------------------------------------------------------------------------------------------------
# The drift guard


def test_drift_guard_catches_a_base_weight_changed_in_place_mid_run(model_dir: str, tmp_path: Path) -> None:
    from transformers import TrainerCallback

    from gradlens.drift import base_weights
    from gradlens.training import train

    seen: dict[str, torch.Tensor] = {}

    class NudgeBaseWeight(TrainerCallback):
        """At step 2, add 0.25 to one entry of one adapted layer's base weight, in place, as a merge would."""

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                name, w = list(base_weights(model))[5]
                seen["name"], seen["before"] = name, w.detach().clone()
                with torch.no_grad():
                    w[3, 7] += 0.25
                seen["after"] = w.detach().clone()

    config = TrainConfig(model=model_dir, out=str(tmp_path / "out"), max_steps=3, n_train=64, record=True,
                         trl={**SETTINGS["sft"], "disable_tqdm": True, "logging_steps": 100})
    with pytest.warns(UserWarning, match="base weights of the adapted layers changed during training"):
        result = train(config, callbacks=[NudgeBaseWeight()], progress=False)
    report = result.info["drift_guard"]
    assert report["drifted"] and report["changed_layers"] == 1 and report["first_changed"] == seen["name"]
    assert report["max_abs_change"] == float((seen["after"] - seen["before"]).abs().max()) > 0.2
    assert report["checksum_end"] != report["checksum_begin"]
    assert any("trl issue 6688" in w for w in result.info["warnings"])
    assert json.loads((tmp_path / "out" / "train.json").read_text())["drift_guard"] == report
    assert open_run(tmp_path / "out" / "run").meta["config"]["drift_guard"] == report


@pytest.mark.parametrize("keep_copy", [True, False])
def test_drift_guard_sees_bf16_merge_unmerge_cycles(keep_copy: bool) -> None:
    """What TRL's vLLM weight sync does per sync (merge_adapter, unmerge_adapter) drifts bf16 base weights."""
    from gradlens.drift import DriftGuard
    from gradlens.lora import attach_lora, lora_b_parameters
    from gradlens.models import load_model

    model = attach_lora(load_model("toy:tiny")[0].to(torch.bfloat16))
    with torch.no_grad():
        for _, p in lora_b_parameters(model):
            p.normal_(0, 0.05)
    guard = DriftGuard(keep_copy=keep_copy)
    guard.start(model)
    same = guard.finish(model)
    assert not same["drifted"] and same["dtype"] == "bfloat16"
    guard.start(model)
    for _ in range(4):
        model.merge_adapter()
        model.unmerge_adapter()
    with pytest.warns(UserWarning, match="bfloat16 drifts them"):
        report = guard.finish(model)
    assert report["drifted"]
    assert (report["max_abs_change"] > 0) if keep_copy else report["max_abs_change"] is None


# --------------------------------------------------------------------------------------------------------------------
# Recipes and the GPU check


COMPARE_RECIPES = sorted((ROOT / "recipes" / "compare").glob("*.yaml"))
TRAIN_RECIPES = sorted((ROOT / "recipes" / "train").glob("*.yaml"))


@pytest.mark.parametrize("recipe", COMPARE_RECIPES, ids=[r.stem for r in COMPARE_RECIPES])
def test_compare_recipes_hold_the_paper_table(recipe: Path) -> None:
    from gradlens.cli.dataclass_args import config_from_args
    from gradlens.config import CompareConfig
    from gradlens.training.settings import check_overrides, config_fields

    config = config_from_args(CompareConfig, argparse.Namespace(config=recipe), extra_field="trl")
    assert config.model == "Qwen/Qwen2.5-1.5B" and config.task == "gsm8k" and config.lora_r == 16
    (regime,) = config.regimes
    assert regime in recipe.stem
    check_overrides(regime, config.trl)  # every TRL key is a field of the regime's config (none silently dropped)
    assert set(config.trl) <= set(config_fields(regime))
    assert set(config.methods) == {"random", "random_matched", "sign", "fisher"} and config.max_steps == 300
    if "small" in recipe.stem:
        assert len(config.seeds) == 1 and config.budgets == ["1%"]
    else:
        assert config.seeds == [0, 1, 2] and sorted(config.budgets) == ["0.1%", "1%"]
    if regime == "grpo":
        trl = config.trl
        assert trl["generation_batch_size"] == trl["per_device_train_batch_size"] * trl["gradient_accumulation_steps"]


@pytest.mark.parametrize("recipe", TRAIN_RECIPES, ids=[r.stem for r in TRAIN_RECIPES])
def test_train_recipes_load_and_match_their_probe(recipe: Path) -> None:
    from gradlens.cli.dataclass_args import config_from_args
    from gradlens.config import ProbeConfig
    from gradlens.training.settings import check_overrides

    config = config_from_args(TrainConfig, argparse.Namespace(config=recipe), extra_field="trl")
    check_overrides(config.regime, config.trl)
    probe = config_from_args(ProbeConfig, argparse.Namespace(
        config=ROOT / "recipes" / f"qwen2.5-1.5b-gsm8k-probe-{config.regime}.yaml"), extra_field="trl")
    assert config.mask.startswith(probe.out + "/masks/")  # the probe recipe's mask, for the same adapter
    assert (config.model, config.lora_r, config.lora_alpha, config.seed) == (
        probe.model, probe.lora_r, probe.lora_alpha, probe.seed)
    assert probe.train_steps == config.max_steps


def test_recipe_folders_are_not_empty() -> None:
    assert len(COMPARE_RECIPES) == 4 and len(TRAIN_RECIPES) == 2


def test_gpu_check_without_cuda_says_so_and_exits_2(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: run the check itself")
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and not out.exists(), proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA" in lines[0] and "Traceback" not in proc.stderr, proc.stderr



def test_gpu_check_arguments(monkeypatch: pytest.MonkeyPatch, capsys, load_script) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the benchmarks import their _common helpers
    gpu_check = load_script("benchmarks/gpu_check.py")
    args = gpu_check.parse_args(["--out", "x.json"])
    assert args.out == Path("x.json") and args.steps >= 1 and not args.cpu and args.layers == 28
    for bad in (["--steps", "0"], ["--record-steps", "-1"], ["--layers", "x"], ["--nope"]):
        with pytest.raises(SystemExit) as exit_info:
            gpu_check.parse_args(bad)
        assert exit_info.value.code == 2 and bad[0] in capsys.readouterr().err


def test_a_run_leaves_the_process_group_it_joined_and_not_one_it_was_given(model_dir: str, tmp_path: Path) -> None:
    """Under a launcher (here one process with torchrun's variables) accelerate joins a gloo group during the run;
    ``main`` destroys it after a finished run, while Python is whole. A group the caller joined before is theirs."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**__import__("os").environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    script = f"""
import sys, torch.distributed as dist
from gradlens.cli.main import main
given = sys.argv[1] == "given"
if given:
    dist.init_process_group("gloo")
code = main(["train", "--model", {model_dir!r}, "--out", sys.argv[2], "--max_steps", "1", "--n_eval", "0",
             "--per_device_train_batch_size", "8", *{QUIET!r}])
print("RESULT", code, dist.is_initialized(), dist.get_world_size() if dist.is_initialized() else 0)
"""
    for case, expected in (("joined", "RESULT 0 False 0"), ("given", "RESULT 0 True 1")):
        done = subprocess.run([sys.executable, "-c", script, case, str(tmp_path / case)], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert expected in done.stdout, (case, done.stdout[-1000:], done.stderr[-2000:])
