"""The TRL trainer of every gradlens run: :func:`build_trainer` is the only place an ``SFTTrainer`` or
``GRPOTrainer`` is made, for record, train, probe and compare alike, from a LoRA-FA model, a task and the run's TRL
settings (:mod:`gradlens.training.settings`).

Note on GRPO batch sizes: in ``GRPOConfig``, ``per_device_train_batch_size`` counts *completions*, not prompts. With
``num_generations=G``, one micro-batch of ``B`` completions covers ``B / G`` prompts, and ``B`` times the number of
processes (times ``steps_per_generation``) must be divisible by ``G``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gradlens.callback_order import add_first
from gradlens.errors import GradlensError
from gradlens.sparse.space import LORA_B, space_parameters
from gradlens.tasks.base import Task
from gradlens.training.settings import build_trl_config


def build_trainer(regime: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, train_dataset: Any,
                  task: Task, *, output_dir: str, settings: Mapping[str, Any] | None = None, eval_dataset: Any = None,
                  callbacks: Sequence[Any] = (), space: str = LORA_B):
    """The ``SFTTrainer`` or ``GRPOTrainer`` of a LoRA model (``space="weight"``: of a model whose chosen base
    weights train, without an adapter): SFT on the dataset's completions (prompt-completion format: the loss covers
    the completion only), GRPO with the task's reward functions. A model without what ``space`` trains is a one-line
    error (a plain model would otherwise train every weight).

    ``callbacks`` go first among the Trainer's, in the given order (:mod:`gradlens.callback_order`, which also
    says the order gradlens's own callbacks take).
    """
    from trl import GRPOTrainer, SFTTrainer

    space_parameters(model, space, "the model")
    args = build_trl_config(regime, output_dir, settings)
    if regime == "sft":
        trainer = SFTTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                             processing_class=tokenizer)
        if len(trainer.train_dataset) == 0:  # TRL drops examples whose completion was truncated away
            raise GradlensError(f"no SFT example has a completion token within max_length={args.max_length}; "
                                "raise --max_length")
    else:
        trainer = GRPOTrainer(model=model, reward_funcs=task.reward_functions(), args=args,
                              train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=tokenizer)
    add_first(trainer, callbacks)
    return trainer
