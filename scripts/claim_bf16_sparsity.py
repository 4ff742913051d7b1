""""The Path Not Taken" (arXiv 2511.08567): RLVR updates look sparse partly because bf16 hides small updates.

The same GRPO run on ``toy:small`` (60 steps, seeds 0-2) with float32 and with bf16 master weights (the whole model,
adapter and AdamW state in bf16; :mod:`experiments.claims`), at the task's learning rate (1e-3) and at 1e-4 and
1e-5 (the paper's full-weight runs use rates near 1e-6). Per run, pooled over all modules and per projection:

- ``b_moved``: share of B's entries that are non-zero at the end (B starts at 0);
- ``b_stalled``: per step, share of B's already-moved entries that the step left exactly unchanged (AdamW moves every
  entry with a non-zero moment, so in float32 this is 0; in bf16 it counts the updates rounded away), mean over steps
  and over the last 10;
- the effective update ``Delta W = s B A`` (float32), and the share of the base weight W's entries that change:
  ``dw_nonzero`` (Delta W != 0), ``dw_above_1e-5`` (|Delta W| > 1e-5, Mukherjee et al.'s tolerance), ``w_changed_fp32``
  (``W + Delta W != W`` in float32) and ``w_changed_bf16`` (``bf16(bf16(W) + Delta W) != bf16(W)``: what a bf16
  checkpoint of the merged model shows);
- ``w_changed_bf16_x{c}``: the same with Delta W scaled by c = 0.1, 0.01, 0.001, a sketch of a c times smaller
  learning rate (AdamW's steps scale with the rate), checked against the real runs at 1e-4 and 1e-5;
- held-out greedy accuracy (400 prompts).

Also checks what ``gradlens record --dtype bfloat16`` does on CPU with a toy model (the dtype it loads and the dtype
its provenance states). Writes ``benchmarks/results/claim_bf16.json``.

    python scripts/claim_bf16_sparsity.py --runs runs/claims --resume
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: experiments/ is not installed

import numpy as np

from experiments.claims import (
    adapter_factors,
    base_weights,
    cpu_seconds,
    ensure_run,
    interval,
    load_trajectory,
    parser,
    write_result,
)

MODEL = "toy:small"
SCALES = (0.1, 0.01, 0.001)
SCALED = tuple(f"w_changed_bf16_x{c}" for c in SCALES)
STATS = ("b_moved", "b_stalled", "b_stalled_last10", "dw_nonzero", "dw_above_1e-5", "w_changed_fp32",
         "w_changed_bf16", *SCALED, "accuracy")


def bf16(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to bfloat16 (round to nearest even, as torch does), back as float32."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(torch.bfloat16).float().numpy()


def measure(run_dir: Path, weights: dict[str, np.ndarray]) -> dict[str, Any]:
    """The statistics of the module docstring for one run: pooled, and ``by_proj`` per projection type."""
    from gradlens.fsio import read_json
    from gradlens.modules import proj_label

    traj = load_trajectory(run_dir)
    a, scaling = adapter_factors(run_dir)
    counts: dict[str, dict[str, float]] = {}
    stalled = np.zeros(len(next(iter(traj.values()))) - 1)
    active = np.zeros_like(stalled)
    for name, b in traj.items():
        prev, cur = b[:-1], b[1:]
        moved = prev != 0
        stalled += (moved & (cur == prev)).reshape(len(cur), -1).sum(axis=1)
        active += moved.reshape(len(cur), -1).sum(axis=1)
        dw = (scaling * (b[-1].astype(np.float64) @ a[name].astype(np.float64))).astype(np.float32)
        w = weights[name]
        w16 = bf16(w)
        c = {"b_entries": b[-1].size, "b_moved": np.count_nonzero(b[-1]), "w_entries": w.size,
             "dw_nonzero": np.count_nonzero(dw), "dw_above_1e-5": int((np.abs(dw) > 1e-5).sum()),
             "w_changed_fp32": int(((w + dw) != w).sum()), "w_changed_bf16": int((bf16(w16 + dw) != w16).sum()),
             **{k: int((bf16(w16 + np.float32(c) * dw) != w16).sum()) for k, c in zip(SCALED, SCALES, strict=True)}}
        for key in ("all", proj_label(name)):
            acc = counts.setdefault(key, dict.fromkeys(c, 0))
            for k, v in c.items():
                acc[k] += v

    def shares(c: dict[str, float]) -> dict[str, float]:
        return {"b_moved": c["b_moved"] / c["b_entries"],
                **{k: c[k] / c["w_entries"] for k in ("dw_nonzero", "dw_above_1e-5", "w_changed_fp32",
                                                        "w_changed_bf16", *SCALED)}}

    series = np.divide(stalled, active, out=np.full_like(stalled, np.nan), where=active > 0)
    evaluation = read_json(run_dir / "eval.json", "evaluation")
    return {**shares(counts.pop("all")), "b_stalled": float(np.nanmean(series)),
            "b_stalled_last10": float(np.nanmean(series[-10:])), "b_stalled_series": series.tolist(),
            "accuracy": evaluation["accuracy"], "by_proj": {k: shares(v) for k, v in counts.items()}}


def dtype_flag_check() -> dict[str, Any]:
    """What ``gradlens record --dtype bfloat16`` gives on this machine with a toy model: the dtype the base model and
    the adapter are loaded in, and the dtype the run's provenance records."""
    from gradlens.config import RecordConfig
    from gradlens.lora import lora_b_parameters
    from gradlens.training.setup import setup_run

    setup = setup_run(RecordConfig(model=MODEL, regime="grpo", out="unused", dtype="bfloat16"))
    base = next(p for n, p in setup.model.named_parameters() if "base_layer" in n)
    return {"flag": "--dtype bfloat16", "device": setup.device, "provenance_model_dtype": setup.model_dtype,
            "base_weight_dtype": str(base.dtype),
            "lora_b_dtype": str(next(p for _, p in lora_b_parameters(setup.model)).dtype)}


def lr_summary(per_run: dict[str, dict[int, dict[str, Any]]], seeds: list[int]) -> dict[str, Any]:
    """Mean and interval over seeds per precision, and the paired bf16 - fp32 difference, of one learning rate."""
    summary: dict[str, Any] = {kind: {s: interval([r[s] for r in runs.values()]) for s in STATS}
                               for kind, runs in per_run.items()}
    summary["bf16_minus_fp32"] = {s: interval([per_run["bf16"][k][s] - per_run["fp32"][k][s] for k in seeds])
                                  for s in STATS}
    projections = sorted({q for r in per_run["fp32"].values() for q in r["by_proj"]})
    summary["by_proj"] = {kind: {q: {s: interval([r["by_proj"][q][s] for r in runs.values()])
                                     for s in ("b_moved", "dw_above_1e-5", "w_changed_bf16")} for q in projections}
                          for kind, runs in per_run.items()}
    return summary


def main(argv: list[str]) -> int:
    p = parser(__doc__, "benchmarks/results/claim_bf16.json")
    p.add_argument("--lrs", nargs="+", type=float, default=[0.0, 1e-4, 1e-5],
                   help="learning rates (0: the task's, 1e-3)")
    a = p.parse_args(argv)
    wall, cpu = time.time(), cpu_seconds()
    weights = base_weights(MODEL)
    runs, summary = {}, {}
    for lr in a.lrs:
        key = "task default (1e-3)" if lr == 0 else f"{lr:g}"
        runs[key] = {"fp32": {}, "bf16": {}}
        for seed in a.seeds:
            for kind in runs[key]:
                run_dir, _ = ensure_run(Path(a.runs), MODEL, "grpo", seed, bf16_master=kind == "bf16",
                                        resume=a.resume, n_eval=400, learning_rate=lr or None)
                runs[key][kind][seed] = measure(run_dir, weights)
        summary[key] = lr_summary(runs[key], a.seeds)
    result = {"claim": "arXiv 2511.08567: RLVR updates look sparse partly because bf16 hides small updates",
              "model": MODEL, "regime": "grpo", "steps": 60, "seeds": a.seeds, "summary": summary, "runs": runs,
              "dtype_flag_check": dtype_flag_check()}
    write_result(Path(a.out), result, argv, wall, cpu)
    for key, row in summary.items():
        for kind in ("fp32", "bf16", "bf16_minus_fp32"):
            print(f"lr {key}", kind, "  ".join(f"{s} {v['mean']:.4f} [{v['lo']:.4f}, {v['hi']:.4f}]"
                                               for s, v in row[kind].items()))
    print("dtype flag:", result["dtype_flag_check"])
    print(f"claim_bf16_sparsity: {a.out}; {time.time() - wall:.0f} s wall, {cpu_seconds() - cpu:.0f} s CPU")
    return 0

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
