"""The embedded base model: a tiny Qwen2-architecture causal LM, pretrained by a seeded recipe to be *partly* right.

GRPO learns nothing from a model that never earns a reward, so the base model is pretrained on the addition task's
train split with a systematic, learnable error: a share (``carryless_share``) of the targets that need a carry are
replaced by the carry-less sum. The model then learns both modes; greedy decoding mostly follows the majority
(carry-less) mode, so it is right on the ~27% of held-out prompts that need no carry and on some others (40% in all
for ``tiny``), while sampling still reaches the right answer often (pass@8 0.83).
Fine-tuning (SFT on correct answers, or GRPO with the exact-match reward) has something real to learn: "carry".

Built models are ordinary ``save_pretrained`` directories, so ``AutoModelForCausalLM.from_pretrained`` loads them like
any hub model. The ``tiny`` and ``small`` presets (seed 0) ship inside the package, built by this recipe, because
building them takes one and four minutes on 2 CPU cores; other seeds are built on first use and cached under
``$GRADLENS_CACHE`` (default ``~/.cache/gradlens``), keyed by preset, seed and recipe version.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from gradlens.tasks.addition import AdditionTask, carryless_sum
from gradlens.toy.tokenizer import build_char_tokenizer
from gradlens.toy_presets import ToyPreset, get_preset

RECIPE_FILE = "gradlens_recipe.json"
SHIPPED_DIR = Path(__file__).parent / "checkpoints"


def build_toy_config(preset: str | ToyPreset, tokenizer: PreTrainedTokenizerFast) -> Qwen2Config:
    """A Qwen2Config of the preset's sizes over the character tokenizer's vocabulary."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_hidden_layers,
        num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.num_key_value_heads,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


def pretraining_targets(task: AdditionTask, carryless_share: float, seed: int) -> list[tuple[str, str]]:
    """(prompt, target) pairs of the train split; a target needing a carry is carry-less w.p. ``carryless_share``."""
    rng = random.Random(seed)
    train, _ = task.split()
    out = []
    for a, b in train:
        wrong = carryless_sum(a, b)
        target = str(wrong) if wrong != a + b and rng.random() < carryless_share else task.answer(a, b)
        out.append((task.prompt(a, b), target))
    return out


def encode_pretraining_data(tokenizer: PreTrainedTokenizerFast, pairs: list[tuple[str, str]]
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``prompt + target + eos`` ids, attention mask, and labels on the target and eos only."""
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    targets = tokenizer([t for _, t in pairs], add_special_tokens=False)["input_ids"]
    seqs = [p + t + [tokenizer.eos_token_id] for p, t in zip(prompts, targets, strict=True)]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    labels = torch.full((len(seqs), width), -100)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, p) in enumerate(zip(seqs, prompts, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, len(p) : len(s)] = torch.tensor(s[len(p) :])
        mask[i, : len(s)] = 1
    return ids, mask, labels


def build_base_model(preset: str = "tiny", seed: int = 0, *, progress: bool = False
                     ) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Build and pretrain the toy base model from scratch; deterministic for a given preset, seed and thread count
    (the math world's recipe for a given preset and seed: it runs on one thread)."""
    p = get_preset(preset)
    if p.world == "math":
        from gradlens.toy.math_model import build_math_base_model

        model, tokenizer, _ = build_math_base_model(p, seed, progress=progress)
        return model, tokenizer
    tokenizer = build_char_tokenizer()
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(build_toy_config(p, tokenizer))
    data = pretraining_targets(AdditionTask(digits=p.digits), p.carryless_share, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=p.learning_rate, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p.learning_rate, total_steps=p.pretrain_steps,
                                                pct_start=0.1)
    ids, mask, labels = encode_pretraining_data(tokenizer, data)
    gen = torch.Generator().manual_seed(seed + 1)
    order = torch.empty(0, dtype=torch.long)
    from tqdm.auto import tqdm

    bar = tqdm(range(p.pretrain_steps), desc=f"pretraining toy base model ({preset})", unit="step",
               disable=not progress)
    model.train()
    for step in bar:
        if len(order) < p.batch_size:  # epochs of seeded permutations
            order = torch.cat([order, torch.randperm(len(data), generator=gen)])
        batch, order = order[: p.batch_size], order[p.batch_size :]
        loss = model(input_ids=ids[batch], attention_mask=mask[batch], labels=labels[batch]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model, tokenizer


def cache_dir() -> Path:
    """Where built base models live: ``$GRADLENS_CACHE`` or ``~/.cache/gradlens``."""
    return Path(os.environ.get("GRADLENS_CACHE") or Path.home() / ".cache" / "gradlens")


def _model_dir_name(preset: str, seed: int) -> str:
    return f"{preset}-seed{seed}-v{get_preset(preset).recipe_version}"


def shipped_model_path(preset: str = "tiny", seed: int = 0) -> Path | None:
    """The base model shipped in the package for this preset and seed, if there is one."""
    path = SHIPPED_DIR / _model_dir_name(preset, seed)
    return path if (path / RECIPE_FILE).is_file() else None


def base_model_path(preset: str = "tiny", seed: int = 0) -> Path:
    """Where the base model of this preset and seed is cached (whether or not it has been built)."""
    return cache_dir() / "toy" / _model_dir_name(preset, seed)


def ensure_base_model(preset: str = "tiny", seed: int = 0, *, rebuild: bool = False, progress: bool = False) -> Path:
    """The base-model directory: shipped, else cached, else built now and cached (atomically: temp dir + rename).

    ``rebuild=True`` always runs the recipe and writes the result to the cache.
    """
    path = base_model_path(preset, seed)
    if not rebuild:
        shipped = shipped_model_path(preset, seed)
        if shipped is not None:
            return shipped
        if (path / RECIPE_FILE).is_file():
            return path
    start = time.perf_counter()
    notes: dict[str, Any] = {}
    if get_preset(preset).world == "math":  # its recipe also fingerprints the first steps, for the reproduction test
        from gradlens.toy.math_model import build_math_base_model

        model, tokenizer, fingerprints = build_math_base_model(preset, seed, progress=progress)
        notes = {"fingerprints": fingerprints, "threads": 1}
    else:
        model, tokenizer = build_base_model(preset, seed, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a cache is shared like any model directory
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        recipe = {"preset": preset, "seed": seed, "build_seconds": round(time.perf_counter() - start, 1),
                  **asdict(get_preset(preset)), **notes}
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=2))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
