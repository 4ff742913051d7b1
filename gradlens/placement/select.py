"""``gradlens select``: placement masks from the accumulators of a run already recorded (by ``gradlens record``,
``gradlens train --record``, a probe, or a ``GradientRecorder`` in your own Trainer), without training anything."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from gradlens.config import SelectConfig
from gradlens.errors import GradlensError
from gradlens.fsio import check_unused_out, json_dump
from gradlens.placement.diagnose import locate_run
from gradlens.placement.probe import write_masks
from gradlens.provenance import package_versions
from gradlens.store.runstate import announce

SELECT_FILE = "select.json"


def select_masks(run_dir: str | Path, config: SelectConfig) -> tuple[dict[tuple[str, str], Path], dict[str, float]]:
    """Masks per selector and budget in ``OUT/masks`` (see :func:`~gradlens.placement.probe.write_masks`), plus
    ``OUT/select.json`` (config, run, its state, versions). ``run_dir`` is a run directory or a probe directory (its
    ``run``, as ``diagnose`` reads it). A used ``OUT`` is refused unless ``config.overwrite``, which removes its old
    masks first, so the masks of two runs never sit side by side."""
    from gradlens.store import open_run

    out = Path(config.out)
    check_unused_out(out, config.overwrite)
    run_path, probe = locate_run(Path(run_dir))
    run = open_run(run_path)
    if not run.steps:
        raise GradlensError(f"{run.path}: the run holds no recorded steps, so there is nothing to score")
    state = announce(run.meta, str(run.path), doing="scoring")
    for old in (out / "masks").glob("*.safetensors") if config.overwrite else ():
        old.unlink()
    masks, scoring = write_masks(run, out, config.methods, config.budgets, config.scope, config.seed,
                                 {"source_steps": len(run.steps)})
    json_dump({"tool": "gradlens select", "config": asdict(config), "run": str(run.path), "steps": len(run.steps),
               "probe": probe, **state,
               "run_seed": run.meta.get("seed"), "scoring_seconds": scoring,
               "masks": {f"{m}/{b}": str(p) for (m, b), p in masks.items()}, "versions": package_versions()},
              out / SELECT_FILE)
    return masks, scoring
