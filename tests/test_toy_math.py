"""The toy:math world: GSM8K-format word problems read by the unchanged gsm8k task, the shipped 4-layer Llama on real
generated text (reward, run-on cut, batched evaluation), short SFT and GRPO records with a learning signal, and the
shortened pretraining recipe against the shipped weights' fingerprints."""

from __future__ import annotations

import json
import re
import warnings
from fractions import Fraction
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from gradlens.config import RecordConfig
from gradlens.evaluate import generate_answers
from gradlens.tasks import load_task
from gradlens.tasks.gsm8k import MathTask, correctness_reward, own_turn
from gradlens.toy.math_data import SPLIT_FILES, is_heldout, unique_problems, write_data
from gradlens.toy.model import ensure_base_model, shipped_model_path
from gradlens.toy_presets import MATH_DATA_DIR, MATH_EVAL_MAX_NEW_TOKENS, MATH_TRL_DEFAULTS

ANNOTATION = re.compile(r"<<([^=<>]+)=([^<>]+)>>")


def rows(split: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in (MATH_DATA_DIR / SPLIT_FILES[split]).read_text().splitlines()]


def final_number(completion: str) -> int | None:
    """An independent reading of a completion's answer: the integer after the first '####' of the text before any
    run-on 'Question:'."""
    text = completion.split("Question:", 1)[0]
    match = re.search(r"####\s*(-?\d+)", text)
    return int(match.group(1)) if match else None


@pytest.fixture(scope="module")
def shipped():
    path = ensure_base_model("math", 0)
    return path, AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def task() -> MathTask:
    return load_task(RecordConfig(model="toy:math", out="unused"))


# --- data ----------------------------------------------------------------------------------------------------------


def test_toy_math_defaults_to_its_data_through_the_gsm8k_task(task):
    config = RecordConfig(model="toy:math", out="unused")
    assert config.task == f"gsm8k:{MATH_DATA_DIR}" and config.eval_max_new_tokens == MATH_EVAL_MAX_NEW_TOKENS
    assert type(task) is MathTask and task.describe()["task"] == f"gsm8k:{MATH_DATA_DIR}"
    assert task.trl_defaults("grpo") == MATH_TRL_DEFAULTS["grpo"]
    assert RecordConfig(model="toy:math", out="x", task="addition").task == "addition"  # an explicit task wins
    assert RecordConfig(model="toy:tiny", out="x").task == "addition"
    assert load_task(RecordConfig(model="toy:tiny", out="x", task=f"gsm8k:{MATH_DATA_DIR}")).trl_defaults("sft") == {}


def test_data_loads_through_the_gsm8k_task_and_gold_answers_parse(task):
    train, test = task.dataset("train"), task.dataset("test")
    assert (len(train), len(test)) == (len(rows("train")), len(rows("test")))
    for row, example in zip(rows("test"), test, strict=True):
        # every calculator annotation is right, and the gold answer is the last one's result
        steps = ANNOTATION.findall(row["answer"])
        assert 1 <= len(steps) <= 4
        for expr, result in steps:
            a, op, b = re.fullmatch(r"(\d+)([-+*/])(\d+)", expr).groups()
            exact = {"+": Fraction(a) + Fraction(b), "-": Fraction(a) - Fraction(b), "*": Fraction(a) * Fraction(b),
                     "/": Fraction(a) / Fraction(b)}[op]
            assert exact == Fraction(result)
        assert example["answer"] == steps[-1][1] == row["answer"].rsplit("#### ", 1)[1]
        assert example["prompt"] == f"Question: {row['question']}\nAnswer:" and "<<" not in example["completion"]
    assert len({r["question"].split(" ")[1] for r in rows("train")}) >= 8  # many templates and names


def test_splits_are_disjoint_by_instance_and_the_files_are_the_generator_output(tmp_path):
    train, test = rows("train"), rows("test")
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    problems = {split: unique_problems(0, len(r), heldout=split == "test") for split, r in (("train", train),
                                                                                          ("test", test))}
    assert not {p.key for p in problems["train"]} & {p.key for p in problems["test"]}
    assert all(is_heldout(p.key) for p in problems["test"]) and not any(is_heldout(p.key) for p in problems["train"])
    write_data(tmp_path, n_train=len(train), n_test=len(test))
    for name in SPLIT_FILES.values():
        assert (tmp_path / name).read_bytes() == (MATH_DATA_DIR / name).read_bytes()


# --- the shipped model on real generated text -----------------------------------------------------------------------


def test_reward_on_generated_text_equals_an_independent_check(shipped, task):
    _, model, tokenizer = shipped
    data = task.dataset("test", n=48)
    prompts = task.prompt_texts(data["prompt"], tokenizer)
    completions = generate_answers(model, tokenizer, prompts, max_new_tokens=task.eval_max_new_tokens)
    rewards = correctness_reward(prompts, completions, answer=data["answer"])
    independent = [float(final_number(c) == int(a)) for c, a in zip(completions, data["answer"], strict=True)]
    assert rewards == independent
    assert 0 < sum(rewards) < len(rewards)  # partly right: the base model has something to learn


def test_run_on_completions_are_cut_at_the_made_up_next_question(shipped, task):
    """Sampled completions that run on into a second "Question:" are scored on their own turn only."""
    _, model, tokenizer = shipped
    data = task.dataset("test", n=16)
    prompts = task.prompt_texts(data["prompt"], tokenizer)
    samples = generate_answers(model, tokenizer, prompts, do_sample=True, num_return_sequences=4, seed=0,
                               max_new_tokens=160)
    answers = [a for a in data["answer"] for _ in range(4)]
    run_on = [(c, a) for c, a in zip(samples, answers, strict=True) if "Question:" in c]
    assert run_on, "no sampled completion ran on"
    for completion, answer in run_on:
        assert len(own_turn(completion)) < len(completion)
        assert task.is_correct(completion, answer) == (final_number(completion) == int(answer))
    # at least one run-on states another '####' later, which the cut keeps out of the answer
    assert any(completion.count("####") > 1 for completion, _ in run_on)


def test_batched_evaluation_equals_one_prompt_at_a_time(shipped, task):
    _, model, tokenizer = shipped
    data = task.dataset("test", n=12)
    for fmt_task in (task, MathTask(source=str(MATH_DATA_DIR), chat=True, eval_max_new_tokens=96)):
        prompts = fmt_task.prompt_texts(fmt_task.dataset("test", n=12)["prompt"], tokenizer)
        batched = generate_answers(model, tokenizer, prompts, max_new_tokens=96)
        single = [generate_answers(model, tokenizer, [p], max_new_tokens=96, batch_size=1)[0] for p in prompts]
        assert batched == single
    assert len(data) == 12


# --- short SFT and GRPO records ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("regime", "prompt_format"), [("sft", "chat"), ("grpo", "plain")])
def test_short_records_have_a_learning_signal(regime, prompt_format, tmp_path):
    from gradlens.errors import GradlensWarning
    from gradlens.training import record

    trl = {"logging_steps": 100, "disable_tqdm": True}
    if regime == "grpo":  # 4 prompts of 8 completions a step (2 by default), shorter completions
        trl.update(per_device_train_batch_size=32, max_completion_length=64)
    config = RecordConfig(model="toy:math", regime=regime, prompt_format=prompt_format, out=str(tmp_path / "run"),
                          max_steps=3, n_train=64, seed=0, trl=trl)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = record(config, progress=False)
    assert not [str(w.message) for w in caught if issubclass(w.category, GradlensWarning)]
    assert result.no_signal_share == 0.0
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert json.dumps(manifest).count(f"gsm8k:{MATH_DATA_DIR}") >= 1


# --- the recipe ----------------------------------------------------------------------------------------------------


def test_shortened_recipe_reproduces_the_shipped_first_steps_bitwise(shipped):
    from gradlens.toy.math_model import FINGERPRINT_STEPS, build_math_base_model

    path, _, shipped_tokenizer = shipped
    assert path == shipped_model_path("math", 0)
    recipe = json.loads((Path(path) / "gradlens_recipe.json").read_text())
    model, tokenizer, fingerprints = build_math_base_model("math", 0, stop_after=max(FINGERPRINT_STEPS))
    assert tokenizer.get_vocab() == shipped_tokenizer.get_vocab()
    assert fingerprints == {str(s): recipe["fingerprints"][str(s)] for s in FINGERPRINT_STEPS}
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers >= 4


def test_notebook_world_variable_moves_training_to_toy_math(monkeypatch, tmp_path):
    from experiments.notebook_settings import in_world, output_dir, placement_config
    from gradlens.errors import GradlensError

    monkeypatch.setenv("GRADLENS_OUT", str(tmp_path))
    config = RecordConfig(model="toy:tiny", out="x")
    assert in_world(config) is config and output_dir("n") == tmp_path / "small" / "n"
    monkeypatch.setenv("GRADLENS_WORLD", "math")
    moved = in_world(config)
    assert (moved.model, moved.task, moved.eval_max_new_tokens) == ("toy:math", f"gsm8k:{MATH_DATA_DIR}", 96)
    assert placement_config(tmp_path).model == "toy:math" and output_dir("n") == tmp_path / "small-math" / "n"
    monkeypatch.setenv("GRADLENS_WORLD", "nope")
    with pytest.raises(GradlensError, match="GRADLENS_WORLD='nope'"):
        in_world(config)


# --- scripts/math_step_errors.py ----------------------------------------------------------------------------------


def test_step_errors_classify_each_written_step_against_its_own_operands(load_script) -> None:
    """Every calculator step of a gold worked solution is ``ok``; a sum that drops exactly its carries is
    ``carryless`` (worked out by hand below, independently of the script's helper), any other wrong value
    ``wrong``, whatever the earlier steps computed."""
    script = load_script("scripts/math_step_errors.py")
    for row in rows("train")[:200]:
        plain = ANNOTATION.sub("", row["answer"])
        assert {verdict for _, verdict in script.classify(plain)} == {"ok"}, plain
    # 27 + 15 without its carry: units 7 + 5 = 12 -> 2, tens 2 + 1 = 3 -> 32
    text = "27 + 15 = 32 apples.\n27 + 15 = 42\n27 + 15 = 41\n50 - 27 = 23\n20 / 5 = 4\n9 * 3 = 28\n#### 28"
    assert script.classify(text) == [("+", "carryless"), ("+", "ok"), ("+", "wrong"), ("-", "ok"), ("/", "ok"),
                                     ("*", "wrong")]
