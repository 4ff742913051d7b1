"""Accuracy of a causal LM on a task's prompts: greedy correctness, sampled accuracy and pass@k, with the binomial
95% interval of each share.

Sampling reaches the right answer more often than greedy decoding on a partly-competent model; that gap is what RL
(GRPO) can exploit, so both are reported. Correctness, prompt rendering and the answer budget come from the task.
Generation is batched (``batch_size`` sequences at once, prompts grouped by length, left-padded); on the same prompts
batched greedy answers equal unbatched ones exactly in float32 (measured on tiny Qwen2 and Llama models on CPU); in
bf16 on a GPU, kernels chosen by batch shape may round differently and flip a near-tie.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gradlens.errors import GradlensError
from gradlens.tasks.base import Task
from gradlens.tasks.prompt_format import stop_token_ids

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal
BATCH_SIZE = 256  # sequences generated at once


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """The Wilson score 95% interval of a binomial share (exact at 0 and n, unlike the normal approximation)."""
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    denom = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Accuracy:
    """Greedy accuracy, mean per-sample accuracy when sampling, and pass@k over ``k`` samples, on ``n`` prompts."""

    greedy: float
    sampled: float
    pass_at_k: float
    k: int
    n: int
    mean_tokens: float = math.nan  # mean length of the greedy completions, in tokens (stop token not counted)

    @property
    def greedy_ci95(self) -> tuple[float, float]:
        return wilson_interval(round(self.greedy * self.n), self.n)


def _length_batches(lengths: Sequence[int], prompts_per_batch: int) -> list[list[int]]:
    """Prompt indices in batches of similar length, longest first: little padding, and a batch too large for the
    device fails on the first batch rather than the last."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + prompts_per_batch] for i in range(0, len(order), prompts_per_batch)]


@torch.no_grad()
def generate_answers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *,
                     do_sample: bool = False, temperature: float = 1.0, num_return_sequences: int = 1,
                     max_new_tokens: int = 8, batch_size: int = BATCH_SIZE, seed: int = 0,
                     add_special_tokens: bool = False) -> list[str]:
    """Completions (special tokens stripped), ``num_return_sequences`` per prompt in prompt order.

    ``batch_size`` counts generated sequences (prompts times ``num_return_sequences``), which is what bounds the
    memory of the KV cache. Prompts are batched by length and left-padded with their attention mask (generate derives
    the position ids from it), so batched greedy answers equal one-prompt-at-a-time ones (see the module docstring).
    Decoding is pure greedy or pure temperature sampling: the model's own generation defaults (top-k/top-p,
    repetition penalty) are overridden, and generation stops at every stop token of the model
    (:func:`~gradlens.models.stop_token_ids`: an instruct model's end of turn as well as its end of text).
    Sampling draws from a forked RNG seeded by ``seed``: reproducible for a given ``batch_size``, and the caller's
    global RNG state is left as it was. ``add_special_tokens=True`` lets the tokenizer add its BOS, as TRL does for
    plain-text GRPO prompts; rendered chat prompts already hold theirs.
    """
    if batch_size < 1:
        raise GradlensError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"] if prompts else []
    decoding = {"do_sample": do_sample, "temperature": temperature if do_sample else None,
                "top_k": 0 if do_sample else None, "top_p": 1.0 if do_sample else None, "repetition_penalty": 1.0,
                "num_return_sequences": num_return_sequences, "max_new_tokens": max_new_tokens,
                "pad_token_id": tokenizer.pad_token_id, "eos_token_id": sorted(stop_token_ids(model, tokenizer))}
    n_seq = num_return_sequences
    out: list[str] = [""] * (len(ids) * n_seq)
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for batch in _length_batches([len(x) for x in ids], max(1, batch_size // n_seq)):
                enc = tokenizer.pad({"input_ids": [ids[i] for i in batch]}, return_tensors="pt").to(device)
                seqs = model.generate(**enc, **decoding)
                texts = tokenizer.batch_decode(seqs[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
                for row, i in enumerate(batch):
                    out[i * n_seq : (i + 1) * n_seq] = texts[row * n_seq : (row + 1) * n_seq]
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return out


def accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task, data: Any, *, k: int = 8,
             temperature: float = 1.0, seed: int = 0, batch_size: int = BATCH_SIZE) -> Accuracy:
    """Greedy and sampled (``k`` samples per prompt at ``temperature``) accuracy of ``data`` (a task split)."""
    if len(data) == 0:
        raise GradlensError(f"task {task.name}: the evaluation data is empty")
    prompts = task.prompt_texts(data["prompt"], tokenizer)
    answers = list(data["answer"])
    gen = {"max_new_tokens": task.eval_max_new_tokens, "add_special_tokens": task.add_special_tokens,
           "batch_size": batch_size}
    greedy = generate_answers(model, tokenizer, prompts, **gen)
    g = sum(task.is_correct(c, a) for c, a in zip(greedy, answers, strict=True)) / len(prompts)
    tokens = sum(map(len, tokenizer(greedy, add_special_tokens=False)["input_ids"])) / len(prompts)
    if k == 0:
        return Accuracy(greedy=g, sampled=math.nan, pass_at_k=math.nan, k=0, n=len(prompts), mean_tokens=tokens)
    samples = generate_answers(model, tokenizer, prompts, do_sample=True, temperature=temperature,
                               num_return_sequences=k, seed=seed, **gen)
    hits = [[task.is_correct(samples[i * k + j], a) for j in range(k)] for i, a in enumerate(answers)]
    return Accuracy(greedy=g, sampled=sum(map(sum, hits)) / (k * len(prompts)),
                    pass_at_k=sum(map(any, hits)) / len(prompts), k=k, n=len(prompts), mean_tokens=tokens)


def greedy_report(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task, data: Any, *,
                  batch_size: int = BATCH_SIZE) -> dict[str, Any]:
    """Greedy accuracy of ``data`` with its 95% interval and the first completions, as ``eval.json`` stores it."""
    prompts = task.prompt_texts(data["prompt"], tokenizer) if len(data) else []
    if not prompts:
        raise GradlensError(f"task {task.name}: the evaluation split is empty")
    outputs = generate_answers(model, tokenizer, prompts, max_new_tokens=task.eval_max_new_tokens,
                               batch_size=batch_size, add_special_tokens=task.add_special_tokens)
    correct = [task.is_correct(o, a) for o, a in zip(outputs, data["answer"], strict=True)]
    lo, hi = wilson_interval(sum(correct), len(correct))
    return {"accuracy": sum(correct) / len(correct), "ci95": [lo, hi], "n": len(correct), "correct": sum(correct),
            "max_new_tokens": task.eval_max_new_tokens, "prompt_format": task.prompt_format,
            "examples": [{"completion": o, "answer": a, "correct": c}
                         for o, a, c in zip(outputs[:5], data["answer"], correct, strict=False)]}
