"""Settings and small helpers shared by the notebooks in ``notebooks/`` (light to import: no torch).

Two environment variables steer every notebook:

- ``GRADLENS_SETTING``: ``small`` (default; tiny model, a few steps, what the test suite executes) or ``full``
  (the settings behind the published figures, ``make figures``);
- ``GRADLENS_OUT``: the base output directory (default ``runs/notebooks`` under the repository root). Notebook
  ``NAME`` writes into ``GRADLENS_OUT/SETTING/NAME``, so the small and full settings never mix. A relative
  ``GRADLENS_OUT`` is taken relative to the repository root, not to the kernel's working directory (``notebooks/``
  when run by ``jupyter nbconvert`` or the tests).

``GRADLENS_WORLD=math`` runs every notebook's training on ``toy:math`` (GSM8K-style word problems with worked
solutions, through the gsm8k task) instead of the addition toys, in either setting (:func:`in_world`); its output goes
to ``GRADLENS_OUT/SETTING-math/NAME``.

In the full setting every figure is also copied into ``figures/`` at the repository root as ``PREFIX_FILE.png``
(``PREFIX``: the notebook's number), by :func:`save_figure`, :func:`publish` and :func:`show`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

from gradlens.config import CompareConfig, RecordConfig
from gradlens.errors import GradlensError

SETTINGS = ("small", "full")
SETTING_ENV = "GRADLENS_SETTING"
WORLD_ENV = "GRADLENS_WORLD"
WORLDS = ("addition", "math")
OUT_ENV = "GRADLENS_OUT"
DEFAULT_OUT = Path("runs") / "notebooks"
FIGURES = "figures"

# The placement comparison of notebooks 02 and 03 (03 reuses 02's output when it is there).
PLACEMENT: dict[str, dict[str, Any]] = {
    "small": dict(model="toy:tiny", methods=["random", "random_matched", "fisher", "sign"], budgets=["10%"],
                  seeds=[0, 1], max_steps=6, probe_steps=4, full_lrs=None, sparse_lrs=[3e-2], n_val=20, n_eval=40,
                  eval_samples=0, curve_every=2, progress=False,
                  trl={"per_device_train_batch_size": 8, "num_generations": 4}),
    # The CompareConfig defaults (toy:small, 60 steps, budgets 1% and 10%, seeds 0-2, random, random_matched,
    # fisher and sign, learning rates swept on a separate seed) with accuracy curves: about 20-25 minutes on 2 idle
    # cores. Each further selector (sign_magnitude, modules) adds about 4 minutes.
    "full": dict(curve_every=10, progress=False),
}
_NOT_COMPARED = ("out", "resume", "progress")


def setting() -> str:
    """``small`` or ``full``, from ``$GRADLENS_SETTING`` (default ``small``)."""
    value = os.environ.get(SETTING_ENV, "").strip().lower() or "small"
    if value not in SETTINGS:
        raise GradlensError(f"{SETTING_ENV}={value!r}: choose one of {', '.join(SETTINGS)}")
    return value


def world() -> str:
    """``addition`` (default: the toy:tiny/toy:small settings) or ``math``, from ``$GRADLENS_WORLD``."""
    value = os.environ.get(WORLD_ENV, "").strip().lower() or "addition"
    if value not in WORLDS:
        raise GradlensError(f"{WORLD_ENV}={value!r}: choose one of {', '.join(WORLDS)}")
    return value


def in_world(config: Any) -> Any:
    """A record or compare config moved to toy:math (its own task and answer budget) when ``$GRADLENS_WORLD`` is
    ``math``; else ``config`` itself."""
    if world() != "math":
        return config
    return replace(config, model="toy:math", task=None, eval_max_new_tokens=None)


def repo_root(start: str | os.PathLike[str] | None = None) -> Path:
    """The nearest directory at or above ``start`` (default: the working directory) holding ``pyproject.toml``
    and ``notebooks/``; the working directory itself when there is none."""
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "pyproject.toml").is_file() and (d / "notebooks").is_dir():
            return d
    return here


def output_dir(name: str) -> Path:
    """``GRADLENS_OUT/SETTING/name`` (``SETTING-math`` in the math world), created; see the module docstring."""
    base = Path(os.environ.get(OUT_ENV, "").strip() or DEFAULT_OUT).expanduser()
    if not base.is_absolute():
        base = repo_root() / base
    out = base / (setting() if world() == "addition" else f"{setting()}-{world()}") / name
    out.mkdir(parents=True, exist_ok=True)
    return out


def figures_dir() -> Path | None:
    """``figures/`` at the repository root in the full setting (created), else None."""
    if setting() != "full":
        return None
    d = repo_root() / FIGURES
    d.mkdir(parents=True, exist_ok=True)
    return d


def publish(path: str | os.PathLike[str], prefix: str) -> Path | None:
    """Copy a PNG already written (e.g. by ``analyze_runs`` or ``compare``) to ``figures/PREFIX_NAME`` in the full
    setting; returns the copy, or None in the small setting."""
    d = figures_dir()
    if d is None:
        return None
    path = Path(path)
    return Path(shutil.copyfile(path, d / f"{prefix}_{path.name}"))


def show(path: str | os.PathLike[str], prefix: str) -> Any:
    """Publish a PNG (see :func:`publish`) and return it as an ``IPython.display.Image`` to show in the notebook."""
    from IPython.display import Image

    publish(path, prefix)
    return Image(filename=str(path))


def save_figure(fig: Any, out: str | os.PathLike[str], filename: str, prefix: str) -> Path:
    """Save a matplotlib figure as ``out/filename`` and, in the full setting, as ``figures/PREFIX_filename``."""
    path = Path(out) / filename
    fig.savefig(path, dpi=110, bbox_inches="tight")
    publish(path, prefix)
    return path


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    plain = json.loads(json.dumps(config, default=str))
    return {k: v for k, v in plain.items() if k not in _NOT_COMPARED}


def record_or_load(config: RecordConfig) -> Path:
    """Record the run of ``config`` into ``config.out``, or reuse the complete run already there if it was recorded
    with the same settings (an interrupted one is resumed); a run with other settings is an error."""
    from gradlens.store import MANIFEST, open_run
    from gradlens.store.runstate import run_state
    from gradlens.training import record

    config = in_world(config)
    out = Path(config.out)
    if (out / MANIFEST).is_file():
        run = open_run(out)
        saved = ((run.meta.get("config") or {}).get("record")) or {}
        if _comparable(saved) != _comparable(asdict(config)):
            raise GradlensError(f"{out} holds a run recorded with other settings; delete it or set {OUT_ENV}")
        if run.meta.get("complete"):
            return out
        print(f"{out}: {run_state(run.meta).describe('keeping')}; resuming it")
        config = replace(config, resume=True)
    record(config)
    return out


def placement_config(out: str | os.PathLike[str]) -> CompareConfig:
    """The :class:`CompareConfig` of the current setting (:data:`PLACEMENT`), writing to ``out``."""
    return in_world(CompareConfig(out=str(out), **PLACEMENT[setting()]))


def load_compare(out: str | os.PathLike[str]):
    """A finished comparison read back from its directory as a :class:`~gradlens.compare.CompareResult`."""
    import pandas as pd

    from gradlens.compare import CompareResult

    out = Path(out)
    prov = json.loads((out / "provenance.json").read_text())
    values: dict[str, Any] = {"out": out, "findings": prov.get("findings", ""),
                              "files": [out / f for f in prov.get("files", [])]}
    for f in fields(CompareResult):
        if f.name in values:
            continue
        csv = out / f"{f.name}.csv"
        df = pd.read_csv(csv, dtype={"budget": str}) if csv.is_file() and csv.stat().st_size else pd.DataFrame()
        if "budget" in df:
            df["budget"] = df["budget"].fillna("")
        values[f.name] = df
    return CompareResult(**values)


def compare_or_load(config: CompareConfig):
    """Run ``compare(config)``, or read back the finished comparison in ``config.out`` if it was made with the same
    settings (an interrupted one is resumed; curves of runs finished before the interruption are not redrawn)."""
    from gradlens.compare import PLACEMENT as PLACEMENT_CSV
    from gradlens.compare import compare

    out = Path(config.out)
    if (out / "provenance.json").is_file():
        saved = json.loads((out / "provenance.json").read_text()).get("config", {})
        if _comparable(saved) != _comparable(asdict(config)):
            raise GradlensError(f"{out} holds a comparison made with other settings; delete it or set {OUT_ENV}")
        return load_compare(out)
    return compare(replace(config, resume=(out / PLACEMENT_CSV).is_file()))


def exported_masks(out: str | os.PathLike[str]):
    """The masks of every trained sparse adapter of a comparison (``OUT/adapters/<regime>/<run>/``), one row each:
    regime, method, budget, seed, k and the mask file, ordered by regime, budget, method and seed."""
    import pandas as pd

    from gradlens.sparse.export import MASK_FILE
    from gradlens.sparse.masks import load_mask

    rows = []
    for path in sorted(Path(out, "adapters").glob(f"*/*/{MASK_FILE}")):
        _, meta = load_mask(path)
        rows.append({"regime": meta.get("regime") or path.parent.parent.name, "method": meta["selector"],
                     "budget": meta["budget"], "seed": int(meta["seed"]), "k": int(meta["k"]), "path": path})
    if not rows:
        raise GradlensError(f"{out}: no exported masks under adapters/ (was the comparison run with export on?)")
    return pd.DataFrame(rows).sort_values(["regime", "budget", "method", "seed"], ignore_index=True)


def mask_overlaps(masks):
    """Jaccard overlap ``|A & B| / |A | B|`` of every pair of the masks in ``masks`` (rows of
    :func:`exported_masks`): the square matrix (labelled ``regime/method/seed``) and the long table of pairs, each
    with its ``relation``: ``seeds`` (same regime and method), ``selectors`` (same regime and seed), ``regimes``
    (same method and seed) or ``other``; ``chance`` is the expected overlap of two random masks of those sizes."""
    import numpy as np
    import pandas as pd

    from gradlens.sparse.masks import load_mask

    flat = []
    for path in masks["path"]:
        mask, _ = load_mask(path)
        flat.append(np.concatenate([mask[name].ravel() for name in sorted(mask)]))
    sizes = {f.size for f in flat}
    if len(sizes) != 1:
        raise GradlensError("mask_overlaps: the masks cover adapters of different sizes")
    n = sizes.pop()
    x = np.stack(flat).astype(np.float64)
    inter = x @ x.T
    counts = x.sum(axis=1)
    union = counts[:, None] + counts[None, :] - inter
    jac = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    labels = [f"{r.regime}/{r.method}/{r.seed}" for r in masks.itertuples()]
    matrix = pd.DataFrame(jac, index=labels, columns=labels)
    rows = []
    recs = masks.to_dict("records")
    for i in range(len(recs)):
        for j in range(i + 1, len(recs)):
            a, b = recs[i], recs[j]
            same = {key: a[key] == b[key] for key in ("regime", "method", "seed", "budget")}
            relation = ("seeds" if same["regime"] and same["method"] else "selectors" if same["regime"]
                        and same["seed"] else "regimes" if same["method"] and same["seed"] else "other")
            expected_inter = counts[i] * counts[j] / n
            rows.append({"a": labels[i], "b": labels[j], "budget_a": a["budget"], "budget_b": b["budget"],
                         "relation": relation, "regime_a": a["regime"], "regime_b": b["regime"],
                         "method_a": a["method"], "method_b": b["method"], "jaccard": jac[i, j],
                         "chance": expected_inter / (counts[i] + counts[j] - expected_inter)})
    return matrix, pd.DataFrame(rows)


# The phase diagram of notebook 04 (experiments.rivals.PhaseConfig): the gap against the budget, SFT and GRPO.
PHASE: dict[str, dict[str, Any]] = {
    "small": dict(widths=["toy:tiny"], steps=[4], budgets=["1%", "10%"], seeds=[0, 1], probe_steps=3, full_lrs=None,
                  sparse_lrs=[3e-2], sweep_seeds=[1000], n_val=20, n_eval=40, progress=False,
                  trl={"per_device_train_batch_size": 8, "num_generations": 4}),
    # PhaseConfig's defaults: six budgets from 0.03% to 10%, 5 seeds, swept rates, toy:small at 60 and 240 steps and
    # toy:wide at 60 (built on first use): several hours on 2 cores.
    "full": dict(progress=False),
}


def phase_config(out: str | os.PathLike[str]):
    """The :class:`~experiments.rivals.PhaseConfig` of the current setting (:data:`PHASE`), writing to ``out``."""
    from experiments.rivals import PhaseConfig

    return PhaseConfig(out=str(out), **PHASE[setting()])


def phase_or_load(config) -> dict[str, Any]:
    """Run the phase diagram of ``config`` (:func:`experiments.rivals.run_phase`), or read back the finished one in
    ``config.out`` if it was made with the same settings (an interrupted one is resumed)."""
    from experiments.rivals import run_phase

    out = Path(config.out)
    if (out / "phase.json").is_file():
        saved = json.loads((out / "phase.json").read_text())
        if _comparable(saved.get("config", {})) != _comparable(asdict(config)):
            raise GradlensError(f"{out} holds a phase diagram made with other settings; delete it or set {OUT_ENV}")
        if len(saved.get("rows", [])) == len(config.cells()) * len(config.regimes) * len(config.budgets):
            return saved
    return run_phase(replace(config, resume=True))
