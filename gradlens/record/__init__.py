"""Recording: :class:`~gradlens.record.recorder.GradientRecorder` (the TrainerCallback) and :func:`record` (one
TRL run with the recorder attached, the library behind ``gradlens record``)."""

from gradlens.record.command import EVAL_FILE, RecordResult, record
from gradlens.record.recorder import GradientRecorder

__all__ = ["EVAL_FILE", "GradientRecorder", "RecordResult", "record"]
