"""Command configs as dataclasses: light to import (no torch), so the CLI builds its flags instantly.

Each field's ``metadata["help"]`` is its command-line help; ``__post_init__`` checks the values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gradlens.errors import GradlensError

# The seven projections of a Llama/Qwen2-style decoder layer.
ALL_PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REGIMES: tuple[str, ...] = ("sft", "grpo")
STORAGE_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")

TOY_PREFIX = "toy:"

# TRL settings for the toy addition task, used where the user sets nothing. Tuned on the tiny preset so that both
# regimes improve held-out accuracy within ~100 steps on a CPU.
TOY_TRL_DEFAULTS: dict[str, dict[str, Any]] = {
    "sft": {"per_device_train_batch_size": 16, "learning_rate": 2e-3, "max_length": 32},
    "grpo": {"per_device_train_batch_size": 32, "num_generations": 8, "max_completion_length": 5,
             "learning_rate": 1e-3, "temperature": 1.0},
}


def _meta(help_text: str, **extra: Any) -> dict[str, Any]:
    return {"help": help_text, **extra}


@dataclass
class RecordConfig:
    """Everything ``gradlens record`` needs; any other TRL config field goes in ``trl``."""

    regime: str = field(default="sft", metadata=_meta("training regime", choices=REGIMES))
    out: str = field(default="", metadata=_meta("run directory to write (required)"))
    model: str = field(default="toy:tiny", metadata=_meta(
        "model: 'toy:PRESET' for the embedded toy base model, or a local path or hub id for from_pretrained"))
    task: str = field(default="addition", metadata=_meta(
        "'addition' (embedded toy task) or a local .json/.jsonl/.csv/.parquet file with 'prompt' and 'answer' "
        "columns (SFT also uses 'completion', defaulting to the answer)"))
    max_steps: int = field(default=40, metadata=_meta("optimizer steps to train and record"))
    seed: int = field(default=0, metadata=_meta("seed of training, LoRA init and data order"))
    learning_rate: float | None = field(default=None, metadata=_meta("learning rate (default: per regime)"))
    n_train: int | None = field(default=None, metadata=_meta("use only the first N training examples"))
    lora_r: int = field(default=8, metadata=_meta("LoRA rank"))
    lora_alpha: int | None = field(default=None, metadata=_meta("LoRA alpha (default: 2 * rank)"))
    lora_target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS),
                                           metadata=_meta("modules that get a LoRA adapter"))
    modules: list[str] | None = field(default=None, metadata=_meta(
        "record only these LoRA modules: names or projection types such as v_proj down_proj (default: all)"))
    every_n_steps: int = field(default=1, metadata=_meta("record every N-th optimizer step"))
    dtype: str = field(default="float32", metadata=_meta("storage dtype of the raw shards", choices=STORAGE_DTYPES))
    steps_per_shard: int | None = field(default=None, metadata=_meta(
        "steps per raw shard; a hard kill loses at most the unfinished shard (default: up to 64 steps or 64 MiB)"))
    save_raw: bool = field(default=True, metadata=_meta("write raw gradient shards (off: streaming statistics only)"))
    resume: bool = field(default=False, metadata=_meta(
        "continue the run in --out: training restarts from its newest Trainer checkpoint at or before the last "
        "recorded step (or from the start, deterministically), and already recorded steps are skipped"))
    trl: dict[str, Any] = field(default_factory=dict, metadata=_meta("extra TRL config fields", cli=False))

    def __post_init__(self) -> None:
        if self.regime not in REGIMES:
            raise GradlensError(f"unknown regime {self.regime!r}; choose one of: {', '.join(REGIMES)}")
        if not self.out:
            raise GradlensError("an output run directory is required (--out RUN_DIR)")
        if self.max_steps < 1:
            raise GradlensError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.every_n_steps < 1:
            raise GradlensError(f"every_n_steps must be >= 1, got {self.every_n_steps}")
        if self.dtype not in STORAGE_DTYPES:
            raise GradlensError(f"dtype {self.dtype!r} is not one of {', '.join(STORAGE_DTYPES)}")
        if self.steps_per_shard is not None and self.steps_per_shard < 1:
            raise GradlensError(f"steps_per_shard must be >= 1, got {self.steps_per_shard}")
        if self.n_train is not None and self.n_train < 1:
            raise GradlensError(f"n_train must be >= 1, got {self.n_train}")
        if self.lora_r < 1:
            raise GradlensError(f"lora_r must be >= 1, got {self.lora_r}")
        if self.model.startswith(TOY_PREFIX):
            from gradlens.toy.presets import get_preset

            get_preset(self.model[len(TOY_PREFIX) :])
        reserved = {"max_steps", "seed", "learning_rate", "output_dir"} & set(self.trl)
        if reserved:
            raise GradlensError(f"set {', '.join(sorted(reserved))} as gradlens settings, not TRL extras")

    def trl_overrides(self) -> dict[str, Any]:
        """The TRL config fields of this run: toy defaults (toy task only), then the user's settings."""
        out = dict(TOY_TRL_DEFAULTS[self.regime]) if self.task == "addition" else {}
        out.update(self.trl)
        out.update(max_steps=self.max_steps, seed=self.seed, data_seed=self.seed)
        if self.learning_rate is not None:
            out["learning_rate"] = self.learning_rate
        return out


@dataclass
class AnalyzeConfig:
    """Settings of ``gradlens analyze`` (and :func:`gradlens.analyze.analyze_runs`); the run directories are given
    separately."""

    out: str = field(default="", metadata=_meta(
        "output directory for the tables, figures and provenance.json (required on the command line)"))
    lags: int = field(default=10, metadata=_meta("largest lag L of the step-to-step cosines (L = 1..lags)"))
    window: int | None = field(default=None, metadata=_meta(
        "also take every statistic over the first N usable steps (columns suffixed _wN; default: none)"))
    bins: int = field(default=20, metadata=_meta("bins on [0, 1] of the sign-stability histograms"))
    memory_mb: float = field(default=512.0, metadata=_meta(
        "working memory for gradient blocks and per-module Gram matrices, in MiB; the whole-adapter, "
        "per-projection and per-layer T x T Grams come on top"))
    unclip: bool = field(default=False, metadata=_meta(
        "divide each stored (clipped) step by its clip_coef, i.e. analyse the pre-clip gradient"))
    figures: bool = field(default=True, metadata=_meta("draw the PNG figures"))
    progress: bool = field(default=True, metadata=_meta("show progress bars while reading shards"))

    def __post_init__(self) -> None:
        if self.lags < 1:
            raise GradlensError(f"lags must be >= 1, got {self.lags}")
        if self.window is not None and self.window < 2:
            raise GradlensError(f"window must be >= 2 steps, got {self.window}")
        if self.bins < 2:
            raise GradlensError(f"bins must be >= 2, got {self.bins}")
        if not self.memory_mb >= 16:
            raise GradlensError(f"memory_mb must be >= 16, got {self.memory_mb}")
