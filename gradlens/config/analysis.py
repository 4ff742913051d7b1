"""The configs of the commands that read recorded runs: ``analyze``, ``select``, ``diagnose`` and ``report``."""

from __future__ import annotations

from dataclasses import dataclass, field

from gradlens.config.fields import (
    DIAGNOSE_METHODS,
    INFORMED_METHODS,
    SELECT_METHODS,
    SPACES,
    budgets_field,
    check_budgets,
    check_methods,
    check_seed,
    check_space,
    field_help,
    scope_field,
)
from gradlens.errors import GradlensError


@dataclass
class AnalyzeConfig:
    """Settings of ``gradlens analyze`` (and :func:`gradlens.analysis.analyze.analyze_runs`); the run directories are
    given separately."""

    out: str = field(default="", metadata=field_help(
        "output directory for the tables, figures and provenance.json (required on the command line)"))
    lags: int = field(default=10, metadata=field_help("largest lag L of the step-to-step cosines (L = 1..lags)"))
    window: int | None = field(default=None, metadata=field_help(
        "also take every statistic over the first N usable steps (columns suffixed _wN; default: none)"))
    bins: int = field(default=20, metadata=field_help("bins on [0, 1] of the sign-stability histograms"))
    memory_mb: float = field(default=512.0, metadata=field_help(
        "working memory for gradient blocks and per-module Gram matrices, in MiB; the whole-adapter, "
        "per-projection and per-layer T x T Grams come on top"))
    unclip: bool = field(default=False, metadata=field_help(
        "divide each stored (clipped) step by its clip_coef, i.e. analyse the pre-clip gradient"))
    figures: bool = field(default=True, metadata=field_help("draw the PNG figures"))
    progress: bool = field(default=True, metadata=field_help("show progress bars while reading shards"))
    skip_bad: bool = field(default=False, metadata=field_help(
        "skip missing or corrupt shards (and runs that cannot be opened at all), analyse what is intact and report "
        "what was skipped"))
    overwrite: bool = field(default=False, metadata=field_help(
        "write into an --out that already holds files (by default a used --out is refused, so the outputs of two "
        "inputs never mix)"))

    def __post_init__(self) -> None:
        if self.lags < 1:
            raise GradlensError(f"lags must be >= 1, got {self.lags}")
        if self.window is not None and self.window < 2:
            raise GradlensError(f"window must be >= 2 steps, got {self.window}")
        if self.bins < 2:
            raise GradlensError(f"bins must be >= 2, got {self.bins}")
        if not 16 <= self.memory_mb < float("inf"):
            raise GradlensError(f"memory_mb must be >= 16 and finite, got {self.memory_mb}")


@dataclass
class SelectConfig:
    """``gradlens select RUN_DIR --out OUT``: placement masks from the accumulators of a run already recorded (by
    ``gradlens record``, a probe, or a ``GradientRecorder`` in your own Trainer)."""

    out: str = field(default="", metadata=field_help("output directory: masks go to OUT/masks (required)"))
    methods: list[str] = field(default_factory=lambda: list(INFORMED_METHODS), metadata=field_help(
        "selectors to build masks with", choices=SELECT_METHODS))
    budgets: list[str] = budgets_field(["1%"])
    scope: str = scope_field()
    seed: int = field(default=0, metadata=field_help("seed of the random selectors (informed ones are deterministic)"))
    space: str | None = field(default=None, metadata=field_help(
        "the space the run was recorded in (lora_b or weight); given, it must match the run's (default: the run's)",
        choices=SPACES))
    overwrite: bool = field(default=False, metadata=field_help(
        "write into an --out that already holds files, removing its old masks first (by default a used --out is "
        "refused, so the masks of two runs never mix)"))

    def __post_init__(self) -> None:
        if not self.out:
            raise GradlensError("an output directory is required (--out OUT_DIR)")
        if self.space is not None:
            check_space(self.space)
        check_methods(self.methods, SELECT_METHODS)
        check_budgets(self.budgets, self.scope)
        check_seed("seed", self.seed)


@dataclass
class DiagnoseConfig:
    """``gradlens diagnose RUN_OR_PROBE``: from a run's (or probe's) statistics alone, what random placement is
    expected to recover of each informed placement at each budget."""

    out: str | None = field(default=None, metadata=field_help(
        "output directory for diagnose.csv and diagnose.json (default: none, print only)"))
    methods: list[str] = field(default_factory=lambda: list(DIAGNOSE_METHODS), metadata=field_help(
        "informed selectors to set random placement against", choices=INFORMED_METHODS))
    budgets: list[str] = budgets_field(["0.1%", "1%", "10%"])
    scope: str = scope_field()
    seed: int = field(default=0, metadata=field_help(
        "seed of the simulated sign-flip null (what the informed top-k would show on a run without signal)"))
    train_steps: int | None = field(default=None, metadata=field_help(
        "optimizer steps of the training run the placement is for, the horizon of recovery_run (default: the "
        "probe's --train_steps if it recorded one, else none)"))
    check: str | None = field(default=None, metadata=field_help(
        "instead of diagnosing a run: a CSV with one row per measured point (world, cell, budget, probe statistics, "
        "gap = informed minus random accuracy); the predictor is chosen on each world and its Spearman with the gap "
        "reported on the other (leave one world out)"))
    predictors: list[str] | None = field(default=None, metadata=field_help(
        "--check: the probe-statistic columns to choose from (default: every numeric column but the gap)"))
    overwrite: bool = field(default=False, metadata=field_help(
        "write into an --out that already holds files (by default a used --out is refused, so the outputs of two "
        "inputs never mix)"))

    def __post_init__(self) -> None:
        check_methods(self.methods, INFORMED_METHODS)
        check_budgets(self.budgets, self.scope)
        check_seed("seed", self.seed)
        if self.out == "":
            raise GradlensError("--out is empty; name an output directory, or leave --out off to print only")
        if self.train_steps is not None and self.train_steps < 1:
            raise GradlensError(f"train_steps must be >= 1, got {self.train_steps}")


@dataclass
class ReportConfig:
    """``gradlens report``: one self-contained HTML page from run, analysis and compare directories; ``lags`` and
    ``window`` apply to the run directories it analyses itself."""

    out: str = field(default="", metadata=field_help("the HTML file to write (required; ends in .html or .htm)"))
    title: str = field(default="gradlens report", metadata=field_help("heading and title of the page"))
    lags: int = field(default=10, metadata=field_help(
        "largest lag L of the step-to-step cosines, for run directories analysed for the report"))
    window: int | None = field(default=None, metadata=field_help(
        "also take every statistic over the first N usable steps, for run directories analysed for the report "
        "(default: none)"))
    overwrite: bool = field(default=False, metadata=field_help(
        "replace an existing --out file (by default an existing report is refused)"))

    def __post_init__(self) -> None:
        if not self.out:
            raise GradlensError("an output file is required (--out report.html)")
        if not self.out.lower().endswith((".html", ".htm")):
            raise GradlensError(f"--out {self.out}: the report is an HTML file; its name must end in .html or .htm")
        AnalyzeConfig(lags=self.lags, window=self.window)  # the same checks as gradlens analyze
