"""DomLoRA (arXiv 2605.06183): a gradient-energy probe concentrates on one shallow FFN down-projection.

From the recorded B-gradients of ``scripts/claim_runs.py``'s runs (SFT and GRPO on ``toy:small``, 2 layers, and
``toy:math``, 4 layers; 60 steps, seeds 0-2, float32): each module's gradient energy ``sum_t ||G_t||_F^2`` over a
probe window (the first 16 steps, the length of ``gradlens probe``; with the 60-step run's rate schedule) and over the
whole run, as a share of the adapter's. Per run: the top module and whether it is a ``down_proj`` in the shallow half
of the layers; its share (top-1); the share of all ``down_proj`` modules and of the shallow half of the layers; the
rank of the first ``down_proj`` among the modules; the Gini coefficient and normalised entropy ``H / log M`` of the
M shares. Modules differ in size (``d_out x r`` entries), so the same is given per entry (energy density) and for the
sizes alone (what uniform energy per entry would give).

Writes ``benchmarks/results/claim_energy.json``.

    python scripts/claim_energy_concentration.py --runs runs/claims --resume
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: experiments/ is not installed

import numpy as np

import experiments.claims as claims

WORLDS = {"toy:small": 2, "toy:math": 4}  # world: layers
PROBE_STEPS = 16
STATS = ("top1", "gini", "entropy", "top_is_shallow_down", "top1_density", "gini_density", "down_share",
         "shallow_share", "down_rank")


def gini(x: np.ndarray) -> float:
    """Gini coefficient of non-negative values: ``sum_i sum_j |x_i - x_j| / (2 n^2 mean)`` (0 equal, -> 1 one)."""
    x = np.asarray(x, np.float64)
    return float(np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) ** 2 * x.mean()))


def entropy(shares: np.ndarray) -> float:
    """``-sum p log p / log M``: 1 for equal shares, 0 for all in one."""
    p = shares[shares > 0]
    return float(-(p * np.log(p)).sum() / np.log(len(shares)))


def layer_of(name: str) -> int:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1])


def concentration(energy: dict[str, float], sizes: dict[str, int], layers: int) -> dict[str, Any]:
    names = list(energy)
    e = np.array([energy[n] for n in names])
    shares = e / e.sum()
    density = e / np.array([sizes[n] for n in names])
    dshares = density / density.sum()
    top = names[int(np.argmax(shares))]
    return {"top": top, "top1": float(shares.max()), "gini": gini(shares), "entropy": entropy(shares),
            "top_is_shallow_down": float(top.endswith("down_proj") and layer_of(top) < layers / 2),
            "top_density": names[int(np.argmax(dshares))], "top1_density": float(dshares.max()),
            "gini_density": gini(dshares),
            "down_share": float(sum(s for n, s in zip(names, shares, strict=True) if n.endswith("down_proj"))),
            "shallow_share": float(sum(s for n, s in zip(names, shares, strict=True) if layer_of(n) < layers / 2)),
            "down_rank": 1 + next(i for i, k in enumerate(np.argsort(-shares)) if names[k].endswith("down_proj")),
            "shares": dict(zip(names, shares.round(5).tolist(), strict=True))}


def measure(run_dir: Path, layers: int) -> dict[str, Any]:
    from gradlens.store import open_run

    run = open_run(run_dir)
    probe, whole, sizes = {}, {}, {}
    for name in run.modules:
        g = run.gradients(name).astype(np.float64)
        per_step = (g.reshape(len(g), -1) ** 2).sum(axis=1)
        probe[name], whole[name], sizes[name] = per_step[:PROBE_STEPS].sum(), per_step.sum(), g[0].size
    size_only = concentration({n: float(s) for n, s in sizes.items()}, sizes, layers)
    return {"probe": concentration(probe, sizes, layers), "run": concentration(whole, sizes, layers),
            "sizes_only": {k: size_only[k] for k in ("top1", "gini", "entropy", "down_share", "shallow_share")}}


def main(argv: list[str]) -> int:
    p = claims.parser(__doc__, "benchmarks/results/claim_energy.json")
    a = p.parse_args(argv)
    wall, cpu = time.time(), claims.cpu_seconds()
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for world, regime, seed, run_dir in claims.float32_runs(Path(a.runs), a.seeds, a.resume):
        runs.setdefault(f"{world} {regime}", {})[seed] = measure(run_dir, WORLDS[world])
    summary = {}
    for key, rows in runs.items():
        summary[key] = {window: {s: claims.interval([r[window][s] for r in rows.values()]) for s in STATS}
                        | {"top_modules": dict(Counter(r[window]["top"] for r in rows.values())),
                           "top_density_modules": dict(Counter(r[window]["top_density"] for r in rows.values()))}
                        for window in ("probe", "run")}
        summary[key]["sizes_only"] = rows[a.seeds[0]]["sizes_only"]
    result = {"claim": "arXiv 2605.06183 (DomLoRA): a gradient-energy probe concentrates on one shallow FFN "
                       "down-projection", "steps": claims.STEPS, "probe_steps": PROBE_STEPS, "seeds": a.seeds,
              "layers": WORLDS, "summary": summary, "runs": runs}
    claims.write_result(Path(a.out), result, argv, wall, cpu)
    for key, row in summary.items():
        for window in ("probe", "run"):
            print(key, window, row[window]["top_modules"], "  ".join(
                f"{s} {v['mean']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]" for s, v in row[window].items()
                if isinstance(v, dict) and "mean" in v))
        print(key, "sizes only", row["sizes_only"])
    print(f"claim_energy_concentration: {a.out}; {time.time() - wall:.0f} s wall, "
          f"{claims.cpu_seconds() - cpu:.0f} s CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
