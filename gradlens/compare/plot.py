"""The placement figure: held-out accuracy per method and budget, one panel per regime."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from gradlens.analysis.figures import new_figure


def placement_plot(summary: Any, path: Path, provenance: dict[str, Any]) -> Path:
    """Held-out accuracy per method and budget (mean and 95% interval over seeds), one panel per regime (and space,
    when a comparison ran more than lora_b), with the base model and full-B LoRA (full W) as horizontal references.
    Intervals are drawn clipped to [0, 1], the range of an accuracy (a 3-seed t-interval can leave it);
    ``summary.csv`` keeps them unclipped."""
    spaces = summary["space"] if "space" in summary else ["lora_b"] * len(summary)
    panels = list(dict.fromkeys(zip(spaces, summary["regime"], strict=True)))
    fig, axes = new_figure(1, len(panels), width=5.2, height=3.6)
    for ax, (space, regime) in zip(axes[0], panels, strict=True):
        g = summary[(np.asarray(spaces) == space) & (summary["regime"] == regime)]
        base, full = g[g["method"] == "base"], g[g["method"] == "full"]
        sparse = g[~g["method"].isin(["base", "full"])]
        budgets = list(dict.fromkeys(sparse["budget"]))
        methods = list(dict.fromkeys(sparse["method"]))
        width = 0.8 / max(len(methods), 1)
        for i, method in enumerate(methods):
            rows = sparse[sparse["method"] == method].set_index("budget").reindex(budgets)
            x = np.arange(len(budgets)) + (i - (len(methods) - 1) / 2) * width
            mean = rows["accuracy_mean"].to_numpy(float)
            lo, hi = (np.clip(rows[c].to_numpy(float), 0.0, 1.0) for c in ("ci95_lo", "ci95_hi"))
            err = np.vstack([mean - lo, hi - mean])
            ax.errorbar(x, mean, yerr=np.nan_to_num(err), fmt="o", capsize=3, label=method, color=f"C{i}")
        if len(base):
            ax.axhline(base["accuracy_mean"].iloc[0], color="0.4", ls="--", lw=1, label="base")
        if len(full):
            f = full.iloc[0]
            ax.axhline(f["accuracy_mean"], color="k", lw=1, label="full-B LoRA" if space == "lora_b" else "full W")
            if np.isfinite(f["ci95_lo"]):
                ax.axhspan(max(f["ci95_lo"], 0.0), min(f["ci95_hi"], 1.0), color="k", alpha=0.08)
        ax.set_xticks(np.arange(len(budgets)), budgets)
        ax.set_xlabel("budget (share of B entries trained)" if space == "lora_b" else "budget (of W entries trained)")
        ax.set_ylabel("held-out greedy accuracy")
        ax.set_title(f"{regime.upper()}: placement" + ("" if space == "lora_b" else f" [{space}]"))
    axes[0][-1].legend(fontsize=7, loc="best")
    meta = {"Software": f"gradlens {provenance.get('versions', {}).get('gradlens', '')}".strip(),
            "Description": json.dumps(provenance.get("config", {}), default=str)}
    fig.savefig(path, dpi=110, metadata=meta)
    return path
