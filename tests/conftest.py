"""Shared fixtures: the toy character tokenizer, a factory of tiny random Qwen2 models, an offline hub cache holding
a tiny model under a hub id, the addition task with a test's own reward, and a loader of the repository's scripts."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def load_script() -> Callable[[str], ModuleType]:
    """Import a script of the repository (``scripts/NAME.py``, ``benchmarks/NAME.py``) by its path relative to the
    repository root: scripts and benchmarks are not an installed package."""

    def load(relative: str) -> ModuleType:
        path = REPO / relative
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def char_tokenizer():
    from gradlens.toy.tokenizer import build_char_tokenizer

    return build_char_tokenizer()


@pytest.fixture
def make_tiny_model(char_tokenizer):
    """``make_tiny_model(seed=0)``: a fresh, randomly initialised Qwen2 of the ``tiny`` preset's sizes."""
    import torch
    from transformers import Qwen2ForCausalLM

    from gradlens.toy.model import build_toy_config

    def make(seed: int = 0):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(build_toy_config("tiny", char_tokenizer))
        model.generation_config.pad_token_id = char_tokenizer.pad_token_id
        model.generation_config.eos_token_id = char_tokenizer.eos_token_id
        return model

    return make


HUB_MODEL_ID = "gradlens-test/tiny-qwen2"  # the model id the offline hub cache holds
HUB_DATASET_ID = "gradlens-test/tiny-gsm8k"  # a GSM8K-format dataset id its datasets cache holds, as does openai/gsm8k


@pytest.fixture(scope="session")
def hub_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ``HF_HOME`` whose hub cache holds :data:`HUB_MODEL_ID` as a download leaves it: a tiny Qwen2 (the recipes'
    architecture) with a byte-level BPE tokenizer trained in memory, a base release's special tokens and Qwen's chat
    template; random weights taught the ``#### <answer>`` format in a few steps, so GRPO groups differ in reward.
    Its datasets cache holds :data:`HUB_DATASET_ID` and ``openai/gsm8k`` (config ``main``), the test's GSM8K-format
    rows under both ids."""
    import torch
    import transformers

    from tests.helpers.hub_cache import save_dataset_to_cache, save_to_hub_cache
    from tests.helpers.models import END_OF_TEXT, ROWS, SIZES, build_bpe_tokenizer, teach_answer_format

    home = tmp_path_factory.mktemp("hf_home")
    tokenizer = build_bpe_tokenizer(END_OF_TEXT)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None, **SIZES))
    teach_answer_format(model, tokenizer, chat=False)
    save_to_hub_cache(model, tokenizer, home, HUB_MODEL_ID)
    for repo_id, config_name in ((HUB_DATASET_ID, "default"), ("openai/gsm8k", "main")):  # --task gsm8k's
        save_dataset_to_cache({"train": ROWS, "test": ROWS[:3]}, home, repo_id, config_name)
    return home


@pytest.fixture(scope="session")
def gsm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of GSM8K-format ``train.jsonl``/``test.jsonl`` over the hub model's tokenizer corpus."""
    import json

    from tests.helpers.models import ROWS

    data = tmp_path_factory.mktemp("gsm")
    for split, rows in (("train", ROWS), ("test", ROWS[:3])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


@pytest.fixture
def offline_hub(hub_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """:func:`hub_home`, with this process offline and reading only that cache (undone after the test); returns
    the ``HF_HOME``. Child processes get the same through ``tests.helpers.hub_cache.offline_env``."""
    from tests.helpers.hub_cache import patch_offline

    patch_offline(monkeypatch, hub_home)
    return hub_home
