"""Real-model layouts offline: a byte-level BPE tokenizer trained in memory with Qwen's special tokens and chat
template, tiny configs of several architectures, and a float32 tolerance for results that differ in summation order."""

from __future__ import annotations

from pathlib import Path

SIZES = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 256}
# Short GSM8K-format rows over the toy tokenizer's characters.
ROWS = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
         "answer": f"Tom has {a}+{b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}
        for a, b in [(3, 4), (12, 30), (7, 8), (25, 25), (9, 1), (40, 2), (6, 6), (11, 22)]]
END_OF_TEXT, TURN_START, TURN_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
QWEN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_bpe_tokenizer(eos: str = TURN_END, template: str | None = QWEN_TEMPLATE):
    """A byte-level BPE tokenizer trained in memory on the GSM8K-format rows, with Qwen's special tokens: a chat
    release's when ``eos`` is the end of turn, a base release's (which ships the template too) when it is
    end-of-text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in ROWS]
    core.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=[END_OF_TEXT, TURN_START, TURN_END], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    specials = [t for t in (TURN_START, TURN_END) if t != eos]
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=eos, pad_token=END_OF_TEXT,
                                  additional_special_tokens=specials)
    tok.chat_template = template
    return tok


def model_config(arch: str, tokenizer, **extra):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
           "mistral": transformers.MistralConfig, "gemma": transformers.GemmaConfig}[arch]
    kwargs = {**SIZES, "head_dim": 8} if arch in ("qwen3", "gemma") else dict(SIZES)
    return cls(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
               bos_token_id=None, **kwargs, **extra)


def save_model(model, tokenizer, path: Path) -> Path:
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def float32_tolerance(reference, ulps: int = 64) -> float:
    """An absolute tolerance for float32 results that differ only in summation order (a merged weight, a fused
    kernel): ``ulps`` units of float32 rounding at the largest magnitude of ``reference``. The errors of reordered
    sums grow with the number and size of the summands, so a tolerance fixed in absolute terms sits at the rounding
    edge for some inputs (1.05e-5 against 1e-5 was seen on logits of size ~7)."""
    import torch

    scale = float(torch.as_tensor(reference).abs().max())
    return ulps * float(torch.finfo(torch.float32).eps) * max(scale, 1.0)


def teach_answer_format(model, tokenizer, chat: bool) -> None:
    """A few full-batch steps on ``prompt -> "#### <answer>"``, so that sampled GRPO completions sometimes earn the
    correctness and format rewards (a random model never does, and GRPO without reward variance has all-zero
    gradients). Few enough that most groups of 4 samples still differ in reward (15 steps: 5 to 8 of the 8 prompts'
    groups on three seeds; from 30 on the format is always right and the answers mostly fixed)."""
    import torch

    from gradlens.tasks.gsm8k import MathTask, gold_answer

    task = MathTask(chat=chat)
    prompts = task.prompt_texts([task.prompt(r["question"]) for r in ROWS], tokenizer)
    seqs, starts = [], []
    for prompt, row in zip(prompts, ROWS, strict=True):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        target = tokenizer(f"#### {gold_answer(row['answer'])}", add_special_tokens=False)["input_ids"]
        seqs.append(ids + target + [tokenizer.eos_token_id])
        starts.append(len(ids))
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    labels = torch.full((len(seqs), width), -100)
    for i, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, start : len(seq)] = torch.tensor(seq[start:])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(15):
        model(input_ids=ids, attention_mask=(labels != -100) | (ids != tokenizer.pad_token_id),
              labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
