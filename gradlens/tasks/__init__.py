"""Tasks behind one interface (:class:`~gradlens.tasks.base.Task`): the embedded addition task, a local
prompt/answer file, and GSM8K-style math. :func:`load_task` turns a ``--task`` value into one;
:func:`load_task_for` also decides the prompt format of a math task for the model it will train
(:mod:`.prompt_format`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gradlens.config import MATH_PREFIX, TOY_PREFIX
from gradlens.tasks.base import Task, completion_text, exact_match, exact_match_reward

if TYPE_CHECKING:
    from gradlens.config import ModelTaskConfig

__all__ = ["Task", "completion_text", "exact_match", "exact_match_reward", "is_math_task", "load_task",
           "load_task_for"]


def is_math_task(task: str) -> bool:
    return task == MATH_PREFIX or task.startswith(f"{MATH_PREFIX}:")


def load_task(config: ModelTaskConfig, *, chat: bool = False, format_reason: str = "set by the caller") -> Task:
    """The task a config names: ``addition`` (digits of the toy preset in ``--model``), a local
    prompt/answer file, or ``gsm8k``/``gsm8k:SOURCE`` with the config's columns, splits and reward options.

    ``chat``: whether math prompts go through the tokenizer's chat template, and ``format_reason`` why (see
    :func:`load_task_for`, which decides both from the loaded model and tokenizer).
    """
    if config.task == "addition":
        from gradlens.tasks.addition import AdditionTask

        if config.model.startswith(TOY_PREFIX):
            from gradlens.toy_presets import get_preset

            return AdditionTask(digits=get_preset(config.model[len(TOY_PREFIX) :]).digits)
        return AdditionTask()
    if is_math_task(config.task):
        from gradlens.tasks.gsm8k import MathTask
        from gradlens.toy_presets import MATH_TRL_DEFAULTS, world

        defaults = MATH_TRL_DEFAULTS if world(config.model) == "math" else {}
        return MathTask.from_spec(config.task, dataset_config=config.dataset_config, regime_defaults=defaults,
                                  question_column=config.question_column, answer_column=config.answer_column,
                                  chat=chat, train_split=config.train_split, eval_split=config.eval_split,
                                  eval_max_new_tokens=config.eval_max_new_tokens,
                                  with_format_reward=config.format_reward, format_reason=format_reason)
    from gradlens.tasks.prompt_file import PromptFileTask

    return PromptFileTask(config.task)


def load_task_for(config: ModelTaskConfig, model: Any, tokenizer: Any) -> Task:
    """The config's task, with the prompt format of math tasks decided for this model and tokenizer (printed, and
    kept with its reason in ``task.describe()``, the provenance of every result); other tasks are plain text."""
    if not is_math_task(config.task):
        return load_task(config)
    from gradlens.tasks.prompt_format import resolve_prompt_format

    fmt, reason = resolve_prompt_format(config.prompt_format, config.model, model, tokenizer)
    return load_task(config, chat=fmt == "chat", format_reason=reason)
