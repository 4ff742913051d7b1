"""What ``gradlens toy base`` reports: where the toy base model comes from and its accuracy on held-out prompts.

Outside the :mod:`gradlens.toy` package because it loads the model through :mod:`gradlens.models` and evaluates it
(:mod:`gradlens.evaluate`), two stages above the toy world."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gradlens.errors import GradlensError
from gradlens.evaluate import Accuracy, accuracy
from gradlens.fsio import json_dump, read_json
from gradlens.provenance import package_versions
from gradlens.tasks.addition import AdditionTask
from gradlens.toy.math_data import N_TEST
from gradlens.toy.model import RECIPE_FILE, base_model_path, ensure_base_model, get_preset, shipped_model_path

SOURCES = ("shipped", "cached", "built")
# The documented evaluation of a base model, saved next to its weights: the docs' accuracy table is checked against
# this file (tests/test_docs.py) instead of re-evaluating, and the file says which torch/transformers measured it.
REPORT_FILE = "gradlens_base_report.json"
DEFAULT_K = 8  # samples per prompt of the documented evaluation (sampled accuracy and pass@8)


def default_n(preset: str) -> int:
    """Held-out prompts of the documented evaluation: 400 additions, or the first 200 word problems of toy:math
    (whose answers are about 40 tokens long, so 400 would double a several-minute evaluation)."""
    return 200 if get_preset(preset).world == "math" else 400


@dataclass(frozen=True)
class BaseModelReport:
    """The base model's directory, its source (one of :data:`SOURCES`), size, and held-out accuracy."""

    preset: str
    seed: int
    path: Path
    source: str
    n_parameters: int
    accuracy: Accuracy


def base_model_source(preset: str = "tiny", seed: int = 0, *, rebuild: bool = False) -> str:
    """Where :func:`ensure_base_model` will take the model from right now: ``shipped``, ``cached`` or ``built``."""
    if rebuild:
        return "built"
    if shipped_model_path(preset, seed) is not None:
        return "shipped"
    if (base_model_path(preset, seed) / RECIPE_FILE).is_file():
        return "cached"
    return "built"


def evaluate_base_model(preset: str = "tiny", seed: int = 0, *, n: int | None = None, k: int = DEFAULT_K,
                        rebuild: bool = False, progress: bool = False) -> BaseModelReport:
    """Ensure (ship, cache or build) the toy base model, load it with ``from_pretrained``, and evaluate it.

    Accuracy is measured on the first ``n`` prompts (default :func:`default_n`) of the held-out split of the preset's
    task (addition, or the math world's word problems): greedy, and with ``k`` samples per prompt (``k=0`` skips
    sampling).
    """
    from gradlens.models import load_model_and_tokenizer

    p = get_preset(preset)
    n = default_n(preset) if n is None else n
    n_heldout = N_TEST if p.world == "math" else AdditionTask(digits=p.digits).n_heldout
    if not 1 <= n <= n_heldout:
        raise GradlensError(f"--n must be in 1..{n_heldout} (the held-out split's size), got {n}")
    if k < 0:
        raise GradlensError(f"--k must be >= 0, got {k}")
    source = base_model_source(preset, seed, rebuild=rebuild)
    path = ensure_base_model(preset, seed, rebuild=rebuild, progress=progress)
    model, tokenizer = load_model_and_tokenizer(path)
    if p.world == "math":  # the word problems through the gsm8k task, as --model toy:math trains on them
        from gradlens.config import ModelTaskConfig
        from gradlens.tasks import load_task_for

        task = load_task_for(ModelTaskConfig(model=f"toy:{preset}"), model, tokenizer)
    else:
        task = AdditionTask(digits=p.digits)
    data = task.dataset(task.eval_split, n=n)
    acc = accuracy(model, tokenizer, task, data, k=k)
    return BaseModelReport(preset=preset, seed=seed, path=Path(path), source=source,
                           n_parameters=sum(t.numel() for t in model.parameters()), accuracy=acc)


def save_base_report(report: BaseModelReport) -> Path:
    """Write ``report`` as :data:`REPORT_FILE` next to the model's weights (no timestamp, so re-measuring with the
    same packages rewrites the same bytes); returns the file."""
    acc = report.accuracy
    path = report.path / REPORT_FILE
    json_dump({"preset": report.preset, "seed": report.seed, "n_parameters": report.n_parameters, "n": acc.n,
               "k": acc.k, "greedy": acc.greedy, "sampled": acc.sampled, "pass_at_k": acc.pass_at_k,
               "mean_tokens": acc.mean_tokens, "versions": package_versions()}, path)
    return path


def saved_base_report(path: Path) -> dict:
    """The :data:`REPORT_FILE` of the model directory ``path`` (a one-line error naming the file if it is missing)."""
    return read_json(Path(path) / REPORT_FILE, "toy base report")
