"""PNG figures of an analysis, one panel per run side by side (SFT next to GRPO when both are given).

Drawn with matplotlib's object API (``matplotlib.figure.Figure``, rendered by Agg), so no pyplot backend is touched
and it works headless and inside notebooks alike. Every PNG carries the source runs in its metadata.

Kept cheap, since they are most of the fixed cost of ``gradlens analyze`` on a small run: margins fixed in inches
instead of a layout engine (constrained layout measures every text twice, 40% of the drawing), plain-text labels
(the first mathtext label builds its parser, ~0.3 s) and a fixed legend place over long series (where ``loc="best"``
would test every point).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gradlens.analysis.run_stats import RAW_SOURCE
from gradlens.modules import sort_projections

if TYPE_CHECKING:
    from gradlens.analysis.result import AnalysisResult

HEATMAP_METRICS = ("sign_stability_mean", "cos_lag1_mean")
FIGURES = ("lag_cosine.png", "cosine_series.png", "erank_traj.png", "sign_hist.png", "heatmap.png")


MARGINS = {"left": 0.75, "right": 0.2, "bottom": 0.55, "top": 0.4, "wspace": 0.8, "hspace": 0.75}  # inches


def new_figure(n_rows: int, n_cols: int, width: float = 4.6, height: float = 3.4) -> tuple[Any, np.ndarray]:
    """A figure of ``n_rows x n_cols`` panels of ``width x height`` inches each, with :data:`MARGINS` around and
    between them (object API: no pyplot backend is touched)."""
    from matplotlib.figure import Figure

    w, h = width * n_cols, height * n_rows
    m = MARGINS
    fig = Figure(figsize=(w, h))
    fig.subplots_adjust(left=m["left"] / w, right=1 - m["right"] / w, bottom=m["bottom"] / h, top=1 - m["top"] / h,
                        wspace=m["wspace"] / (width - m["wspace"]), hspace=m["hspace"] / (height - m["hspace"]))
    axes = np.asarray(fig.subplots(n_rows, n_cols, squeeze=False))
    return fig, axes


def _save(fig: Any, path: Path, result: AnalysisResult) -> Path:
    prov = result.provenance
    meta = {"Software": f"gradlens {prov['versions'].get('gradlens', '')}".strip(),
            "Source": json.dumps([{"path": r["path"], "seed": r["seed"]} for r in prov["runs"]]),
            "Description": json.dumps({"config": prov["config"], "created": prov["created"]}, default=str)}
    fig.savefig(path, dpi=110, metadata=meta)
    return path


def _title(label: str, regime: str, steps: int) -> str:
    return f"{label} ({regime.upper()}, T={steps})"


def _runs(result: AnalysisResult) -> list[dict[str, Any]]:
    return result.summary[["run", "regime", "steps"]].to_dict("records")


def _adapter(result: AnalysisResult, run: str) -> Any:
    return result.summary[result.summary["run"] == run].iloc[0]


def _colors(result: AnalysisResult) -> dict[str, str]:
    return {p: f"C{i}" for i, p in enumerate(sort_projections(list(result.proj["proj"].unique())))}


def _no_data(ax: Any, text: str) -> None:
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def lag_cosine_figure(result: AnalysisResult, path: Path) -> Path:
    """Mean lag-L cosine against L, per projection type and for the whole adapter."""
    runs, colors, lags = _runs(result), _colors(result), result.runs[0].lags
    fig, axes = new_figure(1, len(runs))
    x = np.arange(1, lags + 1)
    for ax, run in zip(axes[0], runs, strict=True):
        sub = result.proj[result.proj["run"] == run["run"]]
        for _, row in sub.iterrows():
            ax.plot(x, [row[f"cos_lag{lag}_mean"] for lag in x], marker=".", lw=1, color=colors[row["proj"]],
                    label=row["proj"])
        a = _adapter(result, run["run"])
        ax.plot(x, [a[f"cos_lag{lag}_mean"] for lag in x], marker="o", lw=2.5, color="black", label="adapter")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(title=_title(run["run"], run["regime"], run["steps"]), xlabel="lag L (recorded steps)",
               ylabel="mean cos(g_t, g_t+L)")
        ax.legend(fontsize=7, ncol=2)  # loc="best" over 10 points a line is cheap
    return _save(fig, path, result)


def cosine_series_figure(result: AnalysisResult, path: Path) -> Path:
    """Cosine series: lag-1 and to the mean gradient, whole adapter and per projection."""
    runs, colors, series = _runs(result), _colors(result), result.series
    fig, axes = new_figure(1, len(runs), width=5.2)
    for ax, run in zip(axes[0], runs, strict=True):
        sub = series[series["run"] == run["run"]]
        for p in sort_projections([n for n in sub.loc[sub["scope"] == "proj", "name"].unique()]):
            s = sub[(sub["scope"] == "proj") & (sub["name"] == p) & (sub["series"] == "cos_lag1")]
            ax.plot(s["step_to"], s["value"], lw=0.8, alpha=0.6, color=colors.get(p, "grey"), label=f"{p} lag 1")
        s = sub[(sub["scope"] == "adapter") & (sub["series"] == "cos_lag1")]
        ax.plot(s["step_to"], s["value"], lw=2.2, marker="o", ms=3, color="black", label="adapter lag 1")
        s = sub[(sub["scope"] == "adapter") & (sub["series"] == "cos_to_mean")]
        if len(s):  # absent for a run without raw shards
            ax.plot(s["step"], s["value"], lw=1.8, ls="--", color="crimson", label="adapter to mean")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(title=_title(run["run"], run["regime"], run["steps"]), xlabel="step", ylabel="cosine",
               ylim=(-1.05, 1.05))
        ax.legend(fontsize=6, ncol=2, loc="lower left")
    return _save(fig, path, result)


def erank_figure(result: AnalysisResult, path: Path) -> Path:
    """Trajectory erank per projection type (raw and unit rows), against T."""
    runs = _runs(result)
    fig, axes = new_figure(1, len(runs))
    for ax, run in zip(axes[0], runs, strict=True):
        sub = result.proj[result.proj["run"] == run["run"]].set_index("proj")
        names = sort_projections(list(sub.index))
        a = _adapter(result, run["run"])
        if not np.isfinite(a["erank_traj"]):
            usable = run["steps"] - a["zero_steps"] - a["nonfinite_steps"]
            why = ("needs raw shards" if a["source"] != RAW_SOURCE else
                   f"is undefined: {usable} of {run['steps']} steps have a non-zero, finite gradient")
            _no_data(ax, f"{run['run']}: trajectory erank {why}")
            continue
        x = np.arange(len(names) + 1)
        raw = [sub.loc[p, "erank_traj"] for p in names] + [a["erank_traj"]]
        unit = [sub.loc[p, "erank_traj_unit"] for p in names] + [a["erank_traj_unit"]]
        ax.bar(x - 0.2, raw, 0.4, label="raw", color="C0")
        ax.bar(x + 0.2, unit, 0.4, label="unit rows", color="C1")
        ax.axhline(run["steps"], color="black", ls=":", lw=1, label=f"T={run['steps']}")
        ax.set_xticks(x, [*names, "adapter"], fontsize=8)
        ax.set(title=_title(run["run"], run["regime"], run["steps"]), ylabel="trajectory erank",
               ylim=(0, run["steps"] * 1.25))
        ax.legend(fontsize=7, ncol=3, loc="upper center")
    return _save(fig, path, result)


def sign_hist_figure(result: AnalysisResult, path: Path) -> Path:
    """Sign-stability histogram of all entries against the random-sign null."""
    runs, hist = _runs(result), result.hist
    fig, axes = new_figure(1, len(runs))
    for ax, run in zip(axes[0], runs, strict=True):
        h = hist[(hist["run"] == run["run"]) & (hist["scope"] == "adapter")]
        width = float((h["bin_hi"] - h["bin_lo"]).iloc[0])
        ax.bar(h["bin_lo"], h["fraction"], width=width, align="edge", alpha=0.7, color="C0", label="entries")
        ax.step(np.r_[h["bin_lo"], h["bin_hi"].iloc[-1]], np.r_[h["null_prob"], h["null_prob"].iloc[-1]],
                where="post", color="black", lw=1.5, label="null (random signs)")
        a = _adapter(result, run["run"])
        ax.axvline(a["sign_stability_mean"], color="C0", ls="--", lw=1.2,
                   label=f"mean {a['sign_stability_mean']:.2f}")
        ax.axvline(a["sign_null_mean"], color="black", ls=":", lw=1.2, label=f"null mean {a['sign_null_mean']:.2f}")
        ax.set(title=_title(run["run"], run["regime"], run["steps"]), xlim=(0, 1), ylabel="share of entries",
               xlabel="sign stability |Σ_t sign| / n over non-zero steps")
        ax.legend(fontsize=7, loc="upper right")
    return _save(fig, path, result)


def _heatmap_panel(fig: Any, ax: Any, sub: Any, metric: str, scale: tuple[float, float, str], title: str) -> None:
    """One run's projection-by-layer grid of ``metric`` on the shared colour ``scale`` (vmin, vmax, cmap)."""
    vmin, vmax, cmap = scale
    names = sort_projections(list(sub["proj"].unique()))
    layers = sorted(int(x) for x in sub["layer"].unique())
    if not layers:
        _no_data(ax, "no modules with a layer index")
        return
    grid = np.full((len(names), len(layers)), np.nan)
    for _, m in sub.iterrows():
        grid[names.index(m["proj"]), layers.index(int(m["layer"]))] = m[metric]
    im = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_yticks(range(len(names)), names)
    ax.set_xticks(range(len(layers)), layers)
    if grid.size <= 120:
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                dark = cmap == "viridis" and v < (vmin + vmax) / 2
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.set(title=title, xlabel="layer")
    fig.colorbar(im, ax=ax, shrink=0.8)


def _color_scale(values: np.ndarray, metric: str) -> tuple[float, float, str]:
    finite = values[np.isfinite(values)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if metric.startswith("cos"):
        vmax = max(abs(vmin), abs(vmax), 1e-3)
        return -vmax, vmax, "RdBu_r"
    return vmin, vmax, "viridis"


def heatmap_figure(result: AnalysisResult, path: Path) -> Path:
    """Projection-by-layer heat maps of sign stability and lag-1 cosine (one row per metric, shared colour scale)."""
    runs = _runs(result)
    fig, axes = new_figure(len(HEATMAP_METRICS), len(runs), width=4.2, height=3.2)
    mods = result.modules[result.modules["layer"].notna()]
    for row_axes, metric in zip(axes, HEATMAP_METRICS, strict=True):
        scale = _color_scale(mods[metric].to_numpy(np.float64), metric)
        for ax, run in zip(row_axes, runs, strict=True):
            _heatmap_panel(fig, ax, mods[mods["run"] == run["run"]], metric, scale,
                           f"{run['run']} ({run['regime'].upper()}): {metric}")
    return _save(fig, path, result)


DRAW = dict(zip(FIGURES, (lag_cosine_figure, cosine_series_figure, erank_figure, sign_hist_figure, heatmap_figure),
                strict=True))


def make_figures(result: AnalysisResult, out_dir: Path) -> list[Path]:
    """Draw the five figures of :data:`FIGURES` into ``out_dir``; returns their paths."""
    return [draw(result, out_dir / name) for name, draw in DRAW.items()]
