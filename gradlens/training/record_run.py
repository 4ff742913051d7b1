"""``record``: one training run with every LoRA-B gradient recorded into a run directory, and resume.

The library behind ``gradlens record``; notebooks call :func:`record` with a :class:`RecordConfig`. It is
:func:`~gradlens.training.run.run_training` with the recorder writing into ``config.out`` plus what resuming needs:
the run directory must be new unless ``resume``, and a resumed run restarts from the newest Trainer checkpoint at or
before its last recorded step (steps already recorded are skipped). The embedded default (``model="toy:tiny"``,
``task="addition"``) runs offline on a laptop CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradlens.config import RecordConfig
from gradlens.errors import GradlensError
from gradlens.store import MANIFEST
from gradlens.training.run import TRAINER_DIR
from gradlens.training.setup import RunSetup


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
    train_seconds: float = 0.0


def resume_checkpoint(trainer_dir: Path, last_recorded: int | None) -> str | None:
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


def record(config: RecordConfig, *, progress: bool = True, setup: RunSetup | None = None,
           tool: str = "gradlens record") -> RecordResult:
    """Train with TRL under ``config`` and record every LoRA-B gradient into ``config.out``.

    ``progress=False`` drops the Trainer's progress bar and console logs (callers with their own bar, like compare);
    ``setup``: the model, task and rows when the caller already holds them (a compare's probe).
    """
    from gradlens.store import open_run, writer_leftovers_only
    from gradlens.training.run import run_training
    from gradlens.training.settings import check_overrides

    check_overrides(config.regime, config.trl)
    out = Path(config.out)
    if (out / MANIFEST).exists() and not config.resume:
        raise GradlensError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if not (out / MANIFEST).exists() and not writer_leftovers_only(out, also=(TRAINER_DIR,)):  # a kill's are fine
        raise GradlensError(f"{out} exists and is not a gradlens run; choose an empty or new --out")
    previous = open_run(out).steps if config.resume and (out / MANIFEST).exists() else []
    checkpoint = resume_checkpoint(out / TRAINER_DIR, previous[-1] if previous else None)
    result = run_training(config, out=out, tool=tool, setup=setup, record_dir=out, resume=config.resume,
                          resume_from_checkpoint=checkpoint, progress=progress)
    run = open_run(out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and out / TRAINER_DIR not in f.parents)
    return RecordResult(path=out, steps=len(run.steps), bytes=size, trainer=result.trainer, eval=result.eval,
                        signal=result.signal, no_signal_share=result.no_signal_share, train_seconds=result.seconds)
