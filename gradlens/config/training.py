"""The configs of the commands that train: ``record``, ``probe``, ``train`` and ``compare``, all built on
:class:`ModelTaskConfig` so each takes the same ``--model``/``--task`` flags."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from gradlens.config.fields import (
    DEVICES,
    INFORMED_METHODS,
    MATH_PREFIX,
    MODEL_DTYPES,
    PLACEMENT_METHODS,
    PROMPT_FORMATS,
    REGIMES,
    SPACE_HELP,
    SPACES,
    STORAGE_DTYPES,
    budgets_field,
    check_budgets,
    check_methods,
    check_seed,
    check_space,
    check_spaces,
    check_trl_extras,
    field_help,
    scope_field,
)
from gradlens.errors import GradlensError


@dataclass
class ModelTaskConfig:
    """The model, its LoRA-FA adapter and the task: shared by every command that trains (record, probe, train,
    compare), so each takes the same ``--model``/``--task`` flags."""

    model: str = field(default="toy:tiny", metadata=field_help(
        "model: 'toy:PRESET' for the embedded toy base model, an existing local directory, or else a hub id "
        "('NAME' or 'ORG/NAME') that from_pretrained finds in the hub cache or downloads (HF_HUB_OFFLINE=1: cache "
        "only)"))
    model_revision: str = field(default="main", metadata=field_help(
        "hub id: the branch, tag or commit to load (TRL's ModelConfig.model_revision)"))
    task: str | None = field(default=None, metadata=field_help(
        "default: the model's own task, toy:math's packaged word problems through the gsm8k task "
        "('gsm8k:<package>/toy/data/math'), else 'addition'. "
        "'addition' (embedded toy task); a local .json/.jsonl/.csv/.parquet file with 'prompt' and 'answer' "
        "columns (SFT also uses 'completion', defaulting to the answer; the last tenth of the rows is held out); or "
        "a GSM8K-style math task: 'gsm8k' (openai/gsm8k from the hub) or 'gsm8k:SOURCE' with SOURCE a hub id, a "
        "local .jsonl/.json/.parquet/.csv file or a directory (data files, or saved by datasets' save_to_disk)"))
    model_name_or_path: str | None = field(default=None, metadata=field_help(
        "TRL's name for --model (either may be given; both, only if they agree)"))
    dtype: str = field(default="auto", metadata=field_help(
        "the model's dtype, as TRL's --dtype (default auto: bfloat16 on a GPU that supports it, else float32; "
        "auto keeps the toy models float32). Before gradlens 0.2 --dtype set the shard storage dtype: that is "
        "--storage_dtype now", choices=MODEL_DTYPES))
    attn_implementation: str | None = field(default=None, metadata=field_help(
        "attention implementation passed to from_pretrained (eager, sdpa, flash_attention_2; default: "
        "transformers' choice)"))
    device: str = field(default="auto", metadata=field_help(
        "where to train (default auto: the GPU if there is one)", choices=DEVICES))
    prompt_format: str = field(default="auto", metadata=field_help(
        "math task prompts: 'plain' (Question:/Answer:) or 'chat' (the tokenizer's chat template); default auto: "
        "chat when the chat template's end-of-turn token is one of the model's stop tokens (a chat-trained model), "
        "else plain; the choice and its reason are printed and stored",
        choices=PROMPT_FORMATS))
    question_column: str = field(default="question", metadata=field_help("math task: column holding the question"))
    answer_column: str = field(default="answer", metadata=field_help(
        "math task: column holding the worked answer, final answer after '####' (GSM8K convention)"))
    dataset_config: str | None = field(default=None, metadata=field_help(
        "math task: the hub dataset's config name (default: 'main' for --task gsm8k, else none)"))
    train_split: str = field(default="train", metadata=field_help("math task: split to train on"))
    eval_split: str = field(default="test", metadata=field_help("math task: held-out split for evaluation"))
    eval_max_new_tokens: int | None = field(default=None, metadata=field_help(
        "math task: token budget of each evaluation answer (default: 96 for toy:math, else 256)"))
    format_reward: bool = field(default=False, metadata=field_help(
        "math task, GRPO: add a format reward (1 when the completion states a final answer after '####' or in "
        "\\boxed{})"))
    use_peft: bool = field(default=True, metadata=field_help(
        "TRL's switch for a LoRA adapter: gradlens always trains one (LoRA-FA, only lora_B), so it must stay true"))
    lora_r: int = field(default=8, metadata=field_help("LoRA rank"))
    lora_alpha: int | None = field(default=None, metadata=field_help("LoRA alpha (default: 2 * rank)"))
    lora_target_modules: list[str] | None = field(default=None, metadata=field_help(
        "modules that get a LoRA adapter (default: every linear projection of the architecture, as PEFT's "
        "'all-linear' finds them; 'all-linear' may also be given)"))
    lora_dropout: float = field(default=0.0, metadata=field_help(
        "LoRA dropout (default 0.0, unlike TRL's 0.05: dropout makes B's gradient depend on a random mask per step)"))
    use_dora: bool = field(default=False, metadata=field_help(
        "DoRA (weight-decomposed LoRA); its magnitude vector stays frozen with A, so only lora_B trains"))
    use_rslora: bool = field(default=False, metadata=field_help("rank-stabilised LoRA scaling alpha / sqrt(r)"))

    def __post_init__(self) -> None:
        if self.model_name_or_path is not None:
            default = type(self).__dataclass_fields__["model"].default
            if self.model not in (default, self.model_name_or_path):
                raise GradlensError(f"--model {self.model} and --model_name_or_path {self.model_name_or_path} differ; "
                                    "give one of them")
            self.model = self.model_name_or_path
        if not self.use_peft:
            raise GradlensError("--use_peft false: gradlens always trains a LoRA adapter (LoRA-FA: A frozen, only B "
                                "trains), whose B gradients are what it records and places; drop --use_peft")
        if not 0 <= self.lora_dropout < 1:
            raise GradlensError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.model:
            raise GradlensError("--model is empty; give 'toy:PRESET', a local path or a hub id")
        from gradlens.toy_presets import MATH_EVAL_MAX_NEW_TOKENS, default_task, world

        world(self.model)  # an unknown toy preset fails here
        if self.task is None:  # the model's own task, in every result's provenance as the task's name
            self.task = default_task(self.model)
        if self.eval_max_new_tokens is None:
            self.eval_max_new_tokens = MATH_EVAL_MAX_NEW_TOKENS if world(self.model) == "math" else 256
        if self.task == f"{MATH_PREFIX}:":
            raise GradlensError(f"--task {self.task}: name the data after the colon (a hub id, file or directory)")
        for name, allowed in (("dtype", MODEL_DTYPES), ("device", DEVICES), ("prompt_format", PROMPT_FORMATS)):
            if getattr(self, name) not in allowed:
                raise GradlensError(f"{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.eval_max_new_tokens < 1:
            raise GradlensError(f"eval_max_new_tokens must be >= 1, got {self.eval_max_new_tokens}")
        if self.lora_r < 1:
            raise GradlensError(f"lora_r must be >= 1, got {self.lora_r}")
        if self.lora_alpha is not None and self.lora_alpha < 1:
            raise GradlensError(f"lora_alpha must be >= 1, got {self.lora_alpha}")

    def lora_kwargs(self) -> dict[str, Any]:
        """The adapter's settings as :func:`gradlens.lora.attach_lora` takes them (one place, for every run)."""
        return {"r": self.lora_r, "alpha": self.lora_alpha, "target_modules": self.lora_target_modules,
                "dropout": self.lora_dropout, "use_dora": self.use_dora, "use_rslora": self.use_rslora}

    def model_task_fields(self) -> dict[str, Any]:
        """This config's model and task settings, to build another config that trains the same model on the same
        task (compare's runs, a probe's recording)."""
        return {f.name: getattr(self, f.name) for f in fields(ModelTaskConfig)}


@dataclass
class RecordConfig(ModelTaskConfig):
    """Everything ``gradlens record`` needs; any other TRL config field goes in ``trl``."""

    regime: str = field(default="sft", metadata=field_help("training regime", choices=REGIMES))
    space: str = field(default="lora_b", metadata=field_help(f"what trains and is recorded: {SPACE_HELP}",
                                                             choices=SPACES))
    out: str = field(default="", metadata=field_help("run directory to write (required)"))
    n_eval: int = field(default=0, metadata=field_help(
        "after training, greedy accuracy on the first N held-out examples, written to RUN_DIR/eval.json "
        "(default 0: off)"))
    max_steps: int = field(default=40, metadata=field_help("optimizer steps to train and record"))
    seed: int = field(default=0, metadata=field_help("seed of training, LoRA init and data order"))
    learning_rate: float | None = field(default=None, metadata=field_help(
        "learning rate (default: the task's, 2e-3 SFT and 1e-3 GRPO for addition; else TRL's, 2e-5 SFT and 1e-6 "
        "GRPO)"))
    n_train: int | None = field(default=None, metadata=field_help("use only the first N training examples"))
    modules: list[str] | None = field(default=None, metadata=field_help(
        "record only these LoRA modules: names, projection types or labels such as v_proj down_proj, v o "
        "(default: all)"))
    every_n_steps: int = field(default=1, metadata=field_help("record every N-th optimizer step"))
    storage_dtype: str = field(default="float32", metadata=field_help(
        "storage dtype of the raw gradient shards (statistics stay float64)", choices=STORAGE_DTYPES))
    steps_per_shard: int | None = field(default=None, metadata=field_help(
        "steps per raw shard; a hard kill loses at most the unfinished shard (default: up to 64 steps or 256 MiB)"))
    save_raw: bool = field(default=True, metadata=field_help(
        "write raw gradient shards (off: streaming statistics only)"))
    resume: bool = field(default=False, metadata=field_help(
        "continue the run in --out: training restarts from its newest Trainer checkpoint at or before the last "
        "recorded step (or from the start, deterministically), and already recorded steps are skipped"))
    logging_dir: str | None = field(default=None, metadata=field_help(
        "where TensorBoard events go with --report_to tensorboard (default: RUN_DIR/trainer/runs/DATE_HOST; "
        "transformers 5 reads it from TENSORBOARD_LOGGING_DIR, which gradlens sets for the run)"))
    trl: dict[str, Any] = field(default_factory=dict, metadata=field_help("extra TRL config fields", cli=False))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.regime not in REGIMES:
            raise GradlensError(f"unknown regime {self.regime!r}; choose one of: {', '.join(REGIMES)}")
        check_space(self.space)
        if not self.out:
            raise GradlensError("an output run directory is required (--out RUN_DIR)")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise GradlensError(f"storage_dtype {self.storage_dtype!r} is not one of {', '.join(STORAGE_DTYPES)}")
        for name in ("max_steps", "every_n_steps", "steps_per_shard", "n_train"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise GradlensError(f"{name} must be >= 1, got {value}")
        if self.n_eval < 0:
            raise GradlensError(f"n_eval must be >= 0, got {self.n_eval}")
        check_seed("seed", self.seed)
        if self.learning_rate is not None and not 0 < self.learning_rate < float("inf"):
            raise GradlensError(f"learning_rate must be > 0 and finite, got {self.learning_rate}")
        check_trl_extras(self.trl)


@dataclass
class ProbeConfig(RecordConfig):
    """``gradlens probe``: a short recorded run (statistics only) whose accumulators score every B entry, then masks.

    ``out`` is the probe directory: the recorded run goes to ``OUT/run``, masks to ``OUT/masks``, costs to
    ``OUT/probe.json``.
    """

    max_steps: int = field(default=16, metadata=field_help("optimizer steps of the probe"))
    n_eval: int = field(default=0, metadata=field_help(
        "after the probe, greedy accuracy on the first N held-out examples, written to OUT/run/eval.json "
        "(default 0: off)"))
    save_raw: bool = field(default=False, metadata=field_help(
        "also write raw gradient shards (the selectors need only the streaming statistics)"))
    methods: list[str] = field(default_factory=lambda: list(INFORMED_METHODS), metadata=field_help(
        "informed selectors to build masks with", choices=INFORMED_METHODS))
    budgets: list[str] = budgets_field(["1%"])
    scope: str = scope_field()
    train_steps: int | None = field(default=None, metadata=field_help(
        "optimizer steps of the training run the probe is for, to report the probe's cost as a fraction of it"))

    def __post_init__(self) -> None:
        super().__post_init__()
        check_methods(self.methods, INFORMED_METHODS)
        check_budgets(self.budgets, self.scope)
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

    out: str = field(default="", metadata=field_help(
        "output directory: OUT/adapter, OUT/train.json, OUT/eval.json, OUT/run with --record (required)"))
    n_eval: int = field(default=0, metadata=field_help(
        "after training, greedy accuracy on the first N held-out examples, written to OUT/eval.json "
        "(default 0: off)"))
    mask: str | None = field(default=None, metadata=field_help(
        "sparse-B: a mask file from gradlens probe/select; A stays frozen and only the mask's entries of B train "
        "(default: none, every entry of B trains)"))
    record: bool = field(default=False, metadata=field_help(
        "also record every LoRA-B gradient into the run directory OUT/run, as gradlens record does"))
    drift_guard: bool = field(default=True, metadata=field_help(
        "fingerprint the adapted layers' base weights at train begin and end and warn if they changed (keeps a "
        "host copy of them; --no-drift_guard: off)"))
    resume: bool = field(default=False, metadata=field_help("not supported by gradlens train", cli=False))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resume or "resume" in self.trl:  # no flag of its own, so --resume would reach TRL's fields
            raise GradlensError("--resume: gradlens train does not resume a run; choose a new --out")
        if self.mask is not None and not self.mask:
            raise GradlensError("--mask is empty; give a mask file from gradlens probe or select")


@dataclass
class CompareConfig(ModelTaskConfig):
    """``gradlens compare``: base, full-B LoRA and sparse-B placements (random and informed) under SFT and GRPO."""

    out: str = field(default="", metadata=field_help("output directory (required)"))
    regimes: list[str] = field(default_factory=lambda: list(REGIMES), metadata=field_help(
        "regimes to compare", choices=REGIMES))
    space: list[str] = field(default_factory=lambda: ["lora_b"], metadata=field_help(
        f"spaces to compare, each with its own full reference, probe and masks: {SPACE_HELP}. With both, "
        "spaces.csv sets them side by side at the same share of each space and, for weight, at the same count of "
        "trainable entries as lora_b's", choices=SPACES))
    methods: list[str] = field(default_factory=lambda: ["random", "random_matched", "fisher", "sign"],
                               metadata=field_help("placement methods; random_matched copies the per-module counts of "
                                              "the first informed method's mask", choices=PLACEMENT_METHODS))
    budgets: list[str] = budgets_field(["1%", "10%"])
    scope: str = scope_field()
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4], metadata=field_help(
        "seeds: each gives its own probe, masks, LoRA init and data order, shared by every method of that seed (so "
        "methods are compared as paired differences)"))
    model: str = field(default="toy:small", metadata=field_help(
        "model: 'toy:PRESET' for the embedded toy base model, or a local path or hub id for from_pretrained"))
    max_steps: int = field(default=60, metadata=field_help("optimizer steps of every training run"))
    probe_steps: int = field(default=16, metadata=field_help("optimizer steps of each probe (informed masks)"))
    full_lrs: list[float] | None = field(default_factory=lambda: [1e-3, 3e-3, 1e-2], metadata=field_help(
        "learning rates swept for full-B LoRA (none: the regime's toy default, no sweep)"))
    sparse_lrs: list[float] = field(default_factory=lambda: [1e-2, 3e-2, 1e-1, 3e-1], metadata=field_help(
        "learning rates swept for each sparse method and budget (on --sweep_seeds, scored on validation prompts)"))
    sweep_seeds: list[int] = field(default_factory=lambda: [1000, 1001], metadata=field_help(
        "seeds of the learning-rate sweep, apart from --seeds: each rate is scored by its mean validation accuracy "
        "over them"))
    grid_extensions: int = field(default=2, metadata=field_help(
        "when the best rate sits at an edge of its grid, extend the grid on that side by a factor of 3, at most this "
        "many times (0: never)"))
    divergence_margin: float = field(default=0.1, metadata=field_help(
        "a run whose training loss becomes non-finite, or whose accuracy falls more than this below the base model's, "
        "is marked diverged: counted in the summary, never averaged in"))
    n_val: int = field(default=200, metadata=field_help(
        "validation prompts for the sweep, held back from the training split"))
    n_eval: int = field(default=400, metadata=field_help("held-out prompts for the reported accuracy"))
    eval_samples: int = field(default=4, metadata=field_help(
        "samples per prompt for sampled accuracy (0: greedy only)"))
    curve_every: int = field(default=0, metadata=field_help(
        "also record greedy accuracy on 100 held-out prompts every N steps (0: off)"))
    export: bool = field(default=True, metadata=field_help("save every trained sparse adapter as a PEFT adapter"))
    resume: bool = field(default=False, metadata=field_help(
        "skip runs already in OUT/placement.csv and OUT/sweep.csv"))
    progress: bool = field(default=True, metadata=field_help("show a progress bar"))
    trl: dict[str, Any] = field(default_factory=dict, metadata=field_help("extra TRL config fields", cli=False))

    def __post_init__(self) -> None:
        super().__post_init__()
        check_trl_extras(self.trl)
        if not self.out:
            raise GradlensError("an output directory is required (--out OUT_DIR)")
        if not self.regimes or any(r not in REGIMES for r in self.regimes):
            raise GradlensError(f"regimes must be among: {', '.join(REGIMES)}; got {self.regimes}")
        check_spaces(self.space)
        check_methods(self.methods, PLACEMENT_METHODS)
        if "random_matched" in self.methods and not set(self.methods) & set(INFORMED_METHODS):
            raise GradlensError("random_matched needs an informed method to copy its per-module counts from "
                                f"(one of: {', '.join(INFORMED_METHODS)})")
        check_budgets(self.budgets, self.scope)
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
