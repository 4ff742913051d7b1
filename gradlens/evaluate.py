"""Accuracy of a causal LM on prompts with known answers: greedy exact match and sampled accuracy / pass@k.

Sampling reaches the right answer more often than greedy decoding on a partly-competent model; that gap is what RL
(GRPO) can exploit, so both are reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class Accuracy:
    """Greedy exact-match accuracy, mean per-sample accuracy when sampling, and pass@k over ``k`` samples."""

    greedy: float
    sampled: float
    pass_at_k: float
    k: int
    n: int


@torch.no_grad()
def generate_answers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *,
                     do_sample: bool = False, temperature: float = 1.0, num_return_sequences: int = 1,
                     max_new_tokens: int = 8, batch_size: int = 256, seed: int = 0,
                     add_special_tokens: bool = False) -> list[str]:
    """Completions (special tokens stripped), ``num_return_sequences`` per prompt in prompt order.

    ``add_special_tokens=True`` lets the tokenizer add its BOS, as TRL does for plain-text GRPO prompts; rendered chat
    prompts already hold theirs.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out: list[str] = []
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True,
                            add_special_tokens=add_special_tokens).to(device)
            if do_sample:  # seed the global RNG from our own generator so sampled accuracy is reproducible
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            seqs = model.generate(**enc, do_sample=do_sample, temperature=temperature if do_sample else None,
                                  top_k=0 if do_sample else None, top_p=1.0 if do_sample else None,
                                  num_return_sequences=num_return_sequences, max_new_tokens=max_new_tokens,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            out += tokenizer.batch_decode(seqs[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return out


def accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
             answers: Sequence[str], *, k: int = 8, temperature: float = 1.0, max_new_tokens: int = 8,
             seed: int = 0) -> Accuracy:
    """Greedy and sampled (``k`` samples per prompt at ``temperature``) exact-match accuracy."""
    if len(prompts) != len(answers) or not prompts:
        raise ValueError(f"accuracy: need equally many prompts and answers (got {len(prompts)} and {len(answers)})")
    answers = [str(a).strip() for a in answers]
    greedy = generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    g = sum(c.strip() == a for c, a in zip(greedy, answers, strict=True)) / len(prompts)
    if k == 0:
        return Accuracy(greedy=g, sampled=float("nan"), pass_at_k=float("nan"), k=0, n=len(prompts))
    samples = generate_answers(model, tokenizer, prompts, do_sample=True, temperature=temperature,
                               num_return_sequences=k, max_new_tokens=max_new_tokens, seed=seed)
    hits = [[samples[i * k + j].strip() == a for j in range(k)] for i, a in enumerate(answers)]
    return Accuracy(greedy=g, sampled=sum(map(sum, hits)) / (k * len(prompts)),
                    pass_at_k=sum(map(any, hits)) / len(prompts), k=k, n=len(prompts))
