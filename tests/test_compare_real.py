"""``gradlens compare`` on a model it has never seen (a local from_pretrained directory) and a GSM8K-style file,
end to end through the task seam: every output file, rows for every method, the task in the provenance."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

ROWS = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
         "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}
        for a, b in [(3, 4), (5, 2), (7, 1), (2, 2), (6, 3), (4, 4), (1, 8), (9, 0), (3, 3), (5, 5), (2, 7), (8, 1)]]


@pytest.fixture(scope="module")
def local_world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Qwen2 saved with ``save_pretrained`` (never a toy preset name) and a GSM8K-format JSONL pair."""
    import torch
    import transformers

    from gradlens.toy.tokenizer import build_char_tokenizer

    root = tmp_path_factory.mktemp("compare_real")
    tok = build_char_tokenizer()
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=False))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(root / "my-checkpoint")
    tok.save_pretrained(root / "my-checkpoint")
    data = root / "gsm"
    data.mkdir()
    for split, rows in (("train", ROWS), ("test", ROWS[:3])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "my-checkpoint", data


@pytest.mark.slow
def test_compare_on_a_local_model_and_gsm8k_files(local_world, tmp_path: Path, capsys) -> None:
    from gradlens.cli.main import main

    model, data = local_world
    out = tmp_path / "cmp"
    common = ["--model", str(model), "--task", f"gsm8k:{data}", "--methods", "random", "sign", "--budgets", "10%",
              "--seeds", "0", "--max_steps", "2", "--probe_steps", "2", "--full_lrs", "1e-2", "--sparse_lrs", "1e-1",
              "--n_val", "2", "--n_eval", "3", "--eval_samples", "0", "--eval_max_new_tokens", "6", "--lora_r", "2",
              "--no-progress", "--no-export", "--per_device_train_batch_size", "4", "--num_generations", "4",
              "--max_completion_length", "6"]
    # GRPO on a random model: no completion ever earns the reward, so the probe's gradients are all zero and a
    # "sign" mask would be index order. compare says so in one line instead of training on it.
    assert main(["compare", "--out", str(tmp_path / "grpo"), "--regimes", "grpo", *common]) == 2
    assert "every entry has the same 'sign' score" in capsys.readouterr().err
    rc = main(["compare", "--model", str(model), "--task", f"gsm8k:{data}", "--out", str(out),
               "--regimes", "sft", "--methods", "random", "sign", "--budgets", "10%", "--seeds", "0",
               "--max_steps", "2", "--probe_steps", "2", "--full_lrs", "1e-2", "--sparse_lrs", "1e-1", "--n_val", "2",
               "--n_eval", "3", "--eval_samples", "0", "--eval_max_new_tokens", "6", "--lora_r", "2",
               "--no-progress", "--no-export", "--per_device_train_batch_size", "4", "--max_length", "128"])
    assert rc == 0, capsys.readouterr().err[-3000:]
    for name in ("placement.csv", "summary.csv", "where.csv", "probes.csv", "placement.png", "provenance.json"):
        assert (out / name).is_file(), name
    assert not (out / "sweep.csv").exists()  # one rate each: nothing swept
    placement = pd.read_csv(out / "placement.csv", dtype={"budget": str})
    assert {(r, m) for r, m in zip(placement.regime, placement.method, strict=True)} == {
        ("sft", m) for m in ("base", "full", "random", "sign")}
    assert (placement.n_prompts == 3).all()  # the eval split's first n_eval rows, never training rows
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["task"]["task"] == f"gsm8k:{data}" and prov["task"]["eval_split"] == "test"
    from gradlens.models import load_model
    from gradlens.tasks.prompt_format import resolve_prompt_format

    loaded, tok = load_model(str(model))
    fmt, reason = resolve_prompt_format("auto", str(model), loaded, tok)  # decided from the tokenizer, not the name
    assert (prov["task"]["prompt_format"], prov["task"]["prompt_format_reason"]) == (fmt, reason)
    assert prov["config"]["model"] == str(model)
    probe = json.loads((out / "probes" / "sft-seed0" / "probe.json").read_text())
    assert probe["config"]["task"] == f"gsm8k:{data}" and probe["config"]["model"] == str(model)


def test_compare_splits_validation_from_the_train_split_and_heldout_from_the_eval_split(local_world) -> None:
    from gradlens.compare.runs import split_task
    from gradlens.errors import GradlensError
    from gradlens.tasks.gsm8k import MathTask

    _, data = local_world
    task = MathTask.from_spec(f"gsm8k:{data}")
    splits = split_task(task, n_val=3, n_eval=2)
    train_q = [r["question"] for r in ROWS]
    assert len(splits.train) == len(ROWS) - 3 and len(splits.val) == 3 and len(splits.heldout) == 2
    assert [task.prompt(q) for q in train_q[-3:]] == list(splits.val["prompt"])  # held back, not trained on
    assert set(splits.train["prompt"]).isdisjoint(splits.val["prompt"])
    assert list(splits.heldout["answer"]) == ["7", "7"]  # the test file's rows
    with pytest.raises(GradlensError, match="n_eval must be <= 3"):
        split_task(task, n_val=2, n_eval=4)
    with pytest.raises(GradlensError, match="n_val=6 leaves too little"):
        split_task(task, n_val=6, n_eval=1)
