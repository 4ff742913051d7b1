"""gradlens: record, analyze and act on the LoRA-B gradients of TRL SFT and GRPO runs.

The public names are imported lazily, so ``import gradlens`` (and the CLI's ``--help``) does not import torch.
``record`` and ``compare`` are submodules, not re-exported functions here: use ``from gradlens.training import record``
and ``from gradlens.compare import compare`` (a lazy function export would be shadowed by its own submodule).
"""

from __future__ import annotations

from gradlens.errors import GradlensError
from gradlens.lazy import lazy_exports

__version__ = "0.2.0"

_LAZY = {
    "open_run": "gradlens.store", "Run": "gradlens.store", "RunWriter": "gradlens.store",
    "ModuleSpec": "gradlens.modules", "GradientRecorder": "gradlens.record.recorder",
    "attach_lora": "gradlens.lora", "load_model_and_tokenizer": "gradlens.models", "Task": "gradlens.tasks.base",
    "RecordConfig": "gradlens.config",
    "analyze_runs": "gradlens.analysis.analyze", "AnalyzeConfig": "gradlens.config",
    "probe": "gradlens.placement.probe",
    "ProbeConfig": "gradlens.config", "CompareConfig": "gradlens.config", "TrainConfig": "gradlens.config",
    "DriftGuard": "gradlens.drift",
}

__all__ = ["GradlensError", "__version__", *_LAZY]

__getattr__ = lazy_exports(__name__, _LAZY)
