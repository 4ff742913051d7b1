"""``train``: one TRL training run (SFT or GRPO) of a LoRA-FA model, full-B or sparse-B, for any model and task that
``record`` takes, with the same settings.

The library behind ``gradlens train``. With ``mask`` (a probe's or select's mask file) only the mask's entries of B
train (:class:`~gradlens.placement.sparse.SparseBCallback`) and the adapter is exported with the mask; a mask that does
not fit the adapter is refused before anything is trained or written. A :class:`~gradlens.drift.DriftGuard` checks that
the base weights stayed frozen, ``record`` attaches the :class:`~gradlens.record.recorder.GradientRecorder`
(``OUT/run``), ``n_eval`` ends the run with held-out greedy accuracy. ``OUT/train.json`` holds the provenance.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from gradlens.config import RecordConfig, TrainConfig
from gradlens.errors import GradlensError, GradlensWarning
from gradlens.fsio import remove_if_empty
from gradlens.record.command import Prepared, prepare

TRAIN_FILE = "train.json"
ADAPTER_DIR = "adapter"
RUN_DIR = "run"


@dataclass(frozen=True)
class TrainResult:
    """Where the outputs are and what the run did (``info`` is ``train.json``; ``eval`` also in ``eval.json``)."""

    path: Path
    adapter: Path
    steps: int
    seconds: float
    trainer: Any
    info: dict[str, Any]
    eval: dict[str, Any] | None = None
    run: Path | None = None


def read_mask(config: TrainConfig) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """The mask of ``--mask`` with its metadata, refused when it was scored on another rank or LoRA-A seed; the
    warnings of :func:`~gradlens.placement.masks.check_mask_adapter`."""
    from gradlens.placement.masks import check_mask_adapter, load_mask

    path = Path(config.mask)
    if not path.is_file():
        raise GradlensError(f"--mask {path}: no such file")
    mask, meta = load_mask(path)
    alpha = config.lora_alpha if config.lora_alpha is not None else 2 * config.lora_r
    notes = check_mask_adapter(meta, {"model": config.model, "lora_r": config.lora_r, "lora_alpha": alpha,
                                      "lora_seed": config.seed}, f"--mask {path}")
    return mask, meta, notes


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GradlensError(f"{out} exists and is not an empty directory; choose a new --out")


def _mask_info(config: TrainConfig, mask: dict[str, Any] | None, meta: dict[str, str]) -> dict[str, Any] | None:
    if mask is None:
        return None
    k, entries = sum(int(m.sum()) for m in mask.values()), sum(m.size for m in mask.values())
    return {"path": str(config.mask), "k": k, "entries": entries, "share": k / entries, "metadata": meta}


def _b_nonzero(model: Any) -> tuple[int, int]:
    """(non-zero entries, all entries) of the active adapter's B: B starts at 0, so the first counts what moved."""
    import torch

    from gradlens.models import lora_b_parameters

    params = [p.detach() for _, p in lora_b_parameters(model)]
    return sum(int(torch.count_nonzero(p)) for p in params), sum(p.numel() for p in params)


def _save_adapter(model: Any, out: Path, mask: dict[str, Any] | None, meta: dict[str, str]) -> Path:
    """Only the active adapter (not GRPO's ``ref``), as a PEFT directory; sparse-B with its mask."""
    from gradlens.models import unwrap
    from gradlens.placement.sparse import export_adapter

    if mask is not None:
        return export_adapter(model, out, mask, meta)
    model = unwrap(model)
    model.save_pretrained(out, selected_adapters=[model.active_adapter])
    return out if model.active_adapter == "default" else out / model.active_adapter


def _attach(trainer: Any, config: TrainConfig, out: Path, mask: dict[str, Any] | None,
            provenance: dict[str, Any]) -> tuple[Any, Any]:
    """(drift guard or None, recorder or None) on ``trainer``; the guard goes first, so its report is final before
    the recorder writes it into the manifest at train end."""
    from gradlens.drift import DriftGuard
    from gradlens.placement.sparse import SparseBCallback
    from gradlens.record.recorder import GradientRecorder

    guard = DriftGuard() if config.drift_guard else None
    if guard is not None:
        provenance["drift_guard"] = guard.report  # filled in place at train end, also in the recorder's manifest
    recorder = None
    if config.record:
        record_part = RecordConfig(**{f.name: getattr(config, f.name) for f in fields(RecordConfig)})
        recorder = GradientRecorder.attach(trainer, out / RUN_DIR, modules=config.modules,
                                           every_n_steps=config.every_n_steps, dtype=config.dtype,
                                           save_raw=config.save_raw, steps_per_shard=config.steps_per_shard,
                                           config={"record": asdict(record_part), **provenance}, seed=config.seed)
    if mask is not None:
        SparseBCallback.attach(trainer, mask)
    if guard is not None:
        trainer.callback_handler.callbacks.insert(0, guard)
    return guard, recorder


def _warn(notes: list[str], note: str) -> None:
    notes.append(note)
    warnings.warn(note, GradlensWarning, stacklevel=1)


def train(config: TrainConfig, *, progress: bool = True, callbacks: Sequence[Any] = ()) -> TrainResult:
    """Train under ``config`` into ``config.out`` (a new or empty directory); see the module docstring.

    ``callbacks`` are extra TrainerCallbacks; ``progress=False`` drops the Trainer's progress bar and console logs.
    """
    from transformers import PrinterCallback, ProgressCallback

    from gradlens.drift import describe
    from gradlens.placement.masks import check_mask_fits
    from gradlens.trainers import build_trainer, check_overrides, trl_settings

    start = time.perf_counter()
    check_overrides(config.regime, config.trl)
    out = Path(config.out)
    _check_out(out)
    mask, meta, notes = read_mask(config) if config.mask else (None, {}, [])
    prep = prepare(config)
    if mask is not None:
        from gradlens.models import lora_b_parameters

        check_mask_fits(mask, {n: tuple(p.shape) for n, p in lora_b_parameters(prep.model)}, f"--mask {config.mask}")
    for note in notes:
        warnings.warn(note, GradlensWarning, stacklevel=1)
    settings = trl_settings(config, prep.task, prep.device, prep.model_dtype)
    created = not out.exists()
    try:
        trainer = build_trainer(config.regime, prep.model, prep.tokenizer, prep.data, prep.task,
                                output_dir=str(out / "trainer"), settings=settings, callbacks=callbacks)
    except GradlensError:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    if not progress:
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
    provenance = {"train": asdict(config), "pid": os.getpid(), "device": prep.device, "model_dtype": prep.model_dtype,
                  "task": prep.task.describe(), "prompt_format": prep.task.prompt_format,
                  "mask": _mask_info(config, mask, meta)}
    guard, recorder = _attach(trainer, config, out, mask, provenance)
    try:
        trainer.train()
    finally:
        if recorder is not None:
            recorder.close()
    if guard is not None and guard.report["drifted"]:
        notes.append(describe(guard.report))
    remove_if_empty(out / "trainer")  # no checkpoint or log was written there
    return _finish(config, trainer, prep, out, mask, meta, notes, provenance, time.perf_counter() - start)


def _finish(config: TrainConfig, trainer: Any, prep: Prepared, out: Path, mask: dict[str, Any] | None,
            meta: dict[str, str], notes: list[str], provenance: dict[str, Any], wall: float) -> TrainResult:
    """Save the adapter, evaluate, write ``train.json`` (main process only) and say what the run learned."""
    from gradlens.evaluate import greedy_report
    from gradlens.fsio import json_dump
    from gradlens.placement.probe import train_runtime
    from gradlens.provenance import package_versions
    from gradlens.record import EVAL_FILE

    steps, seconds = trainer.state.global_step, train_runtime(trainer)
    nonzero, entries = _b_nonzero(trainer.model)
    if nonzero == 0:
        _warn(notes, f"no entry of B moved from 0 in {steps} steps: the adapter is the base model (under GRPO: did "
                     "every group of completions get equal rewards?)")
    evaluation = None
    adapter = out / ADAPTER_DIR
    if trainer.is_world_process_zero():
        adapter = _save_adapter(trainer.model, adapter, mask, meta)
        if prep.eval_data is not None:
            evaluation = greedy_report(trainer.model, prep.tokenizer, prep.task, prep.eval_data)
            json_dump({"split": prep.task.eval_split, **evaluation}, out / EVAL_FILE)
    info = {"tool": "gradlens train", "config": provenance["train"],
            **{k: v for k, v in provenance.items() if k != "train"}, "steps": steps,
            "train_seconds": seconds, "wall_seconds": wall, "regime": config.regime,
            "sparse": mask is not None, "b_nonzero": nonzero, "b_entries": entries, "adapter": str(adapter),
            "run": str(out / RUN_DIR) if config.record else None,
            "drift_guard": provenance.get("drift_guard", {"checked": False, "reason": "--no-drift_guard"}),
            "eval": None if evaluation is None else {k: evaluation[k] for k in ("accuracy", "ci95", "n", "correct")},
            "training_args": json.loads(trainer.args.to_json_string()), "warnings": notes,
            "versions": package_versions()}
    if trainer.is_world_process_zero():
        json_dump(info, out / TRAIN_FILE)
    return TrainResult(path=out, adapter=adapter, steps=steps, seconds=seconds, trainer=trainer, info=info,
                       eval=evaluation, run=out / RUN_DIR if config.record else None)
