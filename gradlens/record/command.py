"""``record``: one TRL training run (SFT or GRPO) of a LoRA-FA model with the :class:`GradientRecorder` attached.

This is the library behind ``gradlens record``; notebooks call :func:`record` with a :class:`RecordConfig`.
The embedded default (``model="toy:tiny"``, ``task="addition"``) runs offline on a laptop CPU.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gradlens.config import RecordConfig
from gradlens.errors import GradlensError
from gradlens.store import MANIFEST

EVAL_FILE = "eval.json"

@dataclass
class Prepared:
    """A run's LoRA-FA model and data, built from a :class:`RecordConfig` (the shared setup of record and train)."""

    model: Any
    tokenizer: Any
    task: Any
    data: Any
    eval_data: Any
    device: str
    model_dtype: str


def prepare(config: RecordConfig) -> Prepared:
    """Seed, device and dtype, the model with its LoRA-FA adapter (A drawn with ``config.seed``), the task (its
    prompt format decided for this model) and its training rows, and the held-out rows when ``n_eval > 0`` (loaded
    now, so a bad split fails before training)."""
    from transformers import set_seed

    from gradlens.models import attach_lora, load_model, resolve_device, resolve_dtype
    from gradlens.trainers import load_task_for

    set_seed(config.seed)
    device = resolve_device(config.device)
    model_dtype = resolve_dtype(config.model_dtype, device, config.model)
    model, tokenizer = load_model(config.model, model_dtype, revision=config.model_revision)
    model = attach_lora(model, r=config.lora_r, alpha=config.lora_alpha, target_modules=config.lora_target_modules,
                        seed=config.seed)
    task = load_task_for(config, model, tokenizer)
    data = task.dataset(task.train_split, config.n_train)
    eval_data = task.dataset(task.eval_split, config.n_eval) if config.n_eval > 0 else None
    return Prepared(model, tokenizer, task, data, eval_data, device, model_dtype)


@dataclass(frozen=True)
class RecordResult:
    """Where the run is and what it holds (``bytes``: the run files and adapter, without Trainer checkpoints).

    ``signal`` counts the steps this call recorded and those without a learning signal (``no_signal``, and by reason
    ``zero_gradient`` / ``zero_reward_std``); ``no_signal_share`` is their share (None if no step was recorded).
    """

    path: Path
    steps: int
    bytes: int
    trainer: Any
    eval: dict[str, Any] | None = None  # n_eval > 0: greedy held-out accuracy (also in eval.json)
    signal: dict[str, int] = field(default_factory=dict)
    no_signal_share: float | None = None


def _resume_checkpoint(trainer_dir: Path, last_recorded: int | None) -> str | None:
    """The newest Trainer checkpoint at or before the last recorded step, so no step goes unrecorded."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    if last_recorded is None or not trainer_dir.is_dir():
        return None
    found = []
    for d in trainer_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = d.name.rsplit("-", 1)[-1]
        if step.isdigit() and int(step) <= last_recorded and (d / "trainer_state.json").is_file():
            found.append((int(step), d))
    return str(max(found)[1]) if found else None


def record(config: RecordConfig, *, progress: bool = True) -> RecordResult:
    """Train with TRL under ``config`` and record every LoRA-B gradient into ``config.out``.

    ``progress=False`` drops the Trainer's progress bar and console logs (callers with their own bar, like compare).
    """
    from transformers import PrinterCallback, ProgressCallback

    from gradlens.evaluate import greedy_report
    from gradlens.fsio import json_dump
    from gradlens.record.recorder import GradientRecorder
    from gradlens.store import open_run, writer_leftovers_only
    from gradlens.trainers import build_trainer, check_overrides, trl_settings

    check_overrides(config.regime, config.trl)
    out = Path(config.out)
    if (out / MANIFEST).exists() and not config.resume:
        raise GradlensError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if not (out / MANIFEST).exists() and not writer_leftovers_only(out, also=("trainer",)):  # a kill's are fine
        raise GradlensError(f"{out} exists and is not a gradlens run; choose an empty or new --out")
    previous = open_run(out).steps if config.resume and (out / MANIFEST).exists() else []
    last_recorded = previous[-1] if previous else None

    prep = prepare(config)
    task, tokenizer = prep.task, prep.tokenizer
    trainer_dir = out / "trainer"
    trainer = build_trainer(config.regime, prep.model, tokenizer, prep.data, task, output_dir=str(trainer_dir),
                            settings=trl_settings(config, task, prep.device, prep.model_dtype))
    if not progress:
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
    provenance = {"record": asdict(config), "pid": os.getpid(), "device": prep.device, "model_dtype": prep.model_dtype,
                  "task": task.describe(), "prompt_format": task.prompt_format,
                  "prompt_format_reason": task.format_reason}
    recorder = GradientRecorder.attach(trainer, out, modules=config.modules, every_n_steps=config.every_n_steps,
                                       dtype=config.dtype, save_raw=config.save_raw, resume=config.resume,
                                       steps_per_shard=config.steps_per_shard,
                                       config=provenance, seed=config.seed)
    try:
        trainer.train(resume_from_checkpoint=_resume_checkpoint(trainer_dir, last_recorded))
    finally:
        recorder.close()
    evaluation = None
    if trainer.is_world_process_zero():  # one writer under DDP, like the recorder
        trainer.model.save_pretrained(out / "adapter")  # the trained LoRA adapter, loadable with PEFT
        if prep.eval_data is not None:
            evaluation = greedy_report(trainer.model, tokenizer, task, prep.eval_data)
            json_dump({"split": task.eval_split, **evaluation}, out / EVAL_FILE)
    run = open_run(out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and trainer_dir not in f.parents)
    return RecordResult(path=out, steps=len(run.steps), bytes=size, trainer=trainer, eval=evaluation,
                        signal=dict(recorder.signal.counts), no_signal_share=recorder.signal.share)
