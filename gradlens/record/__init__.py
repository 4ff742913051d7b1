"""Recording: :class:`~gradlens.record.recorder.GradientRecorder`, the TrainerCallback that records every LoRA-B
gradient of any Trainer (``record()``, the command built on it, is :mod:`gradlens.training.record_run`)."""

from gradlens.record.recorder import GradientRecorder

__all__ = ["GradientRecorder"]
