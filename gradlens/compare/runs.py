"""The runs of a comparison: one base model kept in memory, each configuration (and each seed's probe) trained on a
fresh copy of it through the one training path (:func:`gradlens.training.run.run_training`), and evaluated on the
task's splits. The base model is loaded once for the whole comparison."""

from __future__ import annotations

import copy
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradlens.budget import Budget
from gradlens.config import CompareConfig, ProbeConfig, RecordConfig
from gradlens.errors import GradlensError
from gradlens.tasks.base import Task

CURVE_PROMPTS = 100


@dataclass(frozen=True)
class Splits:
    """Training rows, validation rows held back from the train split (the sweep's), and the held-out rows."""

    train: Any
    val: Any
    heldout: Any


def split_task(task: Task, n_val: int, n_eval: int) -> Splits:
    """The train split minus its last ``n_val`` rows, those rows for validation, and ``n_eval`` eval-split rows."""
    train = task.dataset(task.train_split)
    if n_val >= len(train) // 2:
        raise GradlensError(f"n_val={n_val} leaves too little training data ({len(train)} rows in task "
                            f"{task.name}'s {task.train_split!r} split)")
    heldout = task.dataset(task.eval_split)
    if n_eval > len(heldout):
        raise GradlensError(f"n_eval must be <= {len(heldout)} (the size of task {task.name}'s "
                            f"{task.eval_split!r} split), got {n_eval}")
    n = len(train) - n_val
    return Splits(train=train.select(range(n)), val=train.select(range(n, len(train))),
                  heldout=heldout.select(range(n_eval)))


def _accuracy_curve(tokenizer: Any, task: Task, data: Any, every: int, sink: list[dict[str, Any]],
                    tags: dict[str, Any]):
    """A TrainerCallback that appends greedy accuracy on the first held-out prompts every ``every`` steps."""
    from transformers import TrainerCallback

    from gradlens.evaluate import accuracy

    prompts = data.select(range(min(CURVE_PROMPTS, len(data))))

    class AccuracyCurve(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % every == 0:
                acc = accuracy(kwargs["model"], tokenizer, task, prompts, k=0)
                sink.append({**tags, "step": state.global_step, "accuracy": acc.greedy})

    return AccuracyCurve()


class CompareRuns:
    """Trains and evaluates one configuration at a time on a shared in-memory base model."""

    def __init__(self, config: CompareConfig, out: Path) -> None:
        from gradlens.lora import attach_lora, lora_b_parameters
        from gradlens.sparse.space import attach_weight_space, weight_parameters
        from gradlens.tasks import load_task_for
        from gradlens.training.setup import load_base

        self.config = config
        self.out = out
        self.base = load_base(config, progress=config.progress)
        self.device, self.model_dtype, self.tokenizer = self.base.device, self.base.model_dtype, self.base.tokenizer
        self.task = load_task_for(config, self.base.model, self.tokenizer)
        self.data = split_task(self.task, config.n_val, config.n_eval)
        self.curves: list[dict[str, Any]] = []
        self._base_accuracy: dict[str, float] = {}
        # The entries each space offers: B of a LoRA-FA adapter, or W of the same target modules.
        adapter = attach_lora(copy.deepcopy(self.base.model), **config.lora_kwargs())
        weights = attach_weight_space(copy.deepcopy(self.base.model), config.lora_target_modules)
        self.shapes = {"lora_b": {name: tuple(p.shape) for name, p in lora_b_parameters(adapter)},
                       "weight": {name: tuple(p.shape) for name, p in weight_parameters(weights)}}

    def record_config(self, regime: str, seed: int, lr: float | None, out: Path,
                      space: str = "lora_b") -> RecordConfig:
        """The run as ``gradlens record`` would describe it; TRL extras that the regime's config lacks are dropped
        (``num_generations`` means nothing to SFT)."""
        from gradlens.training.settings import config_fields

        c = self.config
        trl = {k: v for k, v in c.trl.items() if k in config_fields(regime)}
        return RecordConfig(**c.model_task_fields(), regime=regime, out=str(out), max_steps=c.max_steps, seed=seed,
                            learning_rate=lr, n_train=len(self.data.train), trl=trl, space=space)

    def settings(self, regime: str, seed: int, lr: float | None) -> dict[str, Any]:
        from gradlens.training.settings import trl_settings

        return trl_settings(self.record_config(regime, seed, lr, self.out), self.task, self.device,
                            self.model_dtype)

    def default_lr(self, regime: str) -> float:
        """The task's rate for the regime, else TRL's default."""
        from gradlens.training.settings import default_learning_rate

        return float(self.settings(regime, 0, None).get("learning_rate", default_learning_rate(regime)))

    def base_accuracy(self, split: str) -> float:
        """The base model's greedy accuracy on a split (cached): what a diverged run falls below."""
        if split not in self._base_accuracy:
            self._base_accuracy[split] = self.evaluate(self.base.model, split, 0, samples=False)["accuracy"]
        return self._base_accuracy[split]

    def evaluate(self, model: Any, split: str, seed: int, samples: bool = True) -> dict[str, float]:
        from gradlens.evaluate import accuracy

        data = self.data.heldout if split == "heldout" else self.data.val
        k = self.config.eval_samples if split == "heldout" and samples else 0
        acc = accuracy(model, self.tokenizer, self.task, data, k=k, seed=seed)
        return {"accuracy": acc.greedy, "sampled_accuracy": acc.sampled, "pass_at_k": acc.pass_at_k,
                "n_prompts": acc.n}

    def setup(self, config: RecordConfig):
        """A run of this comparison: a fresh LoRA-FA adapter (A drawn with the run's seed) on a copy of the base
        model, the comparison's task and its training rows (without the validation rows)."""
        from gradlens.training.setup import setup_run

        return setup_run(config, base=self.base, task=self.task, data=self.data.train)

    def train_run(self, regime: str, seed: int, lr: float, mask: dict[str, np.ndarray] | None,
              tags: dict[str, Any] | None = None, space: str = "lora_b"):
        """(trained PeftModel, measured train seconds, whether the loss and B stayed finite): full-B LoRA-FA, or
        sparse-B when ``mask`` is given (space ``weight``: the target modules' W, all of it or the mask's entries).
        The drift guard compares checksums only (no host copy per run); space ``weight`` trains the base weights, so
        it has none."""
        from gradlens.drift import DriftGuard
        from gradlens.training.run import run_training

        c = self.config
        config = self.record_config(regime, seed, lr, self.out, space)
        callbacks = []
        if tags is not None and c.curve_every:
            callbacks.append(_accuracy_curve(self.tokenizer, self.task, self.data.heldout, c.curve_every,
                                             self.curves, tags))
        result = run_training(config, out=None, tool="gradlens compare", setup=self.setup(config), mask=mask,
                              drift_guard=DriftGuard(keep_copy=False) if space == "lora_b" else None,
                              callbacks=callbacks, progress=False,
                              settings={"disable_tqdm": True, "logging_steps": c.max_steps})
        return result.model, result.seconds, result.finite

    def export_delta(self, model: Any, mask: dict[str, np.ndarray], out: Path, metadata: dict[str, Any]) -> Path:
        """A weight-space run's trained minus base (the in-memory base model's weights), exactly 0 outside the mask,
        as ``out/sparse_delta.safetensors``."""
        from gradlens.sparse.delta import DELTA_FILE, save_delta, weight_delta
        from gradlens.sparse.space import weight_parameters

        base = dict(self.base.model.named_modules())
        anchors = {name: base[name].weight for name in mask}
        delta = weight_delta(dict(weight_parameters(model)), anchors, mask, str(out / DELTA_FILE))
        out.mkdir(parents=True, exist_ok=True)
        return save_delta(out / DELTA_FILE, delta, {**metadata, "space": "weight"})

    def probe(self, regime: str, seed: int, lr: float, methods: list[str], budgets: list[str],
              space: str = "lora_b"):
        """Masks of the informed ``methods`` for every budget from a probe of this seed in ``space`` (reused on
        resume)."""
        from gradlens.placement.probe import PROBE_FILE, probe, read_probe
        from gradlens.sparse.masks import load_mask

        c = self.config
        out = self.out / "probes" / (f"{regime}-seed{seed}" if space == "lora_b" else f"{space}-{regime}-seed{seed}")
        wanted = {f"{m}/{Budget.parse(b, c.scope)}" for m in methods for b in budgets}
        if not (out / PROBE_FILE).is_file() or not wanted <= set(read_probe(out)["masks"]):
            if out.exists():  # interrupted, or made for fewer budgets or methods: probes are seeded, so run it again
                shutil.rmtree(out)
            fields = {k: v for k, v in asdict(self.record_config(regime, seed, lr, out, space)).items()
                      if k != "max_steps"}
            config = ProbeConfig(**fields, max_steps=c.probe_steps, methods=methods, budgets=list(budgets),
                                 scope=c.scope, train_steps=c.max_steps)
            probe(config, progress=False, setup=self.setup(config))
        info = read_probe(out)
        masks = {tuple(key.split("/", 1)): load_mask(path)[0] for key, path in info["masks"].items()}
        return masks, info
