"""Evaluation and prompt rendering on tiny random Qwen2/Llama models with a byte-level BPE tokenizer trained in memory:
batched greedy answers equal one-prompt-at-a-time ones, generation stops at every stop token, accuracy follows the
task's rule with Wilson intervals that match scipy's, and the prompt format comes from tokenizer and configs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from tests.helpers.models import END_OF_TEXT, QWEN_TEMPLATE, ROWS, TURN_END, build_bpe_tokenizer, model_config

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def chat_tokenizer():
    return build_bpe_tokenizer(TURN_END)


def _model(arch: str, tokenizer, seed: int = 0, generation_eos: list[int] | None = None):
    """A random tiny model; ``generation_eos``: its generation config's stop tokens (default: the tokenizer's eos)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(model_config(arch, tokenizer)).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if generation_eos is not None:
        model.generation_config.eos_token_id = generation_eos
    return model


def _prompts(tokenizer) -> list[str]:
    """Chat-rendered and plain prompts of very different lengths, so batches need much left padding."""
    questions = [r["question"] * (1 + i % 3) for i, r in enumerate(ROWS)]
    chat = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          tokenize=False) for q in questions]
    return chat + [f"Question: {q[: 10 + 9 * i]}\nAnswer:" for i, q in enumerate(questions)]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_batched_greedy_equals_one_prompt_at_a_time(chat_tokenizer, arch: str) -> None:
    import torch

    from gradlens.evaluate import generate_answers

    tok, model = chat_tokenizer, _model(arch, chat_tokenizer)
    prompts = _prompts(tok)
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    assert max(lengths) > 3 * min(lengths)
    single = [generate_answers(model, tok, [p], max_new_tokens=NEW_TOKENS)[0] for p in prompts]
    assert len(set(single)) > len(prompts) // 2  # answers depend on the prompt, so a mix-up would show
    for batch_size in (3, 7, len(prompts)):
        assert generate_answers(model, tok, prompts, max_new_tokens=NEW_TOKENS, batch_size=batch_size) == single

    # The control: the same left-padded batch without its attention mask gives other answers, so padding matters here.
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        seqs = model.generate(input_ids=enc["input_ids"], attention_mask=torch.ones_like(enc["input_ids"]),
                              do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=tok.eos_token_id)
    unmasked = tok.batch_decode(seqs[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    padded = [i for i, n in enumerate(lengths) if n < max(lengths)]
    assert sum(unmasked[i] != single[i] for i in padded) > len(padded) // 2


def test_generation_stops_at_every_stop_token(chat_tokenizer) -> None:
    """An instruct release whose generation config lists an end of turn beside the tokenizer's eos (Gemma-it,
    Llama-3-Instruct) must stop there, not run on to the budget."""
    import torch

    from gradlens.evaluate import generate_answers

    tok, model = chat_tokenizer, _model("qwen2", chat_tokenizer)
    prompt = _prompts(tok)[0]
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        full = model.generate(**enc, do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=tok.eos_token_id)
    new = full[0, enc["input_ids"].shape[1] :].tolist()
    assert not set(new) & set(tok.all_special_ids)  # so the decoded text holds every token
    cut = next(j for j in range(2, len(new)) if new[j] not in new[:j])  # a token that first comes late
    assert generate_answers(model, tok, [prompt], max_new_tokens=NEW_TOKENS) == [tok.decode(new)]
    model.generation_config.eos_token_id = [tok.eos_token_id, new[cut]]
    assert generate_answers(model, tok, [prompt], max_new_tokens=NEW_TOKENS) == [tok.decode(new[: cut + 1])]


@pytest.mark.parametrize(("successes", "n"), [(0, 1), (1, 1), (0, 20), (3, 20), (10, 20), (20, 20), (1, 400),
                                               (137, 400), (399, 400)])
def test_wilson_interval_matches_scipy(successes: int, n: int) -> None:
    from scipy.stats import binomtest

    from gradlens.evaluate import wilson_interval

    ci = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = wilson_interval(successes, n)
    assert lo == pytest.approx(ci.low, abs=1e-12) and hi == pytest.approx(ci.high, abs=1e-12)
    assert lo <= successes / n <= hi
    assert all(map(math.isnan, wilson_interval(0, 0)))


@dataclass(frozen=True)
class Scripted:
    """A task whose right answers are given completions: accuracy then counts exactly which prompts match."""

    prompts: list[str]
    answers: list[str]
    name: str = "scripted"
    eval_max_new_tokens: int = NEW_TOKENS
    prompt_format: str = "plain"
    add_special_tokens: bool = False

    def prompt_texts(self, prompts, tokenizer) -> list[str]:
        return list(prompts)

    def is_correct(self, completion: str, answer: str) -> bool:
        return completion == answer


def test_accuracy_and_report_count_the_tasks_rule(chat_tokenizer) -> None:
    from datasets import Dataset

    from gradlens.evaluate import accuracy, generate_answers, greedy_report, wilson_interval

    tok, model = chat_tokenizer, _model("llama", chat_tokenizer)
    prompts = _prompts(tok)
    greedy = generate_answers(model, tok, prompts, max_new_tokens=NEW_TOKENS, batch_size=1)
    right = [i % 3 == 0 for i in range(len(prompts))]
    answers = [g if ok else g + "x" for g, ok in zip(greedy, right, strict=True)]
    data = Dataset.from_dict({"prompt": prompts, "answer": answers})
    task = Scripted(prompts, answers)
    acc = accuracy(model, tok, task, data, k=0, batch_size=5)
    assert acc.greedy == sum(right) / len(right) and acc.n == len(right) and math.isnan(acc.sampled)
    assert acc.greedy_ci95 == wilson_interval(sum(right), len(right))
    report = greedy_report(model, tok, task, data, batch_size=4)
    assert report["correct"] == sum(right) and report["ci95"] == list(wilson_interval(sum(right), len(right)))
    assert [e["correct"] for e in report["examples"]] == right[:5]
    sampled = accuracy(model, tok, task, data, k=4, batch_size=8, temperature=1.0)
    assert 0.0 <= sampled.sampled <= sampled.pass_at_k <= 1.0 and sampled.k == 4
    assert sampled == accuracy(model, tok, task, data, k=4, batch_size=8, temperature=1.0)  # seeded


MISTRAL_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                    "{% else %}{{ m['content'] }}<|endoftext|>{% endif %}{% endfor %}")


@pytest.mark.parametrize(("eos", "template", "generation_eos", "want", "why"), [
    (TURN_END, QWEN_TEMPLATE, None, "chat", "closes every turn with <|im_end|>, one of the model's stop tokens"),
    (END_OF_TEXT, QWEN_TEMPLATE, None, "plain", "<|im_end|>, which is not among the model's stop tokens"),
    (END_OF_TEXT, QWEN_TEMPLATE, [END_OF_TEXT, TURN_END], "chat", "closes every turn with <|im_end|>"),  # Gemma-it
    (END_OF_TEXT, MISTRAL_TEMPLATE, None, "chat", "also ends plain text, so a base model would look the same"),
    (END_OF_TEXT, None, None, "plain", "the tokenizer has no chat template"),
    (END_OF_TEXT, "{% for m in messages %}{{ m['content'] }}{% endfor %}", None, "plain", "marks no end"),
    (END_OF_TEXT, "{{ raise_exception('no') }}", None, "plain", "does not render a user/assistant exchange (no)"),
], ids=["chat-release", "base-release", "gemma-it-style", "mistral-style", "no-template", "no-turn-end", "broken"])
def test_auto_prompt_format_follows_tokenizer_and_configs(capsys, eos, template, generation_eos, want, why) -> None:
    from gradlens.tasks.prompt_format import resolve_prompt_format

    tok = build_bpe_tokenizer(eos, template)
    stops = None if generation_eos is None else tok.convert_tokens_to_ids(generation_eos)
    for name in ("models/my-sft-checkpoint", "org/Some-Model-Instruct"):  # the name plays no part
        fmt, reason = resolve_prompt_format("auto", name, _model("qwen2", tok, generation_eos=stops), tok)
        assert (fmt, why in reason, "\n" in reason) == (want, True, False), reason
        assert capsys.readouterr().out == f"gradlens: prompt format {fmt} for {name}: {reason}\n"


def test_explicit_prompt_format_is_taken_as_given() -> None:
    from gradlens.errors import GradlensError
    from gradlens.tasks.prompt_format import resolve_prompt_format

    base = build_bpe_tokenizer(END_OF_TEXT)
    assert resolve_prompt_format("chat", "m", _model("qwen2", base), base) == ("chat", "--prompt_format chat")
    chat = build_bpe_tokenizer(TURN_END)
    assert resolve_prompt_format("plain", "m", _model("qwen2", chat), chat) == ("plain", "--prompt_format plain")
    bare = build_bpe_tokenizer(END_OF_TEXT, None)
    with pytest.raises(GradlensError, match="^--prompt_format chat: the tokenizer of m has no chat template$"):
        resolve_prompt_format("chat", "m", _model("qwen2", bare), bare)


