"""The embedded toy world: character tokenizer, addition task and reward, and the shipped / rebuilt base model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import gradlens.toy.model as toy_model
import gradlens.toy_presets as toy_presets
from gradlens.errors import GradlensError
from gradlens.evaluate import accuracy
from gradlens.tasks.addition import AdditionTask, carryless_sum, exact_match_reward
from gradlens.toy.model import build_base_model, ensure_base_model, get_preset, shipped_model_path
from gradlens.toy.tokenizer import EOS, PAD
from gradlens.toy_base_report import base_model_source

QUICK = "tiny5"  # the tiny preset with a 5-step recipe: builds in about a second


@pytest.fixture
def quick_preset(monkeypatch):
    monkeypatch.setitem(toy_presets.PRESETS, QUICK, dataclasses.replace(toy_presets.PRESETS["tiny"], pretrain_steps=5))
    return QUICK


def all_texts(task: AdditionTask) -> list[str]:
    train, heldout = task.split()
    pairs = train + heldout
    return [task.prompt(a, b) for a, b in pairs] + [task.answer(a, b) for a, b in pairs]


# --- tokenizer ---------------------------------------------------------------------------------------------------


def test_tokenizer_round_trips_every_prompt_and_answer(char_tokenizer):
    texts = all_texts(AdditionTask())
    ids = char_tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert all(len(i) == len(t) for i, t in zip(ids, texts, strict=True))  # one token per character
    assert char_tokenizer.unk_token_id not in {t for seq in ids for t in seq}
    assert char_tokenizer.batch_decode(ids) == texts
    assert char_tokenizer.decode(char_tokenizer.encode("12+34=46", add_special_tokens=False)) == "12+34=46"


def test_tokenizer_survives_save_and_auto_load(char_tokenizer, tmp_path):
    char_tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded, PreTrainedTokenizerFast)
    texts = all_texts(AdditionTask())[::7] + ["Hello, world: (1*2)-3?\n#"]
    assert loaded(texts, add_special_tokens=False)["input_ids"] == char_tokenizer(texts, add_special_tokens=False)[
        "input_ids"]
    assert (loaded.pad_token, loaded.eos_token) == (PAD, EOS)
    assert (loaded.pad_token_id, loaded.eos_token_id) == (char_tokenizer.pad_token_id, char_tokenizer.eos_token_id)
    assert loaded.padding_side == "left"
    assert len(loaded) == len(char_tokenizer)
    user = [{"role": "user", "content": "12+34="}]
    prompt = loaded.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>12+34=<|assistant|>"
    chat = user + [{"role": "assistant", "content": "46"}]
    text = loaded.apply_chat_template(chat, tokenize=False)
    assert text == "<|user|>12+34=<|assistant|>46<eos>"
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == loaded.convert_tokens_to_ids("<|user|>") and ids[-1] == loaded.eos_token_id
    assert len(ids) == 1 + 6 + 1 + 2 + 1  # special tokens are single tokens
    assert loaded.decode(ids, skip_special_tokens=True) == "12+34=46"


# --- task and reward ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("digits", [1, 2])
def test_task_splits_are_disjoint_complete_and_deterministic(digits):
    task = AdditionTask(digits=digits, n_heldout=40)
    train, heldout = task.split()
    assert len(heldout) == 40 and not set(train) & set(heldout)
    assert len(set(train)) == len(train) and len(train) + len(heldout) == task.n_pairs
    assert all(len(str(a)) == len(str(b)) == digits for a, b in heldout)
    assert AdditionTask(digits=digits, n_heldout=40).split() == (train, heldout)
    assert set(AdditionTask(digits=digits, n_heldout=40, seed=1).split()[1]) != set(heldout)


def test_task_dataset_and_bad_arguments():
    ds = AdditionTask().dataset("heldout", n=5)
    a, b = AdditionTask().split()[1][0]
    assert len(ds) == 5 and ds[0] == {"prompt": f"{a}+{b}=", "completion": str(a + b), "answer": str(a + b)}
    assert len(AdditionTask().dataset("train")) == 90 * 90 - 400
    assert carryless_sum(57, 68) == 15 and carryless_sum(12, 34) == 46 and carryless_sum(95, 5) == 90
    with pytest.raises(GradlensError, match="split"):  # a one-line CLI error, not a traceback
        AdditionTask().dataset("test")
    with pytest.raises(GradlensError, match="digits"):
        AdditionTask(digits=0)
    with pytest.raises(GradlensError, match="n_heldout"):
        AdditionTask(digits=1, n_heldout=50)


def test_exact_match_reward_on_strings_and_conversations():
    completions = ["82", " 82\n", "81", "", "820", "8 2"]
    assert exact_match_reward(["37+45="] * 6, completions, answer=["82"] * 6) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    conversational = [[{"role": "assistant", "content": "82 "}], [{"role": "assistant", "content": "28"}], [],
                      [{"role": "assistant", "content": "1"}, {"role": "assistant", "content": "82"}]]
    prompts = [[{"role": "user", "content": "37+45="}]] * 4
    assert exact_match_reward(prompts, conversational, answer=["82"] * 4, trainer_state=None) == [1.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError):  # completions and answers must line up
        exact_match_reward(["1+1="] * 2, ["2", "2"], answer=["2"])


# --- base model --------------------------------------------------------------------------------------------------


def assert_partly_competent(model, tokenizer):
    """Greedy right on a minority of held-out prompts, sampling right much more often: room for SFT and GRPO."""
    task = AdditionTask(digits=get_preset("tiny").digits)
    acc = accuracy(model, tokenizer, task, task.dataset("heldout"), k=8)
    assert 0.15 <= acc.greedy <= 0.50, acc
    assert acc.pass_at_k > acc.greedy + 0.2, acc
    return acc


@pytest.fixture(scope="module")
def shipped_model():
    path = ensure_base_model("tiny", 0)
    return path, AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_shipped_base_model_loads_and_is_partly_competent(shipped_model, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADLENS_CACHE", str(tmp_path))
    path, model, tokenizer = shipped_model
    assert path == shipped_model_path("tiny", 0) == ensure_base_model("tiny", 0)
    assert base_model_source("tiny", 0) == "shipped" and not any(tmp_path.iterdir())  # the cache is not touched
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.vocab_size == len(tokenizer)
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert_partly_competent(model, tokenizer)


def test_shipped_base_model_makes_the_documented_carryless_error(shipped_model):
    """Greedy mistakes are mostly the carry-less sum (the error the recipe plants), not noise."""
    from gradlens.evaluate import generate_answers

    _, model, tokenizer = shipped_model
    _, heldout = AdditionTask().split()
    heldout = heldout[:200]
    out = generate_answers(model, tokenizer, [AdditionTask.prompt(a, b) for a, b in heldout])
    wrong = [(a, b, o.strip()) for (a, b), o in zip(heldout, out, strict=True) if o.strip() != str(a + b)]
    assert wrong
    assert sum(o == str(carryless_sum(a, b)) for a, b, o in wrong) / len(wrong) > 0.7


@pytest.mark.slow
def test_recipe_reproduces_the_shipped_checkpoint(shipped_model):
    """The recipe still yields a model in the shipped model's accuracy band, with the same tensors.

    Bit-for-bit equality holds on the machine that built the checkpoint (2 threads, x86-64, torch 2.13 CPU); a CPU
    with other SIMD kernels rounds differently over 1,500 Adam steps, so only the band is required.
    """
    model, tokenizer = build_base_model("tiny", 0)
    shipped = load_file(shipped_model[0] / "model.safetensors")
    built = model.state_dict()
    assert set(shipped) == set(built) - {"lm_head.weight"}  # tied to the embeddings, not saved
    assert all(shipped[k].shape == built[k].shape for k in shipped)
    assert_partly_competent(model, tokenizer)


def test_recipe_is_deterministic_per_seed(quick_preset):
    first, tok = build_base_model(quick_preset, 0)
    again, _ = build_base_model(quick_preset, 0)
    other, _ = build_base_model(quick_preset, 1)
    a, b, c = first.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert not first.training and first.generation_config.eos_token_id == tok.eos_token_id


def test_unknown_preset_is_a_gradlens_error():
    with pytest.raises(GradlensError, match="'nope'.*tiny"):
        get_preset("nope")
    with pytest.raises(GradlensError, match="nope"):
        ensure_base_model("nope", 0)


def test_cache_builds_once_then_reuses(quick_preset, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADLENS_CACHE", str(tmp_path))
    builds = []

    def counting_build(*args, **kwargs):
        builds.append(args)
        return build_base_model(*args, **kwargs)

    monkeypatch.setattr(toy_model, "build_base_model", counting_build)
    assert base_model_source(quick_preset, 3) == "built"
    path = ensure_base_model(quick_preset, 3)
    version = get_preset(quick_preset).recipe_version
    assert path == tmp_path / "toy" / f"{quick_preset}-seed3-v{version}" and len(builds) == 1
    assert base_model_source(quick_preset, 3) == "cached"
    assert [p.name for p in (tmp_path / "toy").iterdir()] == [path.name]  # no temp dir left behind
    weights = path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    loaded = AutoModelForCausalLM.from_pretrained(path)
    reference, _ = build_base_model(quick_preset, 3)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert AutoTokenizer.from_pretrained(path).pad_token == PAD

    assert ensure_base_model(quick_preset, 3) == path and len(builds) == 1
    assert weights.stat().st_mtime_ns == mtime

    assert base_model_source(quick_preset, 3, rebuild=True) == "built"
    assert ensure_base_model(quick_preset, 3, rebuild=True) == path and len(builds) == 2
    assert AutoModelForCausalLM.from_pretrained(path).config.hidden_size == 64
