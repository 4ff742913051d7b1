"""``record``: one TRL training run (SFT or GRPO) of a LoRA-FA model with the :class:`GradientRecorder` attached.

This is the library behind ``gradlens record``; notebooks call :func:`record` with a :class:`RecordConfig`.
The embedded default (``model="toy:tiny"``, ``task="addition"``) runs offline on a laptop CPU.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gradlens.config import TOY_PREFIX, RecordConfig
from gradlens.errors import GradlensError
from gradlens.store import MANIFEST

EVAL_FILE = "eval.json"
__all__ = ["RecordConfig", "RecordResult", "load_model", "load_task_dataset", "record"]

@dataclass(frozen=True)
class RecordResult:
    """Where the run is and what it holds (``bytes``: the run files and adapter, without Trainer checkpoints)."""

    path: Path
    steps: int
    bytes: int
    trainer: Any
    eval: dict[str, Any] | None = None  # math task with n_eval > 0: greedy held-out accuracy (also in eval.json)


def load_task_dataset(task: str, n: int | None):
    """(train dataset, reward function) for the toy task or a local file."""
    from gradlens.math_task import DATA_FILE_TYPES
    from gradlens.toy.task import AdditionTask, exact_match_reward

    if task == "addition":  # one fixed train/held-out split for every seed: the seed only orders the data
        return AdditionTask().dataset("train", n), exact_match_reward
    path = Path(task)
    if path.suffix not in DATA_FILE_TYPES:
        raise GradlensError(f"unknown task {task!r}: use 'addition', a .json/.jsonl/.csv/.parquet file, 'gsm8k' or "
                            "'gsm8k:SOURCE'")
    if not path.is_file():
        raise GradlensError(f"task file {task} does not exist")
    from datasets import load_dataset

    try:
        data = load_dataset(DATA_FILE_TYPES[path.suffix], data_files=str(path), split="train")
    except Exception as e:  # datasets raises many types; the message names the cause
        raise GradlensError(f"cannot read task file {task}: {str(e).splitlines()[0]}") from e
    missing = {"prompt", "answer"} - set(data.column_names)
    if missing:
        raise GradlensError(f"task file {task} lacks column(s) {', '.join(sorted(missing))}")
    if "completion" not in data.column_names:
        data = data.add_column("completion", [str(a) for a in data["answer"]])
    if n is not None:
        data = data.select(range(min(n, len(data))))
    return data, exact_match_reward


def load_model(spec: str, seed: int, dtype: str = "float32"):
    """(model, tokenizer) for ``toy:PRESET`` (always float32) or a ``from_pretrained`` path / hub id in ``dtype``."""
    from gradlens.adapters import load_model_and_tokenizer
    from gradlens.toy.model import load_base_model

    if spec.startswith(TOY_PREFIX):
        return load_base_model(spec[len(TOY_PREFIX) :], progress=True)
    return load_model_and_tokenizer(spec, dtype=dtype)


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
    from transformers import PrinterCallback, ProgressCallback, set_seed

    from gradlens.adapters import attach_lora
    from gradlens.math_task import MathTask, greedy_accuracy, is_math_task, reward_functions
    from gradlens.models import resolve_device, resolve_dtype, trainer_overrides, uses_chat_template
    from gradlens.recorder import GradientRecorder
    from gradlens.regimes import build_grpo_trainer, build_sft_trainer, check_overrides
    from gradlens.store import _json_dump, open_run, writer_leftovers_only

    check_overrides(config.regime, config.trl_overrides())
    out = Path(config.out)
    if (out / MANIFEST).exists() and not config.resume:
        raise GradlensError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if not (out / MANIFEST).exists() and not writer_leftovers_only(out, also=("trainer",)):  # a kill's are fine
        raise GradlensError(f"{out} exists and is not a gradlens run; choose an empty or new --out")
    previous = open_run(out).steps if config.resume and (out / MANIFEST).exists() else []
    last_recorded = previous[-1] if previous else None

    set_seed(config.seed)
    device = resolve_device(config.device)
    model_dtype = resolve_dtype(config.model_dtype, device, config.model)
    model, tokenizer = load_model(config.model, config.seed, model_dtype)
    model = attach_lora(model, r=config.lora_r, alpha=config.lora_alpha, target_modules=config.lora_target_modules,
                        seed=config.seed)
    math = eval_data = None
    if is_math_task(config.task):
        math = MathTask.from_spec(config.task, dataset_config=config.dataset_config,
                                  question_column=config.question_column, answer_column=config.answer_column,
                                  chat=uses_chat_template(config.prompt_format, config.model, tokenizer))
        data, reward = math.dataset(config.train_split, config.n_train), reward_functions(config.format_reward)
        eval_data = math.dataset(config.eval_split, config.n_eval) if config.n_eval > 0 else None  # fail early
    else:
        data, reward = load_task_dataset(config.task, config.n_train)
    trainer_dir = out / "trainer"
    overrides = {**trainer_overrides(device, model_dtype), **config.trl_overrides()}
    if config.regime == "sft":
        trainer = build_sft_trainer(model, tokenizer, data, output_dir=str(trainer_dir), overrides=overrides)
    else:
        trainer = build_grpo_trainer(model, tokenizer, data, reward, output_dir=str(trainer_dir),
                                     overrides=overrides)
    if not progress:
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
    provenance = {"record": asdict(config), "pid": os.getpid(), "device": device, "model_dtype": model_dtype,
                  "prompt_format": None if math is None else ("chat" if math.chat else "plain")}
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
        if eval_data is not None:
            evaluation = greedy_accuracy(trainer.model, tokenizer, math, eval_data,
                                         max_new_tokens=config.eval_max_new_tokens)
            _json_dump({"split": config.eval_split, **evaluation}, out / EVAL_FILE)
    run = open_run(out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and trainer_dir not in f.parents)
    return RecordResult(path=out, steps=len(run.steps), bytes=size, trainer=trainer, eval=evaluation)
