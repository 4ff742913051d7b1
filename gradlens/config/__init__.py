"""Command configs as dataclasses: light to import (no torch), so the CLI builds its flags instantly.

Each field's ``metadata["help"]`` is its command-line help; ``__post_init__`` checks the values. :mod:`.fields` holds
the shared vocabularies and checks, :mod:`.training` the configs of the commands that train, :mod:`.analysis` those
that read recorded runs.
"""

from gradlens.config.analysis import AnalyzeConfig, DiagnoseConfig, ReportConfig, SelectConfig
from gradlens.config.fields import (
    DEVICES,
    DIAGNOSE_METHODS,
    INFORMED_METHODS,
    MATH_PREFIX,
    MODEL_DTYPES,
    PLACEMENT_METHODS,
    PROMPT_FORMATS,
    REGIMES,
    SELECT_METHODS,
    SPACES,
    STORAGE_DTYPES,
    TOY_PREFIX,
    check_seed,
)
from gradlens.config.training import CompareConfig, ModelTaskConfig, ProbeConfig, RecordConfig, TrainConfig

__all__ = ["DEVICES", "DIAGNOSE_METHODS", "INFORMED_METHODS", "MATH_PREFIX", "MODEL_DTYPES", "PLACEMENT_METHODS",
           "PROMPT_FORMATS", "REGIMES", "SELECT_METHODS", "SPACES", "STORAGE_DTYPES", "TOY_PREFIX", "AnalyzeConfig",
           "CompareConfig", "DiagnoseConfig", "ModelTaskConfig", "ProbeConfig", "RecordConfig", "ReportConfig",
           "SelectConfig", "TrainConfig", "check_seed"]
