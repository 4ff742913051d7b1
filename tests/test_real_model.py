"""The real-model path offline: models saved by the test (Llama and Qwen2 layouts, a byte-level BPE tokenizer trained
in memory with a Qwen-style chat template) go through ``gradlens record`` (SFT and GRPO on a GSM8K-format file) and
``gradlens analyze`` via ``--model PATH``; the prompt format decided from tokenizer and configs, not the name; default
LoRA targets per architecture; one-line errors for data, models and settings that lack what is expected."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from gradlens import open_run
from gradlens.modules import ALL_PROJECTIONS
from tests.helpers.cli import assert_one_line_error, gradlens_inproc
from tests.helpers.models import (
    END_OF_TEXT,
    ROWS,
    TURN_END,
    build_bpe_tokenizer,
    model_config,
    save_model,
    teach_answer_format,
)

PROJ_LABELS = ["down", "gate", "k", "o", "q", "up", "v"]
QUIET = ["--logging_steps", "100", "--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Llama-layout chat-trained model, a Qwen2-layout base model, a GPT-2 model and a GSM8K JSONL file, on disk.
    The names mislead on purpose (the base model's says "chat"): the prompt format must follow tokenizer and configs.
    """
    import torch
    import transformers

    root = tmp_path_factory.mktemp("real")
    chat_tok, base_tok = build_bpe_tokenizer(TURN_END), build_bpe_tokenizer(END_OF_TEXT)
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(model_config("llama", chat_tok))
    qwen2 = transformers.Qwen2ForCausalLM(model_config("qwen2", base_tok))
    teach_answer_format(llama, chat_tok, chat=True)
    teach_answer_format(qwen2, base_tok, chat=False)
    out = {
        "llama": save_model(llama, chat_tok, root / "my-sft-checkpoint"),
        "qwen2": save_model(qwen2, base_tok, root / "tiny-qwen2-chat"),
        "gpt2": save_model(transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=len(base_tok), n_embd=32, n_layer=2, n_head=4, n_positions=256)), base_tok, root / "tiny-gpt2"),
    }
    data = root / "gsm"
    data.mkdir()
    for split, rows in (("train", ROWS), ("test", ROWS[:2])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out["data"] = data
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "prompt_format"), [("llama", "chat"), ("qwen2", "plain")])
def test_record_sft_and_grpo_then_analyze(world, tmp_path: Path, capsys, arch: str, prompt_format: str) -> None:
    model, task = str(world[arch]), f"gsm8k:{world['data']}"
    runs = {}
    for regime, extra in (("sft", ["--per_device_train_batch_size", "2", "--max_length", "256"]),
                          ("grpo", ["--per_device_train_batch_size", "8", "--num_generations", "4",
                                    "--max_completion_length", "10", "--format_reward", "--n_eval", "2",
                                    "--eval_max_new_tokens", "10"])):
        runs[regime] = tmp_path / regime
        proc = gradlens_inproc(capsys, "record", "--regime", regime, "--model", model, "--task", task, "--out",
                       str(runs[regime]), "--max_steps", "2", "--lora_r", "4", "--learning_rate", "1e-2", *QUIET,
                       *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"gradlens record: {runs[regime]}: 2 steps" in proc.stdout
        run = open_run(runs[regime])
        assert run.steps == [1, 2] and len(run.modules) == 7 * 2
        assert sorted({s.proj for s in run.specs}) == PROJ_LABELS and {s.layer for s in run.specs} == {0, 1}
        config = run.meta["config"]
        assert config["prompt_format"] == prompt_format and config["device"] == "cpu"
        assert config["prompt_format_reason"] in proc.stdout and f"prompt format {prompt_format}" in proc.stdout
        assert config["model_dtype"] == "float32" and config["record"]["model"] == model
        for step in run.meta["steps"]:
            assert math.isfinite(step["loss"]) and step["b_grad_norm"] >= 0
        assert all(step["b_grad_norm"] > 0 for step in run.meta["steps"])  # GRPO: rewards vary in groups
    grpo = open_run(runs["grpo"]).meta
    assert all(0.0 <= s["reward_mean"] <= 2.0 for s in grpo["steps"])  # correctness + format
    evaluation = json.loads((runs["grpo"] / "eval.json").read_text())
    assert evaluation["n"] == 2 and evaluation["split"] == "test" and 0.0 <= evaluation["accuracy"] <= 1.0
    assert "greedy accuracy" in proc.stdout

    out = tmp_path / "analysis"
    proc = gradlens_inproc(capsys, "analyze", str(runs["sft"]), str(runs["grpo"]), "--out", str(out), "--no-figures",
                   "--no-progress", "--lags", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proj = pd.read_csv(out / "proj.csv")
    assert sorted(proj["proj"].unique()) == PROJ_LABELS and len(proj) == 2 * 7
    modules = pd.read_csv(out / "modules.csv")
    assert set(modules.loc[modules["proj"] == "gate", "module"]) >= {"model.layers.0.mlp.gate_proj"}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "gemma"])
def test_default_lora_targets_and_labels_per_architecture(char_tokenizer, arch: str) -> None:
    import transformers

    from gradlens.lora import attach_lora, default_lora_targets, lora_b_parameters
    from gradlens.store import ModuleSpec

    model = transformers.AutoModelForCausalLM.from_config(model_config(arch, char_tokenizer))
    assert default_lora_targets(model) == list(ALL_PROJECTIONS)
    peft_model = attach_lora(model, r=2)
    assert default_lora_targets(peft_model) == list(ALL_PROJECTIONS)  # e.g. for a second (GRPO reference) adapter
    specs = [ModuleSpec.from_name(n, p.shape) for n, p in lora_b_parameters(peft_model)]
    assert len(specs) == 7 * 2 and {s.layer for s in specs} == {0, 1}
    assert sorted({s.proj for s in specs}) == PROJ_LABELS
    for s in specs:  # each label sits on the module it names, with that module's output width
        assert s.name.endswith(f".{s.proj}_proj")
    assert not any("lm_head" in s.name for s in specs)


def test_default_targets_follow_other_layouts(world) -> None:
    from gradlens.lora import attach_lora, default_lora_targets, lora_b_parameters
    from gradlens.models import load_model

    model, _ = load_model(str(world["gpt2"]))
    assert default_lora_targets(model) == ["c_attn", "c_proj", "c_fc"]  # GPT-2's Conv1D projections
    assert len(list(lora_b_parameters(attach_lora(model, r=2)))) == 4 * 2


def test_dtype_and_device_defaults_and_overrides(world) -> None:
    import torch

    from gradlens.models import load_model, resolve_device, resolve_dtype
    from gradlens.training.settings import device_settings

    device = resolve_device("auto")
    assert device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", "cpu", "Qwen/Qwen2.5-1.5B") == "float32"
    assert resolve_dtype("auto", "cuda", "toy:tiny") == "float32"
    assert resolve_dtype("bfloat16", "cpu", "x") == "bfloat16"
    assert device_settings("cpu", "float32") == {"use_cpu": True}
    assert device_settings("cuda", "bfloat16") == {"bf16": True}
    model, _ = load_model(str(world["qwen2"]), "bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    toy, _ = load_model("toy:tiny", resolve_dtype("bfloat16", "cpu", "toy:tiny"))  # asked for: what the manifest says
    assert {p.dtype for p in toy.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_model("toy:tiny")[0].parameters()} == {torch.float32}


def test_missing_columns_and_projections_are_one_line_errors(world, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "1+1?", "solution": "#### 2"}) + "\n")
    common = ["record", "--regime", "sft", "--max_steps", "1", *QUIET]
    line = assert_one_line_error(
        gradlens_inproc(capsys, *common, "--model", str(world["qwen2"]), "--task", f"gsm8k:{bad}", "--out",
                str(tmp_path / "a")), str(bad), "question", "answer", "problem, solution", "--question_column")
    assert "lacks column(s) question, answer" in line
    assert_one_line_error(
        gradlens_inproc(capsys, *common, "--model", str(world["gpt2"]), "--task", f"gsm8k:{world['data']}",
                "--lora_target_modules", "q_proj", "v_proj", "--out", str(tmp_path / "b")),
        "GPT2LMHeadModel", "q_proj, v_proj", "c_attn")
    assert_one_line_error(
        gradlens_inproc(capsys, *common, "--model", str(world["qwen2"]), "--task", f"gsm8k:{world['data']}",
                "--eval_split", "validation", "--n_eval", "1", "--out", str(tmp_path / "c")),
        "no split 'validation'", "test", "train")


def test_a_model_without_its_tokenizer_is_a_one_line_error(world, tmp_path: Path, capsys) -> None:
    """Without tokenizer files AutoTokenizer builds a one-token tokenizer; training on it would see empty text."""
    import shutil

    from transformers import AutoTokenizer

    from gradlens.errors import GradlensError

    bare = tmp_path / "bare"
    shutil.copytree(world["qwen2"], bare, ignore=shutil.ignore_patterns("tokenizer*", "chat_template*"))
    assert_one_line_error(
        gradlens_inproc(capsys, "record", "--regime", "sft", "--model", str(bare), "--task", f"gsm8k:{world['data']}",
                        "--out", str(tmp_path / "run"), "--max_steps", "1", *QUIET),
        f"model directory {bare} has no tokenizer", "tokenizer.json", "save_pretrained")
    assert not (tmp_path / "run").exists()
    from gradlens.models import check_tokenizer, load_model_and_tokenizer  # here: the old code failed above

    degenerate = AutoTokenizer.from_pretrained(bare)  # what the model loader used to train on
    assert len(degenerate) == 1
    with pytest.raises(GradlensError, match=r"^the tokenizer of x has no ordinary tokens, only 1 special one"):
        check_tokenizer(degenerate, "x")
    check_tokenizer(build_bpe_tokenizer(), "x")  # the control: a real tokenizer passes

    small = tmp_path / "small"
    shutil.copytree(world["qwen2"], small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
    with pytest.raises(GradlensError, match=r"has \d+ tokens but the model embeds only 100"):
        load_model_and_tokenizer(small, ignore_mismatched_sizes=True)


def test_use_vllm_without_vllm_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    import importlib.util

    from gradlens.training.settings import build_trl_config

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    assert_one_line_error(
        gradlens_inproc(capsys, "record", "--regime", "grpo", "--out", str(tmp_path / "run"), "--max_steps", "1",
                        "--use_vllm", "true", *QUIET), "--use_vllm true: vLLM is not installed", "pip install vllm")
    assert not (tmp_path / "run").exists()
    assert build_trl_config("grpo", str(tmp_path / "t"), {"use_vllm": False}).use_vllm is False  # the control


@pytest.mark.parametrize(("regime", "trl_default", "said"), [("sft", 2e-5, "2e-5 SFT"), ("grpo", 1e-6, "1e-6 GRPO")])
def test_real_models_train_at_trl_default_learning_rate(world, tmp_path: Path, regime: str, trl_default: float,
                                                        said: str) -> None:
    """Without --learning_rate a math or prompt-file task trains at TRL's own default, as the flag's help says; the
    toy addition task at its own rate."""
    from gradlens.config import RecordConfig
    from gradlens.tasks import load_task
    from gradlens.training.settings import build_trl_config, default_learning_rate, trl_settings

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(4)))
    assert said in RecordConfig.__dataclass_fields__["learning_rate"].metadata["help"]
    for task in (f"gsm8k:{world['data']}", str(rows)):
        config = RecordConfig(model=str(world["qwen2"]), task=task, regime=regime, out=str(tmp_path / "run"))
        settings = trl_settings(config, load_task(config))
        assert "learning_rate" not in settings
        assert build_trl_config(regime, str(tmp_path / "t"), settings).learning_rate == trl_default
    assert default_learning_rate(regime) == trl_default
    for lr, want in ((None, {"sft": 2e-3, "grpo": 1e-3}[regime]), (0.5, 0.5)):  # addition's own rate; the flag's
        toy = RecordConfig(regime=regime, out="x", learning_rate=lr)
        assert trl_settings(toy, load_task(toy))["learning_rate"] == want


def _begin(tmp_path: Path, model, args) -> None:
    """``on_train_begin`` of a fresh recorder, as the Trainer calls it."""
    from transformers import TrainerControl, TrainerState

    from gradlens.record.recorder import GradientRecorder

    recorder = GradientRecorder(tmp_path / "run")
    try:
        recorder.on_train_begin(args, TrainerState(), TrainerControl(), model=model)
    finally:
        recorder.close()


def test_recorder_refuses_fsdp1_and_deepspeed_zero_naming_fsdp2(make_tiny_model, tmp_path: Path, monkeypatch) -> None:
    """FSDP1 keeps gradients in the engine's flat buffers: a one-line refusal that names FSDP2. DeepSpeed is read
    through its engine (ZeRO-1/2/3, tests/test_zero.py): without one to read, a one-line refusal that names those and
    FSDP2."""
    from transformers import TrainingArguments

    from gradlens.errors import GradlensError
    from gradlens.lora import attach_lora

    model = attach_lora(make_tiny_model(), r=2)
    plain = TrainingArguments(output_dir=str(tmp_path / "t"), use_cpu=True, report_to="none")
    _begin(tmp_path / "ok", model, plain)  # the control: a single process records
    assert (tmp_path / "ok" / "run" / "manifest.json").is_file()

    fsdp1 = TrainingArguments(output_dir=str(tmp_path / "t"), use_cpu=True, report_to="none", fsdp=True,
                              fsdp_config={"version": 1})
    with pytest.raises(GradlensError, match=r"^FSDP1 shards gradients.*with FSDP2 instead \(fsdp_version: 2") as e:
        _begin(tmp_path / "fsdp", model, fsdp1)
    assert "\n" not in str(e.value)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for an FSDP config without
    monkeypatch.delenv("FSDP_VERSION", raising=False)  # fsdp_version: FSDP1
    with pytest.raises(GradlensError, match="^FSDP1 shards gradients"):
        _begin(tmp_path / "fsdp", model, plain)
    monkeypatch.setenv("FSDP_VERSION", "2")  # FSDP2 is recorded (here the model is not sharded: whole gradients)
    _begin(tmp_path / "fsdp2", model, plain)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` sets for a DeepSpeed config
    with pytest.raises(GradlensError, match="^DeepSpeed is on but the recorder found no DeepSpeed engine.*ZeRO-1/2/3"
                       ".*FSDP2") as e:
        _begin(tmp_path / "ds", model, plain)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "fsdp" / "run").exists() and not (tmp_path / "ds" / "run").exists()  # nothing recorded


def test_sparse_b_refuses_fsdp1_and_deepspeed_zero_naming_fsdp2(make_tiny_model, tmp_path: Path, monkeypatch) -> None:
    """Sparse-B training under an engine whose gradients it cannot mask whole is refused in one line, not run with
    masked entries that may move; FSDP2 and a single process apply the mask."""
    import numpy as np
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from gradlens.errors import GradlensError
    from gradlens.lora import attach_lora, require_lora
    from gradlens.sparse.callback import SparseBCallback

    model = attach_lora(make_tiny_model(), r=2)
    mask = {name: np.ones(tuple(p.shape), dtype=bool) for name, p in require_lora(model)}
    args = TrainingArguments(output_dir=str(tmp_path / "t"), use_cpu=True, report_to="none")

    def begin() -> None:
        callback = SparseBCallback(mask)
        callback.on_train_begin(args, TrainerState(), TrainerControl(), model=model)
        callback.on_train_end(args, TrainerState(), TrainerControl())

    begin()  # the control: one process applies the mask
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(GradlensError, match="^DeepSpeed shards gradients.*sparse-B mask.*shard with FSDP2") as e:
        begin()
    assert "\n" not in str(e.value)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(GradlensError, match="^FSDP1 shards gradients.*sparse-B mask"):
        begin()
    monkeypatch.setenv("FSDP_VERSION", "2")
    begin()


def test_recorder_records_a_fully_sharded_fsdp2_model_on_one_process(make_tiny_model, tmp_path: Path,
                                                                    monkeypatch) -> None:
    """FSDP2 (``fully_shard``) on one gloo process: lora_B becomes a DTensor whatever the arguments say; the recorder
    takes it (its block is the whole weight) and says FSDP2 in the manifest."""
    import socket

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import TrainingArguments

    from gradlens.lora import attach_lora
    from gradlens.store import open_run

    model = attach_lora(make_tiny_model(), r=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        plain = TrainingArguments(output_dir=str(tmp_path / "t"), use_cpu=True, report_to="none")
        _begin(tmp_path, model, plain)
    finally:
        dist.destroy_process_group()
    assert open_run(tmp_path / "run").meta["config"]["recorder"]["sharding"] == "FSDP2"


RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipes_hold_the_paper_setting(recipe: Path) -> None:
    import argparse

    from gradlens.cli.dataclass_args import config_from_args
    from gradlens.config import ProbeConfig, RecordConfig
    from gradlens.training.settings import check_overrides

    cls = ProbeConfig if "probe" in recipe.stem else RecordConfig
    config = config_from_args(cls, argparse.Namespace(config=recipe), extra_field="trl")
    check_overrides(config.regime, config.trl)  # every TRL key is a field of the regime's config
    assert config.model == "Qwen/Qwen2.5-1.5B" and config.task == "gsm8k" and config.regime in recipe.stem
    assert config.lora_r == 16 and config.lora_target_modules is None  # every projection of the architecture
    if cls is ProbeConfig:
        assert config.budgets == ["1%", "0.1%"] and not config.save_raw
    if config.regime == "grpo":
        trl = config.trl
        assert trl["generation_batch_size"] == trl["per_device_train_batch_size"] * trl["gradient_accumulation_steps"]
        assert "use_vllm" in trl


@pytest.mark.slow
def test_grpo_recipe_runs_scaled_down(world, tmp_path: Path, capsys) -> None:
    """The GRPO recipe as written (gradient checkpointing, generation batch, accumulation), on the tiny model."""
    out = tmp_path / "run"
    proc = gradlens_inproc(capsys, "record", "--config", str(Path(__file__).parent.parent / "recipes" /
                                                      "qwen2.5-1.5b-gsm8k-grpo.yaml"),
                   "--model", str(world["qwen2"]), "--task", f"gsm8k:{world['data']}", "--out", str(out),
                   "--max_steps", "1", "--n_eval", "0", "--lora_r", "2", "--per_device_train_batch_size", "4",
                   "--gradient_accumulation_steps", "2", "--generation_batch_size", "8", "--num_generations", "4",
                   "--max_completion_length", "10", "--dtype", "float32", "--format_reward", *QUIET)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = open_run(out)
    args = run.meta["config"]["training_args"]
    assert args["activation_checkpointing"] is True and args["gradient_accumulation_steps"] == 2
    assert run.meta["steps"][0]["b_grad_norm"] > 0  # gradients reach lora_B through checkpointed layers
