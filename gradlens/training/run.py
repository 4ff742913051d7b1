"""One training run, the only place a Trainer's ``train()`` is called: set up (or take) the model, build the TRL
trainer, add the callbacks in their written order (:mod:`gradlens.callback_order`), train, and finish.

Every command that trains goes through :func:`run_training`: ``gradlens record`` (with the recorder and resume),
``train`` (optionally with a mask and the recorder), ``probe`` (a short recorded run) and every run of ``compare`` (on
a copy of the base model compare holds in memory, writing nothing). Finishing is the same for all: the adapter is
saved (only the active adapter, sparse-B with its mask), the held-out rows are evaluated, ``train.json`` gets the
provenance and timings, an adapter that learned nothing is a warning, and the Trainer's output directory is removed
again when training left nothing in it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from gradlens.config import RecordConfig
from gradlens.errors import GradlensError, GradlensWarning
from gradlens.fsio import remove_if_empty
from gradlens.training.setup import RunSetup

TRAIN_FILE = "train.json"
EVAL_FILE = "eval.json"
ADAPTER_DIR = "adapter"
TRAINER_DIR = "trainer"


@dataclass(frozen=True)
class TrainingResult:
    """What one run did and where its outputs are (``path`` None: the run wrote nothing, as compare's runs).

    ``info`` is ``train.json``; ``eval`` greedy held-out accuracy (also ``eval.json``); ``run`` the recorded run;
    ``signal`` counts the recorded steps without a learning signal (``no_signal``, and by reason) and
    ``no_signal_share`` is their share (None if nothing was recorded); ``finite``: every logged loss and every trained
    B weight stayed finite.
    """

    path: Path | None
    trainer: Any
    steps: int
    seconds: float
    wall_seconds: float
    finite: bool
    info: dict[str, Any]
    adapter: Path | None = None
    eval: dict[str, Any] | None = None
    run: Path | None = None
    signal: dict[str, int] = field(default_factory=dict)
    no_signal_share: float | None = None

    @property
    def model(self) -> Any:
        return self.trainer.model


def train_runtime(trainer: Any) -> float:
    """The Trainer's own measured training time (``train_runtime`` of its final log entry)."""
    for entry in reversed(trainer.state.log_history):
        if "train_runtime" in entry:
            return float(entry["train_runtime"])
    raise GradlensError("the trainer logged no train_runtime; did training run?")


def stayed_finite(trainer: Any, space: str = "lora_b") -> bool:
    """Whether training stayed finite: every logged loss and every trained LoRA-B weight (or base weight)."""
    import torch

    from gradlens.dtensors import is_sharded, local, sum_over_processes
    from gradlens.sparse.space import space_parameters

    losses = [v for entry in trainer.state.log_history for k, v in entry.items() if k in ("loss", "train_loss")]
    if not all(math.isfinite(float(v)) for v in losses):
        return False
    params = [p.detach() for _, p in space_parameters(trainer.model, space)]
    if any(is_sharded(p) for p in params):  # FSDP2: every process checks its blocks
        return sum_over_processes([(~torch.isfinite(local(p))).sum() for p in params], params) == 0
    return all(bool(torch.isfinite(p).all()) for p in params)


def record_fields(config: RecordConfig) -> dict[str, Any]:
    """The :class:`RecordConfig` part of a command config (train's and probe's extend it): what the run trained and
    recorded, as every manifest keeps it under ``config.record``."""
    return {f.name: getattr(config, f.name) for f in fields(RecordConfig)}


def _mask_info(mask: Mapping[str, Any] | None, meta: Mapping[str, str], path: str | None) -> dict[str, Any] | None:
    if mask is None:
        return None
    k, entries = sum(int(m.sum()) for m in mask.values()), sum(m.size for m in mask.values())
    return {"path": path, "k": k, "entries": entries, "share": k / entries, "metadata": dict(meta)}


def _save_adapter(model: Any, out: Path, mask: Mapping[str, Any] | None, meta: Mapping[str, str],
                  state: dict[str, Any] | None = None) -> Path:
    """Only the active adapter (not GRPO's ``ref``), as a PEFT directory; sparse-B with its mask. ``state``: the
    adapter's full tensors under FSDP2 (:func:`~gradlens.record.sharded.gather_lora_state`)."""
    from gradlens.models import unwrap
    from gradlens.sparse.export import export_adapter

    if mask is not None:
        return export_adapter(model, out, mask, meta, state=state)
    model = unwrap(model)
    model.save_pretrained(out, selected_adapters=[model.active_adapter], state_dict=state)
    return out if model.active_adapter == "default" else out / model.active_adapter


def _warn(notes: list[str], note: str) -> None:
    notes.append(note)
    warnings.warn(note, GradlensWarning, stacklevel=2)


@contextlib.contextmanager
def _environment(name: str, value: str):
    """``os.environ[name] = value`` for the run, restored after it."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _eval_dataset(setup: RunSetup, settings: Mapping[str, Any], config: RecordConfig) -> Any:
    """The Trainer's eval dataset when ``--eval_strategy`` asks for evaluation: the task's eval split (the first
    ``n_eval`` rows when set: the rows the setup already loaded)."""
    if str(settings.get("eval_strategy", "no")) == "no":
        return None
    if setup.eval_data is not None:
        return setup.eval_data
    return setup.task.dataset(setup.task.eval_split)


def run_training(config: RecordConfig, *, out: Path | None, tool: str, setup: RunSetup | None = None,
                 mask: Mapping[str, Any] | None = None, mask_meta: Mapping[str, str] | None = None,
                 mask_path: str | None = None, record_dir: Path | None = None, resume: bool = False,
                 resume_from_checkpoint: str | None = None, drift_guard: Any = None, callbacks: Sequence[Any] = (),
                 progress: bool = True, settings: Mapping[str, Any] | None = None,
                 notes: Sequence[str] = ()) -> TrainingResult:
    """Train ``config`` (see the module docstring) and return what the run did.

    ``out``: where the Trainer's directory, the adapter, ``eval.json`` and ``train.json`` go (None: a temporary
    Trainer directory and no outputs); ``setup``: the model, task and rows when the caller made them
    (:func:`~gradlens.training.setup.setup_run` otherwise); ``mask``: sparse-B, only its entries of B train (space
    ``weight``: only its entries of W, and ``OUT/sparse_delta.safetensors`` holds trained minus base);
    ``record_dir``: record every B gradient there (``resume``: continue the run in it); ``drift_guard``: a
    :class:`~gradlens.drift.DriftGuard` to fingerprint the base weights; ``callbacks``: more TrainerCallbacks (after
    gradlens's own); ``progress=False`` drops the Trainer's bar and console logs; ``settings``: TRL fields over the
    run's own; ``notes``: warnings already said, kept in ``train.json``.
    """
    from transformers import PrinterCallback, ProgressCallback

    from gradlens.callback_order import add_first
    from gradlens.drift import describe
    from gradlens.lora import b_nonzero
    from gradlens.sparse.delta import moved_entries
    from gradlens.sparse.space import WEIGHT, space_parameters
    from gradlens.training.settings import check_overrides, trl_settings
    from gradlens.training.setup import setup_run
    from gradlens.training.trl_trainer import build_trainer

    start = time.perf_counter()
    check_overrides(config.regime, config.trl)
    setup = setup or setup_run(config)
    params = space_parameters(setup.model, config.space, "the model")
    if mask is not None:
        from gradlens.sparse.masks import check_mask_fits

        check_mask_fits(mask, {n: tuple(p.shape) for n, p in params}, f"--mask {mask_path}")
    if config.space == WEIGHT and drift_guard is not None:
        raise GradlensError("the drift guard checks that base weights stay frozen; space 'weight' trains them")
    # space weight: the base weights, before a checkpoint is loaded, for the delta and for the masked-out entries
    anchors = {n: p.detach().clone() for n, p in params} if config.space == WEIGHT else None
    trl = {**trl_settings(config, setup.task, setup.device, setup.model_dtype), **(settings or {})}
    notes = list(notes)
    with contextlib.ExitStack() as stack:
        trainer_dir = out / TRAINER_DIR if out is not None else Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="gradlens-run-")))
        created = out is not None and not out.exists()
        try:
            trainer = build_trainer(config.regime, setup.model, setup.tokenizer, setup.data, setup.task,
                                    output_dir=str(trainer_dir), settings=trl,
                                    eval_dataset=_eval_dataset(setup, trl, config), space=config.space)
        except GradlensError:
            if created:
                shutil.rmtree(out, ignore_errors=True)
            raise
        if not progress:
            trainer.remove_callback(ProgressCallback)
            trainer.remove_callback(PrinterCallback)
        provenance = {"tool": tool, "config": asdict(config), "record": record_fields(config), "pid": os.getpid(),
                      "device": setup.device, "model_dtype": setup.model_dtype, "task": setup.task.describe(),
                      "prompt_format": setup.task.prompt_format, "prompt_format_reason": setup.task.format_reason,
                      "mask": _mask_info(mask, mask_meta or {}, mask_path)}
        if drift_guard is not None:
            provenance["drift_guard"] = drift_guard.report  # filled in place at train end, also in the manifest
        recorder = None
        if record_dir is not None:
            from gradlens.record.recorder import GradientRecorder

            recorder = GradientRecorder(record_dir, trainer=trainer, modules=config.modules,
                                        every_n_steps=config.every_n_steps, dtype=config.storage_dtype,
                                        save_raw=config.save_raw, resume=resume,
                                        steps_per_shard=config.steps_per_shard, config=provenance, seed=config.seed,
                                        announce=progress, space=config.space)
        sparse = None
        if mask is not None:
            from gradlens.sparse.callback import SparseBCallback

            sparse = SparseBCallback(mask, config.space, anchors)
        add_first(trainer, [c for c in (drift_guard, sparse, recorder) if c is not None] + list(callbacks))
        if config.logging_dir is not None:  # transformers 5 takes TensorBoard's directory from the environment only
            stack.enter_context(_environment("TENSORBOARD_LOGGING_DIR", config.logging_dir))
        try:
            trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        finally:
            if recorder is not None:
                recorder.close()
    steps, seconds = trainer.state.global_step, train_runtime(trainer)
    nonzero, entries = b_nonzero(trainer.model) if anchors is None else moved_entries(dict(params), anchors)
    if nonzero == 0:
        what = "B moved from 0" if anchors is None else "the trained base weights moved"
        _warn(notes, f"no entry of {what} in {steps} steps: the adapter is the base model (under GRPO: did "
                     "every group of completions get equal rewards?)")
    if drift_guard is not None and drift_guard.report.get("drifted"):
        notes.append(describe(drift_guard.report))
    info = {**provenance, "steps": steps, "train_seconds": seconds, "regime": config.regime,
            "sparse": mask is not None, "space": config.space, "b_nonzero": nonzero, "b_entries": entries,
            "run": str(record_dir) if record_dir is not None else None,
            "drift_guard": provenance.get("drift_guard", {"checked": False, "reason": "no drift guard"}),
            "training_args": json.loads(trainer.args.to_json_string()), "warnings": notes}
    adapter = evaluation = None
    if out is not None:  # one writer under DDP, like the recorder (under FSDP2 every process gathers and evaluates)
        adapter, evaluation = _write_outputs(trainer, setup, out, mask, mask_meta or {}, config, anchors)
    info.update(adapter=str(adapter) if adapter else None, wall_seconds=time.perf_counter() - start,
                eval=None if evaluation is None else {k: evaluation[k] for k in ("accuracy", "ci95", "n", "correct")})
    if out is not None and trainer.is_world_process_zero():
        from gradlens.fsio import json_dump
        from gradlens.provenance import package_versions

        remove_if_empty(out / TRAINER_DIR)  # no checkpoint or log was written there
        json_dump({**info, "versions": package_versions()}, out / TRAIN_FILE)
    return TrainingResult(path=out, trainer=trainer, steps=steps, seconds=seconds, wall_seconds=info["wall_seconds"],
                          finite=stayed_finite(trainer, config.space), info=info, adapter=adapter, eval=evaluation,
                          run=record_dir,
                          signal=dict(recorder.signal.counts) if recorder else {},
                          no_signal_share=recorder.signal.share if recorder else None)


def _write_outputs(trainer: Any, setup: RunSetup, out: Path, mask: Mapping[str, Any] | None,
                   mask_meta: Mapping[str, str], config: RecordConfig,
                   anchors: Mapping[str, Any] | None) -> tuple[Path | None, dict[str, Any] | None]:
    """Save the adapter (space ``weight``: the delta, and a SHiRA adapter where the mask fits one) and, with
    held-out rows, evaluate them into ``eval.json``; the main process writes.

    Under DDP only the main process saves and evaluates. Under FSDP2 every process does: the adapter's blocks are
    gathered to the main process, and every process runs the same greedy evaluation (a sharded model's forward is a
    collective). Space ``weight`` is not sharded (it is refused under FSDP2).
    """
    from gradlens.evaluate import greedy_report
    from gradlens.fsio import json_dump
    from gradlens.record.sharded import gather_lora_state

    state = gather_lora_state(trainer.model)
    main = trainer.is_world_process_zero()
    if state is None and not main:
        return None, None
    if anchors is not None:
        from gradlens.sparse.delta import save_weight_space

        adapter = save_weight_space(trainer.model, anchors, mask, {**mask_meta, "regime": config.regime,
                                                                   "model": config.model, "seed": config.seed},
                                    out, out / ADAPTER_DIR, config.lora_r)
    else:
        adapter = _save_adapter(trainer.model, out / ADAPTER_DIR, mask, mask_meta, state) if main else None
    evaluation = None
    if setup.eval_data is not None:
        evaluation = greedy_report(trainer.model, setup.tokenizer, setup.task, setup.eval_data)
        if main:
            json_dump({"split": setup.task.eval_split, **evaluation}, out / EVAL_FILE)
    return adapter, evaluation
