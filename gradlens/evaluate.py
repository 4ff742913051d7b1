"""Accuracy of a causal LM on a task's prompts: greedy correctness, sampled accuracy and pass@k, with the binomial
95% interval of each share.

Sampling reaches the right answer more often than greedy decoding on a partly-competent model; that gap is what RL
(GRPO) can exploit, so both are reported. Correctness, prompt rendering and the answer budget come from the task.
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

Z95 = 1.959963984540054


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

    @property
    def greedy_ci95(self) -> tuple[float, float]:
        return wilson_interval(round(self.greedy * self.n), self.n)


@torch.no_grad()
def generate_answers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *,
                     do_sample: bool = False, temperature: float = 1.0, num_return_sequences: int = 1,
                     max_new_tokens: int = 8, batch_size: int = 256, seed: int = 0,
                     add_special_tokens: bool = False) -> list[str]:
    """Completions (special tokens stripped), ``num_return_sequences`` per prompt in prompt order.

    Batches are left-padded, so a batch gives the same greedy answers as one prompt at a time. Sampling draws from a
    forked RNG seeded by ``seed``: reproducible, and the caller's global RNG state is left as it was.
    ``add_special_tokens=True`` lets the tokenizer add its BOS, as TRL does for plain-text GRPO prompts; rendered chat
    prompts already hold theirs.
    """
    if batch_size < 1:
        raise GradlensError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[str] = []
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for i in range(0, len(prompts), batch_size):
                enc = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True,
                                add_special_tokens=add_special_tokens).to(device)
                seqs = model.generate(**enc, do_sample=do_sample, temperature=temperature if do_sample else None,
                                      top_k=0 if do_sample else None, top_p=1.0 if do_sample else None,
                                      num_return_sequences=num_return_sequences, max_new_tokens=max_new_tokens,
                                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
                out += tokenizer.batch_decode(seqs[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return out


def accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task, data: Any, *, k: int = 8,
             temperature: float = 1.0, seed: int = 0, batch_size: int = 256) -> Accuracy:
    """Greedy and sampled (``k`` samples per prompt at ``temperature``) accuracy of ``data`` (a task split)."""
    if len(data) == 0:
        raise GradlensError(f"task {task.name}: the evaluation data is empty")
    prompts = task.prompt_texts(data["prompt"], tokenizer)
    answers = list(data["answer"])
    gen = {"max_new_tokens": task.eval_max_new_tokens, "add_special_tokens": task.add_special_tokens,
           "batch_size": batch_size}
    greedy = generate_answers(model, tokenizer, prompts, **gen)
    g = sum(task.is_correct(c, a) for c, a in zip(greedy, answers, strict=True)) / len(prompts)
    if k == 0:
        return Accuracy(greedy=g, sampled=math.nan, pass_at_k=math.nan, k=0, n=len(prompts))
    samples = generate_answers(model, tokenizer, prompts, do_sample=True, temperature=temperature,
                               num_return_sequences=k, seed=seed, **gen)
    hits = [[task.is_correct(samples[i * k + j], a) for j in range(k)] for i, a in enumerate(answers)]
    return Accuracy(greedy=g, sampled=sum(map(sum, hits)) / (k * len(prompts)),
                    pass_at_k=sum(map(any, hits)) / len(prompts), k=k, n=len(prompts))


def greedy_report(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task, data: Any, *,
                  batch_size: int = 16) -> dict[str, Any]:
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
