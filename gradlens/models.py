"""Models: loading (the toy base models and any ``from_pretrained`` causal LM), where to train and in which dtype,
and LoRA-FA adapters: LoRA with every ``lora_A`` frozen, so only ``lora_B`` trains.

Freezing A makes the trainable update of each adapted weight ``B @ A`` linear in B, which is what lets a sparse mask
over the entries of B stand for a sparse weight update. Defaults follow the hardware: bf16 weights on a GPU that
supports it (and the Trainer's bf16 autocast with them), float32 on a CPU, where bf16 matmuls are slow and lossy. The
toy models always load in float32 so that toy runs stay reproducible on any machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gradlens.config import TOY_PREFIX
from gradlens.errors import GradlensError
from gradlens.hub import first_line, hub_cause
from gradlens.modules import ALL_PROJECTIONS

# Files one of which every saved tokenizer has; a model directory with none of them has no tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")
_PROBE = "gradlens-probe-7"  # a message content no chat template alters, to find what the template puts after it


def load_model(spec: str, dtype: str = "float32", *, progress: bool = True, revision: str | None = None
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) for ``toy:PRESET`` (always float32, built on first use) or a ``from_pretrained`` path or
    hub id (at ``revision``) in ``dtype``."""
    if spec.startswith(TOY_PREFIX):
        from gradlens.toy.model import ensure_base_model

        return load_model_and_tokenizer(ensure_base_model(spec[len(TOY_PREFIX) :], progress=progress))
    return load_model_and_tokenizer(spec, dtype=dtype, revision=revision)


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
        cause = None if local else hub_cause(e, name, revision=revision)
        raise GradlensError(f"cannot load model {name!r}: {cause or first_line(e)}") from e
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


def _linear_layers(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """Every linear layer (``nn.Linear``/``Conv1D``, or one PEFT already adapted) by full name, in model order,
    skipping the adapters' own parts (``base_layer``, ``lora_A.default``, ...)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers.pytorch_utils import Conv1D

    inside_adapters = {f"{name}.{sub}" for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)
                       for sub, _ in m.named_modules() if sub}
    for name, m in model.named_modules():
        if isinstance(m, BaseTunerLayer | torch.nn.Linear | Conv1D) and name not in inside_adapters:
            yield name, m


def _linear_names(model: torch.nn.Module) -> set[str]:
    """Last name component of every linear layer, including those already wrapped by a LoRA layer."""
    return {name.rsplit(".", 1)[-1] for name, _ in _linear_layers(model)}


def default_lora_targets(model: torch.nn.Module) -> list[str]:
    """Every linear projection of the architecture, by the rule of PEFT's ``target_modules="all-linear"``.

    That is every ``nn.Linear``/``Conv1D`` except the output embedding (the LM head), given by last name component
    in model order: ``q_proj ... down_proj`` on Llama, Qwen2/3, Mistral and Gemma, ``c_attn c_proj c_fc`` on GPT-2.
    Names, not full paths, so the targets read like a recipe and ``--modules`` can select among them.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None  # PeftModel forwards it
    names = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name, m in _linear_layers(model) if m is not head))
    if not names:
        raise GradlensError(f"{type(model).__name__} has no linear projection to adapt besides its output head "
                            f"(expected nn.Linear/Conv1D layers such as {', '.join(ALL_PROJECTIONS)})")
    return names


def lora_config(model: torch.nn.Module, *, r: int = 8, alpha: int | None = None,
                target_modules: Sequence[str] | None = None, dropout: float = 0.0):
    """A PEFT ``LoraConfig`` for a causal LM, checking that every target names a linear layer of ``model``.

    ``target_modules=None`` adapts every linear projection of the architecture (:func:`default_lora_targets`).
    """
    from peft import LoraConfig

    if r < 1:
        raise GradlensError(f"LoRA rank must be >= 1, got {r}")
    targets = default_lora_targets(model) if target_modules is None else list(target_modules)
    if not targets:
        raise GradlensError("no LoRA target modules given")
    available = _linear_names(model)
    unknown = [t for t in targets if t not in available]
    if unknown:
        raise GradlensError(f"{type(model).__name__} has no LoRA target module(s) {', '.join(unknown)}; "
                            f"its linear layers are: {', '.join(sorted(available))}")
    return LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r, target_modules=targets,
                      lora_dropout=dropout, bias="none", task_type="CAUSAL_LM")


def lora_b_parameters(model: torch.nn.Module, adapter: str | None = None) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """``(module name, lora_B weight)`` of every PEFT LoRA layer, found by module type, for one adapter.

    ``adapter`` defaults to each layer's active adapter; other adapters (e.g. GRPO's frozen ``ref``) are skipped.
    Module names drop PEFT's ``base_model.model.`` prefix so they match the base model's own names.
    """
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        active = module.active_adapters
        names = [adapter] if adapter is not None else active
        for a in names:
            if a in module.lora_B:
                yield name.removeprefix("base_model.model."), module.lora_B[a].weight


def attach_lora(model: PreTrainedModel, *, r: int = 8, alpha: int | None = None,
                target_modules: Sequence[str] | None = None, dropout: float = 0.0, seed: int = 0):
    """Wrap ``model`` in a PEFT LoRA adapter (LoRA-FA): every ``lora_A`` frozen, only ``lora_B`` requires grad.

    B starts at zero as in standard LoRA; A keeps PEFT's (seeded) Kaiming init and never changes.
    """
    from peft import get_peft_model

    config = lora_config(model, r=r, alpha=alpha, target_modules=target_modules, dropout=dropout)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    freeze_lora_a(peft_model)
    return peft_model


def freeze_lora_a(model: torch.nn.Module) -> None:
    """Set ``requires_grad`` so that exactly the ``lora_B`` weights of the LoRA layers train."""
    trainable = {id(p) for _, p in lora_b_parameters(model)}
    if not trainable:
        raise GradlensError("model has no PEFT LoRA adapter (no LoraLayer found); attach one with attach_lora()")
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)


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
    """The dtype to load ``model`` in: ``auto`` is bfloat16 on a bf16-capable GPU, else float32 (always for toys)."""
    if model_dtype != "auto":
        return model_dtype
    if model.startswith(TOY_PREFIX) or device != "cuda":
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"


def trainer_overrides(device: str, dtype: str) -> dict[str, Any]:
    """TRL/Trainer settings that follow from device and dtype; the user's own TRL settings override them."""
    out: dict[str, Any] = {}
    if device == "cpu":
        out["use_cpu"] = True
    elif dtype == "bfloat16":
        out["bf16"] = True  # autocast for the float32 LoRA weights PEFT keeps next to bf16 base weights
    return out


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Token ids generation stops at: the tokenizer's eos, the model config's and the generation config's."""
    ids: set[int] = set()
    configs = (model.config.get_text_config(), getattr(model, "generation_config", None))
    for value in (tokenizer.eos_token_id, *(getattr(c, "eos_token_id", None) for c in configs)):
        ids.update([value] if isinstance(value, int) else value or [])
    return ids


def _token_after(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> int | None:
    """The first token the chat template puts after the last message's content (its end-of-turn marker), or None
    when it puts nothing there."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    rest = text[text.rindex(_PROBE) + len(_PROBE) :].lstrip()
    ids = tokenizer(rest, add_special_tokens=False)["input_ids"] if rest else []
    return ids[0] if ids else None


def resolve_prompt_format(prompt_format: str, model_name: str, model: PreTrainedModel,
                          tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """``(format, reason)``: whether math prompts go through the chat template (``chat``) or not (``plain``), and
    why, in words for the console and the provenance. The line is also printed.

    ``plain``/``chat`` are taken as given (``chat`` needs a template). ``auto`` decides from the tokenizer and the
    model's configs, never the name (a fine-tuned copy in ``models/my-sft-checkpoint`` is still a chat model), and
    not from the template's presence alone: base checkpoints such as Qwen2.5-1.5B ship the chat template of their
    instruct sibling without being tuned to follow it. The test: render a user/assistant exchange and take the
    token the template closes the assistant turn with (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``). A model
    trained on the template learned to stop there, so its releases list that token among their stop tokens (the
    tokenizer's eos, ``config.eos_token_id``, ``generation_config.eos_token_id``; TRL's ``eos_token`` setting and
    ``clone_chat_template`` add it too); a base model stops at end-of-text only. Hence: no template, or one that
    marks no end of turn: ``plain``; the turn-closing token is a stop token: ``chat``; else ``plain``.

    What it cannot see: templates that close the reply with the plain end-of-text token (``</s>`` in
    Mistral-Instruct and Llama-2-chat, the same token their base models stop at) cannot tell base from chat-trained.
    Such a template (the token closes assistant turns but not user turns) counts as ``chat``, since base models of
    that style rarely ship a template, and the reason says so; ``--prompt_format plain`` overrides it. And a chat
    fine-tune saved with its base model's stop tokens reads as ``plain``; ``--prompt_format chat`` overrides it.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format in ("chat", "plain"):
        if prompt_format == "chat" and not has_template:
            raise GradlensError(f"--prompt_format chat: the tokenizer of {model_name} has no chat template")
        fmt, reason = prompt_format, f"--prompt_format {prompt_format}"
    elif not has_template:
        fmt, reason = "plain", "the tokenizer has no chat template"
    else:
        fmt, reason = _judge_template(model, tokenizer)
    print(f"gradlens: prompt format {fmt} for {model_name}: {reason}")
    return fmt, reason


def _judge_template(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """The ``auto`` verdict on a tokenizer that has a chat template (see :func:`resolve_prompt_format`)."""
    try:
        end = _token_after(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}])
        user_end = _token_after(tokenizer, [{"role": "user", "content": _PROBE}])
    except Exception as e:  # jinja raises many types (TemplateError, TypeError, ...); any means "not usable"
        return "plain", f"its chat template does not render a user/assistant exchange ({first_line(e)})"
    if end is None:
        return "plain", "its chat template marks no end of an assistant turn"
    stops = stop_token_ids(model, tokenizer)
    name = tokenizer.convert_ids_to_tokens(end)
    if end not in stops:
        listed = ", ".join(str(t) for t in tokenizer.convert_ids_to_tokens(sorted(stops))) or "none"
        return "plain", (f"its chat template closes a reply with {name}, which is not among the model's stop tokens "
                         f"({listed}): a base model shipping a template (--prompt_format chat overrides)")
    if end != user_end:
        return "chat", (f"its chat template closes a reply with the stop token {name}, which also ends plain text, so "
                        "a base model would look the same (--prompt_format plain overrides)")
    return "chat", f"its chat template closes every turn with {name}, one of the model's stop tokens"
