"""The one training path: every command that trains sets up, runs and finishes its run here.

:mod:`.setup` (the base model, its LoRA-FA adapter, the task and its rows), :mod:`.settings` (the TRL fields of a
run, layered), :mod:`.trl_trainer` (:func:`build_trainer`, the only place a TRL trainer is made), :mod:`.run`
(:func:`run_training`, the only ``train()`` call: callbacks in their written order, the adapter, the evaluation,
``train.json``), and the two commands built on it: :mod:`.record_run` (:func:`record`, with resume) and
:mod:`.train_adapter` (:func:`train`, full-B or sparse-B). Names load on first use.
"""

from gradlens.lazy import lazy_exports

_LAZY = {
    "LoadedBase": "gradlens.training.setup", "RunSetup": "gradlens.training.setup",
    "load_base": "gradlens.training.setup", "setup_run": "gradlens.training.setup",
    "build_trainer": "gradlens.training.trl_trainer", "trl_settings": "gradlens.training.settings",
    "TrainingResult": "gradlens.training.run", "run_training": "gradlens.training.run",
    "EVAL_FILE": "gradlens.training.run", "TRAIN_FILE": "gradlens.training.run",
    "RecordResult": "gradlens.training.record_run", "record": "gradlens.training.record_run",
    "train": "gradlens.training.train_adapter",
}

__all__ = list(_LAZY)


__getattr__ = lazy_exports(__name__, _LAZY)
