"""Command configs as dataclasses: light to import (no torch), so the CLI builds its flags instantly.

Each field's ``metadata["help"]`` is its command-line help; ``__post_init__`` checks the values.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from gradlens.errors import GradlensError
from gradlens.placement.budget import SCOPES, Budget

REGIMES: tuple[str, ...] = ("sft", "grpo")
STORAGE_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
MODEL_DTYPES: tuple[str, ...] = ("auto", *STORAGE_DTYPES)
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
PROMPT_FORMATS: tuple[str, ...] = ("auto", "plain", "chat")
MATH_PREFIX = "gsm8k"  # --task gsm8k (the hub's openai/gsm8k) or gsm8k:SOURCE (hub id, local file or directory)

TOY_PREFIX = "toy:"

def _meta(help_text: str, **extra: Any) -> dict[str, Any]:
    return {"help": help_text, **extra}


@dataclass
class ModelTaskConfig:
    """The model, its LoRA-FA adapter and the task: shared by every command that trains (record, probe, train,
    compare), so each takes the same ``--model``/``--task`` flags."""

    model: str = field(default="toy:tiny", metadata=_meta(
        "model: 'toy:PRESET' for the embedded toy base model, or a local path or hub id for from_pretrained"))
    task: str = field(default="addition", metadata=_meta(
        "'addition' (embedded toy task); a local .json/.jsonl/.csv/.parquet file with 'prompt' and 'answer' "
        "columns (SFT also uses 'completion', defaulting to the answer; the last tenth of the rows is held out); or "
        "a GSM8K-style math task: 'gsm8k' (openai/gsm8k from the hub) or 'gsm8k:SOURCE' with SOURCE a hub id, a "
        "local .jsonl/.json/.parquet/.csv file or a directory (data files, or saved by datasets' save_to_disk)"))
    model_dtype: str = field(default="auto", metadata=_meta(
        "dtype the model is loaded in (default auto: bfloat16 on a GPU that supports it, else float32; the toy "
        "models always float32)", choices=MODEL_DTYPES))
    device: str = field(default="auto", metadata=_meta(
        "where to train (default auto: the GPU if there is one)", choices=DEVICES))
    prompt_format: str = field(default="auto", metadata=_meta(
        "math task prompts: 'plain' (Question:/Answer:) or 'chat' (the tokenizer's chat template); default auto: "
        "chat when the chat template's end-of-turn token is one of the model's stop tokens (a chat-trained model), "
        "else plain; the choice and its reason are printed and stored",
        choices=PROMPT_FORMATS))
    question_column: str = field(default="question", metadata=_meta("math task: column holding the question"))
    answer_column: str = field(default="answer", metadata=_meta(
        "math task: column holding the worked answer, final answer after '####' (GSM8K convention)"))
    dataset_config: str | None = field(default=None, metadata=_meta(
        "math task: the hub dataset's config name (default: 'main' for --task gsm8k, else none)"))
    train_split: str = field(default="train", metadata=_meta("math task: split to train on"))
    eval_split: str = field(default="test", metadata=_meta("math task: held-out split for evaluation"))
    eval_max_new_tokens: int = field(default=256, metadata=_meta("math task: token budget of each evaluation answer"))
    format_reward: bool = field(default=False, metadata=_meta(
        "math task, GRPO: add a format reward (1 when the completion states a final answer after '####' or in "
        "\\boxed{})"))
    lora_r: int = field(default=8, metadata=_meta("LoRA rank"))
    lora_alpha: int | None = field(default=None, metadata=_meta("LoRA alpha (default: 2 * rank)"))
    lora_target_modules: list[str] | None = field(default=None, metadata=_meta(
        "modules that get a LoRA adapter (default: every linear projection of the architecture, as PEFT's "
        "'all-linear' finds them)"))

    def __post_init__(self) -> None:
        if not self.model:
            raise GradlensError("--model is empty; give 'toy:PRESET', a local path or a hub id")
        if self.model.startswith(TOY_PREFIX):
            from gradlens.toy.presets import get_preset

            get_preset(self.model[len(TOY_PREFIX) :])
        if self.task == f"{MATH_PREFIX}:":
            raise GradlensError(f"--task {self.task}: name the data after the colon (a hub id, file or directory)")
        for name, allowed in (("model_dtype", MODEL_DTYPES), ("device", DEVICES), ("prompt_format", PROMPT_FORMATS)):
            if getattr(self, name) not in allowed:
                raise GradlensError(f"{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.eval_max_new_tokens < 1:
            raise GradlensError(f"eval_max_new_tokens must be >= 1, got {self.eval_max_new_tokens}")
        if self.lora_r < 1:
            raise GradlensError(f"lora_r must be >= 1, got {self.lora_r}")
        if self.lora_alpha is not None and self.lora_alpha < 1:
            raise GradlensError(f"lora_alpha must be >= 1, got {self.lora_alpha}")

    def model_task_fields(self) -> dict[str, Any]:
        """This config's model and task settings, to build another config that trains the same model on the same
        task (compare's runs, a probe's recording)."""
        return {f.name: getattr(self, f.name) for f in fields(ModelTaskConfig)}


@dataclass
class RecordConfig(ModelTaskConfig):
    """Everything ``gradlens record`` needs; any other TRL config field goes in ``trl``."""

    regime: str = field(default="sft", metadata=_meta("training regime", choices=REGIMES))
    out: str = field(default="", metadata=_meta("run directory to write (required)"))
    n_eval: int = field(default=0, metadata=_meta(
        "after training, greedy accuracy on the first N held-out examples, written to RUN_DIR/eval.json "
        "(default 0: off)"))
    max_steps: int = field(default=40, metadata=_meta("optimizer steps to train and record"))
    seed: int = field(default=0, metadata=_meta("seed of training, LoRA init and data order"))
    learning_rate: float | None = field(default=None, metadata=_meta(
        "learning rate (default: the task's, 2e-3 SFT and 1e-3 GRPO for addition; else TRL's, 2e-5 SFT and 1e-6 "
        "GRPO)"))
    n_train: int | None = field(default=None, metadata=_meta("use only the first N training examples"))
    modules: list[str] | None = field(default=None, metadata=_meta(
        "record only these LoRA modules: names, projection types or labels such as v_proj down_proj, v o "
        "(default: all)"))
    every_n_steps: int = field(default=1, metadata=_meta("record every N-th optimizer step"))
    dtype: str = field(default="float32", metadata=_meta("storage dtype of the raw shards", choices=STORAGE_DTYPES))
    steps_per_shard: int | None = field(default=None, metadata=_meta(
        "steps per raw shard; a hard kill loses at most the unfinished shard (default: up to 64 steps or 256 MiB)"))
    save_raw: bool = field(default=True, metadata=_meta("write raw gradient shards (off: streaming statistics only)"))
    resume: bool = field(default=False, metadata=_meta(
        "continue the run in --out: training restarts from its newest Trainer checkpoint at or before the last "
        "recorded step (or from the start, deterministically), and already recorded steps are skipped"))
    trl: dict[str, Any] = field(default_factory=dict, metadata=_meta("extra TRL config fields", cli=False))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.regime not in REGIMES:
            raise GradlensError(f"unknown regime {self.regime!r}; choose one of: {', '.join(REGIMES)}")
        if not self.out:
            raise GradlensError("an output run directory is required (--out RUN_DIR)")
        if self.dtype not in STORAGE_DTYPES:
            raise GradlensError(f"dtype {self.dtype!r} is not one of {', '.join(STORAGE_DTYPES)}")
        for name in ("max_steps", "every_n_steps", "steps_per_shard", "n_train"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise GradlensError(f"{name} must be >= 1, got {value}")
        if self.n_eval < 0:
            raise GradlensError(f"n_eval must be >= 0, got {self.n_eval}")
        check_seed("seed", self.seed)
        if self.learning_rate is not None and not 0 < self.learning_rate < float("inf"):
            raise GradlensError(f"learning_rate must be > 0 and finite, got {self.learning_rate}")
        reserved = {"max_steps", "seed", "learning_rate", "output_dir"} & set(self.trl)
        if reserved:
            raise GradlensError(f"set {', '.join(sorted(reserved))} as gradlens settings, not TRL extras")


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
    skip_bad: bool = field(default=False, metadata=_meta(
        "skip missing or corrupt shards (and runs that cannot be opened at all), analyse what is intact and report "
        "what was skipped"))

    def __post_init__(self) -> None:
        if self.lags < 1:
            raise GradlensError(f"lags must be >= 1, got {self.lags}")
        if self.window is not None and self.window < 2:
            raise GradlensError(f"window must be >= 2 steps, got {self.window}")
        if self.bins < 2:
            raise GradlensError(f"bins must be >= 2, got {self.bins}")
        if not 16 <= self.memory_mb < float("inf"):
            raise GradlensError(f"memory_mb must be >= 16 and finite, got {self.memory_mb}")


# Selector names, kept here (light) so flags are checked without importing numpy; gradlens.placement uses the same.
PLACEMENT_METHODS: tuple[str, ...] = ("random", "random_matched", "magnitude", "fisher", "sign", "sign_magnitude",
                                      "modules")
INFORMED_METHODS: tuple[str, ...] = ("magnitude", "fisher", "sign", "sign_magnitude")


def check_seed(name: str, seed: int) -> None:
    """Seeds in 0..2**32-1, what numpy's and torch's seeding accept (a larger one fails deep inside a run)."""
    if not 0 <= seed < 2**32:
        raise GradlensError(f"{name} must be in 0..2**32-1, got {seed}")


def _budgets_field(default: list[str]) -> Any:
    """The ``budgets`` flag shared by probe, select and compare."""
    return field(default_factory=lambda: list(default), metadata=_meta(
        "budgets: a share of all B entries ('1%', '0.001') or a count ('5000')"))


def _scope_field() -> Any:
    """The ``scope`` flag shared by probe, select and compare."""
    return field(default="global", metadata=_meta(
        "'global': top-k over the whole adapter; 'per_module': the same share in every matrix", choices=SCOPES))


def _check_methods(methods: list[str], allowed: tuple[str, ...]) -> None:
    unknown = [m for m in methods if m not in allowed]
    if unknown or not methods:
        raise GradlensError(f"unknown or no placement method(s) {', '.join(unknown) or '(none)'}; "
                            f"choose from: {', '.join(allowed)}")


def _check_budgets(budgets: list[str], scope: str) -> None:
    if not budgets:
        raise GradlensError("no budgets given (e.g. --budgets 1% 0.1%)")
    if scope not in SCOPES:
        raise GradlensError(f"unknown budget scope {scope!r}; choose one of: {', '.join(SCOPES)}")
    for b in budgets:
        Budget.parse(str(b), scope)


@dataclass
class ProbeConfig(RecordConfig):
    """``gradlens probe``: a short recorded run (statistics only) whose accumulators score every B entry, then masks.

    ``out`` is the probe directory: the recorded run goes to ``OUT/run``, masks to ``OUT/masks``, costs to
    ``OUT/probe.json``.
    """

    max_steps: int = field(default=16, metadata=_meta("optimizer steps of the probe"))
    save_raw: bool = field(default=False, metadata=_meta(
        "also write raw gradient shards (the selectors need only the streaming statistics)"))
    methods: list[str] = field(default_factory=lambda: list(INFORMED_METHODS), metadata=_meta(
        "informed selectors to build masks with", choices=INFORMED_METHODS))
    budgets: list[str] = _budgets_field(["1%"])
    scope: str = _scope_field()
    train_steps: int | None = field(default=None, metadata=_meta(
        "optimizer steps of the training run the probe is for, to report the probe's cost as a fraction of it"))

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_methods(self.methods, INFORMED_METHODS)
        _check_budgets(self.budgets, self.scope)
        if self.train_steps is not None and self.train_steps < 1:
            raise GradlensError(f"train_steps must be >= 1, got {self.train_steps}")

    def record_config(self, out: str) -> RecordConfig:
        """The recording part of the probe, as a plain :class:`RecordConfig` writing to ``out``."""
        names = {f.name for f in fields(RecordConfig)}
        return RecordConfig(**{**{k: v for k, v in vars(self).items() if k in names}, "out": out})


@dataclass
class TrainConfig(RecordConfig):
    """``gradlens train``: one training run with ``gradlens record``'s flags, full-B LoRA-FA or sparse-B (``mask``).

    ``out`` gets ``adapter/`` (a PEFT adapter, plus the mask), ``train.json``, ``eval.json`` and with ``record`` a
    recorded run in ``OUT/run``; the recording flags (``modules``, ``dtype``, ...) apply to that run.
    """

    out: str = field(default="", metadata=_meta(
        "output directory: OUT/adapter, OUT/train.json, OUT/eval.json, OUT/run with --record (required)"))
    mask: str | None = field(default=None, metadata=_meta(
        "sparse-B: a mask file from gradlens probe/select; A stays frozen and only the mask's entries of B train "
        "(default: none, every entry of B trains)"))
    record: bool = field(default=False, metadata=_meta(
        "also record every LoRA-B gradient into the run directory OUT/run, as gradlens record does"))
    drift_guard: bool = field(default=True, metadata=_meta(
        "fingerprint the adapted layers' base weights at train begin and end and warn if they changed (keeps a "
        "host copy of them; --no-drift_guard: off)"))
    resume: bool = field(default=False, metadata=_meta("not supported by gradlens train", cli=False))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resume or "resume" in self.trl:  # no flag of its own, so --resume would reach TRL's fields
            raise GradlensError("--resume: gradlens train does not resume a run; choose a new --out")
        if self.mask is not None and not self.mask:
            raise GradlensError("--mask is empty; give a mask file from gradlens probe or select")


# ``select`` builds masks from a run alone; random_matched needs a second mask to copy counts from (compare does that).
SELECT_METHODS: tuple[str, ...] = tuple(m for m in PLACEMENT_METHODS if m != "random_matched")


@dataclass
class SelectConfig:
    """``gradlens select RUN_DIR --out OUT``: placement masks from the accumulators of a run already recorded (by
    ``gradlens record``, a probe, or a ``GradientRecorder`` in your own Trainer)."""

    out: str = field(default="", metadata=_meta("output directory: masks go to OUT/masks (required)"))
    methods: list[str] = field(default_factory=lambda: list(INFORMED_METHODS), metadata=_meta(
        "selectors to build masks with", choices=SELECT_METHODS))
    budgets: list[str] = _budgets_field(["1%"])
    scope: str = _scope_field()
    seed: int = field(default=0, metadata=_meta("seed of the random selectors (informed ones are deterministic)"))

    def __post_init__(self) -> None:
        if not self.out:
            raise GradlensError("an output directory is required (--out OUT_DIR)")
        _check_methods(self.methods, SELECT_METHODS)
        _check_budgets(self.budgets, self.scope)
        check_seed("seed", self.seed)


@dataclass
class CompareConfig(ModelTaskConfig):
    """``gradlens compare``: base, full-B LoRA and sparse-B placements (random and informed) under SFT and GRPO."""

    out: str = field(default="", metadata=_meta("output directory (required)"))
    regimes: list[str] = field(default_factory=lambda: list(REGIMES), metadata=_meta(
        "regimes to compare", choices=REGIMES))
    methods: list[str] = field(default_factory=lambda: ["random", "random_matched", "fisher", "sign"],
                               metadata=_meta("placement methods; random_matched copies the per-module counts of "
                                              "the first informed method's mask", choices=PLACEMENT_METHODS))
    budgets: list[str] = _budgets_field(["1%", "10%"])
    scope: str = _scope_field()
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4], metadata=_meta(
        "seeds: each gives its own probe, masks, LoRA init and data order, shared by every method of that seed (so "
        "methods are compared as paired differences)"))
    model: str = field(default="toy:small", metadata=_meta(
        "model: 'toy:PRESET' for the embedded toy base model, or a local path or hub id for from_pretrained"))
    max_steps: int = field(default=60, metadata=_meta("optimizer steps of every training run"))
    probe_steps: int = field(default=16, metadata=_meta("optimizer steps of each probe (informed masks)"))
    full_lrs: list[float] | None = field(default_factory=lambda: [1e-3, 3e-3, 1e-2], metadata=_meta(
        "learning rates swept for full-B LoRA (none: the regime's toy default, no sweep)"))
    sparse_lrs: list[float] = field(default_factory=lambda: [1e-2, 3e-2, 1e-1, 3e-1], metadata=_meta(
        "learning rates swept for each sparse method and budget (on --sweep_seeds, scored on validation prompts)"))
    sweep_seeds: list[int] = field(default_factory=lambda: [1000, 1001], metadata=_meta(
        "seeds of the learning-rate sweep, apart from --seeds: each rate is scored by its mean validation accuracy "
        "over them"))
    grid_extensions: int = field(default=2, metadata=_meta(
        "when the best rate sits at an edge of its grid, extend the grid on that side by a factor of 3, at most this "
        "many times (0: never)"))
    divergence_margin: float = field(default=0.1, metadata=_meta(
        "a run whose training loss becomes non-finite, or whose accuracy falls more than this below the base model's, "
        "is marked diverged: counted in the summary, never averaged in"))
    n_val: int = field(default=200, metadata=_meta(
        "validation prompts for the sweep, held back from the training split"))
    n_eval: int = field(default=400, metadata=_meta("held-out prompts for the reported accuracy"))
    eval_samples: int = field(default=4, metadata=_meta("samples per prompt for sampled accuracy (0: greedy only)"))
    curve_every: int = field(default=0, metadata=_meta(
        "also record greedy accuracy on 100 held-out prompts every N steps (0: off)"))
    export: bool = field(default=True, metadata=_meta("save every trained sparse adapter as a PEFT adapter"))
    resume: bool = field(default=False, metadata=_meta("skip runs already in OUT/placement.csv and OUT/sweep.csv"))
    progress: bool = field(default=True, metadata=_meta("show a progress bar"))
    trl: dict[str, Any] = field(default_factory=dict, metadata=_meta("extra TRL config fields", cli=False))

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.out:
            raise GradlensError("an output directory is required (--out OUT_DIR)")
        if not self.regimes or any(r not in REGIMES for r in self.regimes):
            raise GradlensError(f"regimes must be among: {', '.join(REGIMES)}; got {self.regimes}")
        _check_methods(self.methods, PLACEMENT_METHODS)
        if "random_matched" in self.methods and not set(self.methods) & set(INFORMED_METHODS):
            raise GradlensError("random_matched needs an informed method to copy its per-module counts from "
                                f"(one of: {', '.join(INFORMED_METHODS)})")
        _check_budgets(self.budgets, self.scope)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise GradlensError(f"seeds must be distinct and at least one, got {self.seeds}")
        for seed in self.seeds:
            check_seed("seeds", seed)
        if not self.sweep_seeds or len(set(self.sweep_seeds)) != len(self.sweep_seeds):
            raise GradlensError(f"sweep_seeds must be distinct and at least one, got {self.sweep_seeds}")
        for seed in self.sweep_seeds:
            check_seed("sweep_seeds", seed)
        if set(self.sweep_seeds) & set(self.seeds):
            raise GradlensError(f"sweep_seeds {self.sweep_seeds} must differ from the evaluation seeds {self.seeds}")
        if self.grid_extensions < 0 or not 0 <= self.divergence_margin <= 1:
            raise GradlensError("grid_extensions must be >= 0 and divergence_margin in [0, 1]")
        for name in ("max_steps", "probe_steps", "n_val", "n_eval"):
            if getattr(self, name) < 1:
                raise GradlensError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_samples < 0 or self.curve_every < 0:
            raise GradlensError("eval_samples and curve_every must be >= 0")
        if any(not 0 < lr < float("inf") for lr in [*(self.full_lrs or []), *self.sparse_lrs]) or not self.sparse_lrs:
            raise GradlensError("learning rates must be > 0 and finite (and --sparse_lrs non-empty)")


@dataclass
class ReportConfig:
    """``gradlens report``: one self-contained HTML page from run, analysis and compare directories; ``lags`` and
    ``window`` apply to the run directories it analyses itself."""

    out: str = field(default="", metadata=_meta("the HTML file to write (required; ends in .html or .htm)"))
    title: str = field(default="gradlens report", metadata=_meta("heading and title of the page"))
    lags: int = field(default=10, metadata=_meta(
        "largest lag L of the step-to-step cosines, for run directories analysed for the report"))
    window: int | None = field(default=None, metadata=_meta(
        "also take every statistic over the first N usable steps, for run directories analysed for the report "
        "(default: none)"))

    def __post_init__(self) -> None:
        if not self.out:
            raise GradlensError("an output file is required (--out report.html)")
        if not self.out.lower().endswith((".html", ".htm")):
            raise GradlensError(f"--out {self.out}: the report is an HTML file; its name must end in .html or .htm")
        AnalyzeConfig(lags=self.lags, window=self.window)  # the same checks as gradlens analyze


# The informed selectors ``gradlens diagnose`` sets random placement against by default.
DIAGNOSE_METHODS: tuple[str, ...] = ("sign", "sign_magnitude", "fisher")


@dataclass
class DiagnoseConfig:
    """``gradlens diagnose RUN_OR_PROBE``: from a run's (or probe's) statistics alone, what random placement is
    expected to recover of each informed placement at each budget."""

    out: str | None = field(default=None, metadata=_meta(
        "output directory for diagnose.csv and diagnose.json (default: none, print only)"))
    methods: list[str] = field(default_factory=lambda: list(DIAGNOSE_METHODS), metadata=_meta(
        "informed selectors to set random placement against", choices=INFORMED_METHODS))
    budgets: list[str] = _budgets_field(["0.1%", "1%", "10%"])
    scope: str = _scope_field()
    seed: int = field(default=0, metadata=_meta(
        "seed of the simulated sign-flip null (what the informed top-k would show on a run without signal)"))
    train_steps: int | None = field(default=None, metadata=_meta(
        "optimizer steps of the training run the placement is for, the horizon of recovery_run (default: the "
        "probe's --train_steps if it recorded one, else none)"))

    def __post_init__(self) -> None:
        _check_methods(self.methods, INFORMED_METHODS)
        _check_budgets(self.budgets, self.scope)
        check_seed("seed", self.seed)
        if self.out == "":
            raise GradlensError("--out is empty; name an output directory, or leave --out off to print only")
        if self.train_steps is not None and self.train_steps < 1:
            raise GradlensError(f"train_steps must be >= 1, got {self.train_steps}")
