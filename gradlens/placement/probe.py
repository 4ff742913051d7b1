"""The probe: a few recorded optimizer steps whose exact accumulators score every B entry, then masks per budget.

The claim under test is that a short probe (well under 1% of the training run) finds the entries worth training, so
the probe reports its own cost: optimizer steps and measured seconds, as fractions of the run it is for.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradlens.config import ProbeConfig
from gradlens.errors import GradlensError
from gradlens.fsio import json_dump

if TYPE_CHECKING:
    from gradlens.training.setup import RunSetup

PROBE_FILE = "probe.json"


@dataclass(frozen=True)
class ProbeResult:
    """The probe's run, its cost and the masks it wrote (``masks[(method, budget)]`` -> mask file)."""

    path: Path
    run: Path
    steps: int
    train_seconds: float
    wall_seconds: float
    scoring_seconds: dict[str, float]
    masks: dict[tuple[str, str], Path]
    cost: dict[str, Any]


def probe(config: ProbeConfig, *, train_seconds: float | None = None, progress: bool = True,
          setup: RunSetup | None = None) -> ProbeResult:
    """Record ``config.max_steps`` steps into ``OUT/run``, build a mask per selector and budget, write ``probe.json``.

    ``train_seconds`` (measured time of the training run the probe is for) makes the seconds fraction a
    measurement; otherwise it is estimated from the probe's own seconds per step and ``config.train_steps``.
    ``progress=False`` silences the Trainer's bar and logs; ``setup``: the model (a fresh LoRA-FA adapter), task and
    rows when the caller already holds them (compare, on its in-memory base model).
    """
    from gradlens.placement.run_masks import write_masks
    from gradlens.store import open_run
    from gradlens.training.record_run import record

    out = Path(config.out)
    run_dir = out / "run"
    start = time.perf_counter()
    result = record(config.record_config(str(run_dir)), progress=progress, setup=setup, tool="gradlens probe")
    wall = time.perf_counter() - start
    seconds = result.train_seconds
    run = open_run(run_dir)
    masks, scoring = write_masks(run, out, config.methods, config.budgets, config.scope, config.seed,
                                 {"probe_steps": len(run.steps)})
    cost = probe_cost(len(run.steps), seconds, config.train_steps, train_seconds)
    info = {"tool": "gradlens probe", "config": asdict(config), "run": str(run_dir), "steps": len(run.steps),
            "train_seconds": seconds, "wall_seconds": wall, "scoring_seconds": scoring, "cost": cost,
            "masks": {f"{m}/{b}": str(p) for (m, b), p in masks.items()}, "versions": run.meta.get("versions")}
    json_dump(info, out / PROBE_FILE)
    return ProbeResult(path=out, run=run_dir, steps=len(run.steps), train_seconds=seconds, wall_seconds=wall,
                       scoring_seconds=scoring, masks=masks, cost=cost)


def probe_cost(probe_steps: int, probe_seconds: float, train_steps: int | None,
               train_seconds: float | None = None) -> dict[str, Any]:
    """The probe's cost as fractions of a training run, in optimizer steps and in seconds.

    Without a measured ``train_seconds`` the run's time is estimated as ``train_steps`` at the probe's seconds per
    step, and ``seconds_measured`` says so.
    """
    cost: dict[str, Any] = {"probe_steps": probe_steps, "probe_seconds": probe_seconds, "train_steps": train_steps,
                            "train_seconds": train_seconds, "seconds_measured": train_seconds is not None}
    if train_steps:
        cost["fraction_steps"] = probe_steps / train_steps
        if train_seconds is None:
            cost["train_seconds"] = probe_seconds / probe_steps * train_steps
    if cost["train_seconds"]:
        cost["fraction_seconds"] = probe_seconds / cost["train_seconds"]
    return cost


def describe(result: ProbeResult) -> str:
    """One paragraph for the console: cost and where the masks are."""
    c = result.cost
    line = f"gradlens probe: {result.steps} steps in {result.train_seconds:.1f} s of training"
    if "fraction_steps" in c:
        kind = "measured" if c["seconds_measured"] else "estimated"
        line += (f", {100 * c['fraction_steps']:.2f}% of a {c['train_steps']}-step run in steps and "
                 f"{100 * c['fraction_seconds']:.2f}% in seconds ({kind})")
    slowest = max(result.scoring_seconds.values(), default=0.0)
    line += f"; {len(result.masks)} masks (slowest scoring {slowest * 1000:.0f} ms) in {result.path / 'masks'}"
    return line


def read_probe(path: str | Path) -> dict[str, Any]:
    """The ``probe.json`` of a probe directory."""
    file = Path(path) / PROBE_FILE
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise GradlensError(f"{file} does not exist: not a probe directory") from None
    except (OSError, json.JSONDecodeError) as e:
        raise GradlensError(f"{file}: cannot read ({e})".splitlines()[0]) from e
