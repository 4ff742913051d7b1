"""Models: loading the toy base models and any ``from_pretrained`` causal LM, where to train and in which dtype.

Defaults follow the hardware: bf16 weights on a GPU that supports it (and the Trainer's bf16 autocast with them),
float32 on a CPU, where bf16 matmuls are slow and lossy. The toy models load in float32 unless a dtype is asked for
(``auto`` keeps them float32 on a GPU too), so that toy runs stay reproducible on any machine. The LoRA-FA adapter
is :mod:`gradlens.lora`; prompt formats are :mod:`gradlens.tasks.prompt_format`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gradlens.config import TOY_PREFIX
from gradlens.errors import GradlensError, cause
from gradlens.fsio import read_json
from gradlens.hub import hub_cause

# Files one of which every saved tokenizer has; a model directory with none of them has no tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def load_model(spec: str, dtype: str = "float32", *, progress: bool = True, revision: str | None = None,
               **model_kwargs) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) for ``toy:PRESET`` (built on first use) or a ``from_pretrained`` path or hub id (at
    ``revision``), in ``dtype`` (``model_kwargs`` go to ``from_pretrained``)."""
    if spec.startswith(TOY_PREFIX):
        from gradlens.toy.model import ensure_base_model

        return load_model_and_tokenizer(ensure_base_model(spec[len(TOY_PREFIX) :], progress=progress), dtype=dtype,
                                        **model_kwargs)
    return load_model_and_tokenizer(spec, dtype=dtype, revision=revision, **model_kwargs)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP/accelerate wrappers (what callbacks receive may be wrapped)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def load_model_and_tokenizer(name_or_path: str | os.PathLike[str], *, dtype: str | torch.dtype = "float32",
                             revision: str | None = None, **model_kwargs
                             ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Any HF causal LM and its tokenizer through ``from_pretrained``, resolved as transformers resolves a name: an
    existing directory is a local model; anything else is a hub id (``NAME`` or ``ORG/NAME``, at ``revision``),
    found in the hub cache or downloaded, as ``HF_HUB_OFFLINE`` allows.

    Errors name the path or id and the cause in one line, before any training: a path that is a file or, looking
    like a path (``./x``, ``/x``, ``~/x``), does not exist; a hub id that is not found, gated, or not cached while
    offline (:func:`gradlens.hub.hub_cause`); a directory without tokenizer files (``AutoTokenizer`` would return an
    empty one-token tokenizer, on which SFT "trains" with loss 0), a tokenizer with no ordinary token, or one with
    more tokens than the model has embeddings. Pad token falls back to eos, as TRL expects one.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    path = Path(name).expanduser()
    if (path / "adapter_config.json").is_file():
        base = read_json(path / "adapter_config.json", "PEFT adapter config")
        base = base.get("base_model_name_or_path") if isinstance(base, dict) else None
        raise GradlensError(f"{name} is a PEFT adapter, not a model; pass its base model (base_model_name_or_path="
                            f"{base!r}) as the model")
    local = path.is_dir()
    if path.exists() and not local:
        raise GradlensError(f"model path {name!r} is a file, not a model directory")
    if not local and name.startswith((".", "/", "~", os.path.sep)):
        raise GradlensError(f"model path {name!r} does not exist or is not a directory")
    if local and revision not in (None, "main"):
        raise GradlensError(f"--model_revision {revision}: {name} is a local directory; revisions are of hub ids")
    if local and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise GradlensError(f"model directory {name} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                            "save one there with tokenizer.save_pretrained()")
    source = str(path) if local else name
    hub = {} if local else {"revision": revision}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **hub)
        check_tokenizer(tokenizer, name)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **hub, **model_kwargs)
    except (OSError, ValueError) as e:
        hub = None if local else hub_cause(e, name, revision=revision)
        raise GradlensError(f"cannot load model {name!r}: {hub or cause(e)}") from e
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise GradlensError(f"the tokenizer of {name} has {len(tokenizer)} tokens but the model embeds only {rows}: "
                            "tokenizer and model do not belong together")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    """Refuse a degenerate tokenizer: one whose vocabulary holds nothing but special tokens encodes every text as
    unknown or nothing, so training would see empty text."""
    ordinary = set(tokenizer.get_vocab()) - set(tokenizer.all_special_tokens)
    if not ordinary:
        raise GradlensError(f"the tokenizer of {name} has no ordinary tokens, only {len(tokenizer.get_vocab())} "
                            "special one(s): its tokenizer files are missing or broken")


def resolve_device(device: str) -> str:
    """``cpu`` or ``cuda``; ``auto`` is the GPU if there is one. Asking for a missing GPU is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise GradlensError("--device cuda: no CUDA GPU is available to this process")
    if device not in ("cpu", "cuda"):
        raise GradlensError(f"unknown device {device!r}; choose auto, cpu or cuda")
    return device


def resolve_dtype(model_dtype: str, device: str, model: str) -> str:
    """The dtype to load ``model`` in: ``auto`` is bfloat16 on a bf16-capable GPU, else float32 (always for toys);
    any other value is taken as asked, toys included (their saved weights are float32)."""
    if model_dtype != "auto":
        return model_dtype
    if model.startswith(TOY_PREFIX) or device != "cuda":
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
