"""The prompt format of math tasks (plain text or the tokenizer's chat template) and the tokens generation stops at,
decided from the tokenizer and the model's configs: where the prompts live, so evaluation and training agree."""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gradlens.errors import GradlensError

_PROBE = "gradlens-probe-7"  # a message content no chat template alters, to find what the template puts after it


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
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return "plain", f"its chat template does not render a user/assistant exchange ({first})"
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
