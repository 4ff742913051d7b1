"""The ``toy:math`` base model: a 4-layer Llama pretrained by a seeded recipe on GSM8K-style word problems.

The recipe trains the BPE tokenizer (:mod:`gradlens.toy.bpe_tokenizer`) on a sample of the problem stream, then
pretrains the model from scratch on a stream of train-split instances (:mod:`gradlens.toy.math_data`), rendered
exactly as the ``gsm8k`` task renders them: mostly plain ``Question: ...\\nAnswer: <solution>\\n#### N`` documents,
some of which run on into a second problem before the end-of-text token (as a packed web corpus would, so a
completion sometimes runs on and the task's run-on cut matters), and some chat-rendered ones (so chat prompts get
answers too). A share (``carryless_share``) of the addition steps that need a carry take the carry-less sum, carried
through the later steps: the base model ends partly right, and fine-tuning has "carry" to learn.

The recipe runs on one CPU thread whatever the machine has, so the weights do not depend on the core count; the
state after the first steps is fingerprinted into the recipe file, which is what the reproduction test checks.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from gradlens.tasks.gsm8k import CHAT_INSTRUCTION, MathTask
from gradlens.toy.bpe_tokenizer import train_bpe_tokenizer
from gradlens.toy.math_data import problems
from gradlens.toy_presets import ToyPreset, get_preset

FINGERPRINT_STEPS = (1, 4)  # steps after which the recipe records a hash of the weights
TOKENIZER_DOCS = 3000  # documents of the tokenizer's training corpus
RUN_ON_SHARE = 0.25  # plain documents that go on into a second problem before the end of text
CHAT_SHARE = 0.15  # documents rendered with the chat template
SEQ_LEN = 96  # tokens of each packed training row


def document(problem_pair: list, rng: random.Random, carryless_share: float, tokenizer: Any | None) -> str:
    """One pretraining document of one or two problems, plain or chat (``tokenizer`` renders chat; without one the
    document is plain), without the end-of-text token."""
    texts = []
    for p in problem_pair:
        solution, _ = p.solve(lambda _: rng.random() < carryless_share)
        texts.append((p.question, solution))
    if tokenizer is not None and rng.random() < CHAT_SHARE:
        task = MathTask(chat=True)
        q, s = texts[0]
        return tokenizer.apply_chat_template([*task.prompt(q), *task.completion(s)], tokenize=False)
    task = MathTask()
    n = 2 if rng.random() < RUN_ON_SHARE else 1
    return "\n\n".join(task.prompt(q) + task.completion(s) for q, s in texts[:n])


def documents(seed: int, carryless_share: float, tokenizer: Any | None = None):
    """The endless seeded stream of pretraining documents (train-split instances only)."""
    rng = random.Random(seed)
    stream = problems(seed, heldout=False)
    while True:
        yield document([next(stream), next(stream)], rng, carryless_share, tokenizer)


def build_math_config(p: ToyPreset, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """A LlamaConfig of the preset's sizes over the BPE vocabulary; the end of text is the only stop token."""
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
                       num_hidden_layers=p.num_hidden_layers, num_attention_heads=p.num_attention_heads,
                       num_key_value_heads=p.num_key_value_heads, max_position_embeddings=512,
                       tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, bos_token_id=None)


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 of every tensor of the state dict (sorted by name), bit for bit."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def packed_batches(tokenizer: PreTrainedTokenizerFast, docs, batch_size: int):
    """Endless batches of ``batch_size`` rows of ``SEQ_LEN`` tokens, cut from the documents' token stream (each
    document followed by the end-of-text token), as web-scale pretraining packs its corpus: no padding is computed."""
    buffer: list[int] = []
    while True:
        while len(buffer) < batch_size * SEQ_LEN:
            buffer += tokenizer(next(docs), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows, buffer = buffer[: batch_size * SEQ_LEN], buffer[batch_size * SEQ_LEN :]
        ids = torch.tensor(rows).view(batch_size, SEQ_LEN)
        yield {"input_ids": ids, "labels": ids}


def build_math_base_model(preset: str | ToyPreset = "math", seed: int = 0, *, progress: bool = False,
                          stop_after: int | None = None
                          ) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, dict[str, str]]:
    """Train the tokenizer and pretrain the model; returns them and the fingerprints (step -> sha256).

    ``stop_after``: stop after that many steps of the full schedule (the reproduction test's shortened recipe).
    Runs on one thread (restored afterwards), so the result is the same on any core count.
    """
    from tqdm.auto import tqdm

    p = get_preset(preset) if isinstance(preset, str) else preset
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        corpus = documents(seed, p.carryless_share)
        tokenizer = train_bpe_tokenizer([*(next(corpus) for _ in range(TOKENIZER_DOCS)), CHAT_INSTRUCTION])
        torch.manual_seed(seed)
        model = LlamaForCausalLM(build_math_config(p, tokenizer))
        opt = torch.optim.AdamW(model.parameters(), lr=p.learning_rate, weight_decay=0.01, betas=(0.9, 0.98))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p.learning_rate, total_steps=p.pretrain_steps,
                                                    pct_start=0.05)
        batches = packed_batches(tokenizer, documents(seed + 1, p.carryless_share, tokenizer), p.batch_size)
        steps = p.pretrain_steps if stop_after is None else min(stop_after, p.pretrain_steps)
        fingerprints: dict[str, str] = {}
        bar = tqdm(range(steps), desc=f"pretraining toy base model ({p.world})", unit="step", disable=not progress)
        model.train()
        for step in bar:
            loss = model(**next(batches)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if step + 1 in FINGERPRINT_STEPS:
                fingerprints[str(step + 1)] = fingerprint(model)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model, tokenizer, fingerprints
