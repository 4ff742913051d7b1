"""``analyze_runs``: the statistics of :mod:`gradlens.analysis.driver` for several runs, as tables, figures and a
finding.

The library entry point behind ``gradlens analyze`` (notebooks call it directly)::

    from gradlens.analysis.analyze import analyze_runs
    from gradlens.config import AnalyzeConfig

    res = analyze_runs(["runs/sft", "runs/grpo"], "runs/analysis", AnalyzeConfig(window=16))
    res.summary[["run", "regime", "cos_lag1_mean", "erank_traj_unit", "sign_stability_mean", "sign_null_mean"]]

Tables (one row per run and module / run / projection type / layer) use the same statistic columns; see
:func:`gradlens.analysis.run_stats.stat_columns`. With ``window=W`` every statistic is repeated over the first W
usable steps, in columns suffixed ``_wW``. Every table also counts each run's non-finite (excluded) and exactly zero
steps; ``summary`` lists them (``excluded_steps``, ``zero_step_list``) and says where the statistics come from
(``source``, ``note``): a run recorded without raw shards is analysed from its accumulators, and the columns that
need the raw gradients are NaN. Runs recorded on different module sets get a note in the finding and in the provenance.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradlens.analysis.accumulated import RAW_ONLY
from gradlens.analysis.driver import analyze_run
from gradlens.analysis.result import AnalysisResult
from gradlens.analysis.run_stats import RAW_SOURCE, RunStats, ScopeStats, stat_columns
from gradlens.config import AnalyzeConfig
from gradlens.errors import GradlensError
from gradlens.fsio import check_unused_out
from gradlens.provenance import package_versions
from gradlens.stats.core import histogram_edges
from gradlens.store.runstate import announce

TABLES = ("summary", "modules", "proj", "layers", "series", "hist")
CSV_TABLES = ("summary", "modules", "proj", "layers")
PROVENANCE = "provenance.json"
PARQUET_KEY = b"gradlens_provenance"


def _labels(paths: Sequence[Path]) -> list[str]:
    names = [p.resolve().name or str(p) for p in paths]
    return [name if names.count(name) == 1 else str(p) for name, p in zip(names, paths, strict=True)]


def _stat_values(stats: ScopeStats, lags: int, window: int | None) -> dict[str, Any]:
    cols = stat_columns(lags)
    out = {c: stats.row[c] for c in cols}
    if window is not None:
        out.update({f"{c}_w{window}": stats.window_row[c] for c in cols})
    return out


def _table_rows(rs: RunStats, label: str, lags: int, window: int | None) -> dict[str, list[dict[str, Any]]]:
    """The rows of one run in the summary, modules, proj, layers and hist tables."""
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in TABLES if name != "series"}
    base = {"run": label, "regime": rs.regime}
    counts = {"nonfinite_steps": len(rs.excluded), "zero_steps": len(rs.zero_steps)}
    spec_of = {s.name: s for s in rs.specs}
    for sc in rs.scopes:
        entries = sum(spec_of[m].size for m in sc.modules)
        stats = _stat_values(sc, lags, window)
        if sc.scope == "module":
            spec = spec_of[sc.name]
            rows["modules"].append({**base, "module": sc.name, "proj": spec.proj, "layer": spec.layer,
                                    "d_out": spec.shape[0], "r": spec.shape[1], "entries": entries, **counts,
                                    **stats})
        elif sc.scope in ("proj", "layer"):
            key = "layers" if sc.scope == "layer" else "proj"
            name: Any = int(sc.name) if sc.scope == "layer" else sc.name
            rows[key].append({**base, sc.scope: name, "modules": len(sc.modules), "entries": entries, **counts,
                              **stats})
        else:
            rows["summary"].append({**base, "seed": rs.seed, "path": str(rs.path), "modules": len(sc.modules),
                                    "entries": entries, **counts, "excluded_steps": json.dumps(rs.excluded),
                                    "zero_step_list": json.dumps(rs.zero_steps), "skipped_shards": len(rs.skipped),
                                    "source": rs.source, "note": source_note(rs), **stats})
        rows["hist"] += _hist_rows(rs, sc, base)
    return rows


def _hist_rows(rs: RunStats, sc: ScopeStats, base: dict[str, Any]) -> list[dict[str, Any]]:
    edges = histogram_edges(rs.bins)
    total = max(int(sc.hist.sum()), 1)
    return [{**base, "scope": sc.scope, "name": sc.name, "steps": len(rs.steps), "bin_lo": edges[b],
             "bin_hi": edges[b + 1], "count": int(sc.hist[b]), "fraction": sc.hist[b] / total,
             "null_prob": float(sc.null_hist[b])} for b in range(rs.bins)]


def _series_parts(rs: RunStats, label: str) -> list[dict[str, Any]]:
    steps = np.asarray(rs.steps, np.int64)
    parts = []
    for sc in rs.scopes:
        for kind, values in sc.series.items():
            offset = int(kind[len("cos_lag"):]) if kind.startswith("cos_lag") else 0
            n = len(values)
            parts.append({"run": label, "regime": rs.regime, "scope": sc.scope, "name": sc.name, "series": kind,
                          "n": n, "t": np.arange(n, dtype=np.int32), "step": steps[:n],
                          "step_to": steps[offset:offset + n], "value": np.asarray(values, np.float64)})
    return parts


def build_tables(runs: Sequence[RunStats], labels: Sequence[str], lags: int, window: int | None
                 ) -> dict[str, pd.DataFrame]:
    """The six DataFrames from per-run statistics (``window``: the configured window, for column names)."""
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in TABLES if name != "series"}
    series: list[dict[str, Any]] = []
    for rs, label in zip(runs, labels, strict=True):
        for name, part in _table_rows(rs, label, lags, window).items():
            rows[name] += part
        series += _series_parts(rs, label)
    tables = {name: pd.DataFrame(r) for name, r in rows.items()}
    tables["series"] = _series_frame(series)
    if not tables["layers"].empty:
        tables["layers"]["layer"] = tables["layers"]["layer"].astype("int64")
    if not tables["modules"].empty:
        tables["modules"]["layer"] = tables["modules"]["layer"].astype("Int64")
    return tables


def _series_frame(parts: list[dict[str, Any]]) -> pd.DataFrame:
    """The long series table, built column-wise with categorical labels (it has modules x series x T rows)."""
    lengths = np.array([p["n"] for p in parts], np.int64)
    cols: dict[str, Any] = {}
    for key in ("run", "regime", "scope", "name", "series"):
        labels = [p[key] for p in parts]
        cats = {label: i for i, label in enumerate(dict.fromkeys(labels))}
        codes = np.repeat(np.array([cats[label] for label in labels], np.int32), lengths)
        cols[key] = pd.Categorical.from_codes(codes, categories=list(cats))
    for key, dtype in (("t", np.int32), ("step", np.int64), ("step_to", np.int64), ("value", np.float64)):
        cols[key] = np.concatenate([p[key] for p in parts]).astype(dtype) if parts else np.zeros(0, dtype)
    return pd.DataFrame(cols)


def _fmt(x: float, digits: int = 2) -> str:
    return "nan" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def source_note(rs: RunStats) -> str:
    """Where a run's statistics come from and, for a run without raw shards, why some of its columns are NaN."""
    if rs.source == RAW_SOURCE:
        return "every statistic from the raw shards"
    window = " (over the window, also sign stability)" if rs.window is not None else ""
    return (f"accumulators only (save_raw=False): {RAW_ONLY}{window} need raw shards and are NaN; sign stability, "
            "norms and the lag-1 cosine come from the accumulated sums")


def _zero_note(rs: RunStats) -> str:
    if not rs.zero_steps:
        return ""
    why = " (every GRPO group had equal rewards)" if rs.regime == "grpo" else ""
    return (f"; {len(rs.zero_steps)} of {len(rs.steps)} step(s) had an exactly zero gradient{why}, so cosines "
            f"and sign stability use the {len(rs.steps) - len(rs.zero_steps)} others: "
            f"{' '.join(map(str, rs.zero_steps[:10]))}")


def _run_line(rs: RunStats, label: str) -> str:
    a = rs.adapter.row
    T = len(rs.steps)
    r = max(min(s.shape) for s in rs.specs)  # a step's rank bound: r for B (d_out x r), min(d_out, d_in) for W
    line = f"{label} ({rs.regime}, T={T}): lag-1 cosine {_fmt(a['cos_lag1_mean'])}"
    if rs.source == RAW_SOURCE:
        line += (f", cosine to mean {_fmt(a['cos_to_mean_mean'])}; trajectory erank {_fmt(a['erank_traj'], 1)} "
                 f"(unit rows {_fmt(a['erank_traj_unit'], 1)}) of T={T}; per-step erank "
                 f"{_fmt(a['erank_step_mean'], 1)} of at most {r}")
    line += (f"; sign stability {_fmt(a['sign_stability_mean'])} (null {_fmt(a['sign_null_mean'])}), "
             f"{_fmt(100 * a['sign_stable_frac_0.8'], 1)}% of entries above 0.8 "
             f"(null {_fmt(100 * a['sign_null_frac_0.8'], 1)}%)")
    line += _zero_note(rs)
    if rs.excluded:
        line += f"; {len(rs.excluded)} non-finite step(s) excluded: {' '.join(map(str, rs.excluded[:10]))}"
    if rs.source != RAW_SOURCE:
        line += f"; {source_note(rs)}"
    return line


def _window_line(rs: RunStats) -> str:
    w = rs.adapter.window_row
    line = f"  first {rs.window} steps: lag-1 cosine {_fmt(w['cos_lag1_mean'])}"
    if rs.source == RAW_SOURCE:
        line += (f", trajectory erank (unit rows) {_fmt(w['erank_traj_unit'], 1)} of {rs.window}, sign stability "
                 f"{_fmt(w['sign_stability_mean'])} (null {_fmt(w['sign_null_mean'])})")
    return line


def _comparison_line(sft: RunStats, grpo: RunStats) -> str:
    s, g = sft.adapter.row, grpo.adapter.row
    ts, tg = len(sft.steps), len(grpo.steps)
    t = f"T={tg}" if ts == tg else f"T={tg}/{ts}"
    null_g, null_s = _fmt(g["sign_null_mean"]), _fmt(s["sign_null_mean"])
    null = null_s if null_g == null_s else f"{null_g}/{null_s}"  # each over its own entries' non-zero steps
    return (f"Finding: GRPO lag-1 cosine {_fmt(g['cos_lag1_mean'])} vs SFT {_fmt(s['cos_lag1_mean'])}; "
            f"trajectory erank (unit rows) {_fmt(g['erank_traj_unit'], 1)} vs {_fmt(s['erank_traj_unit'], 1)} of "
            f"{t}; sign stability {_fmt(g['sign_stability_mean'])} vs {_fmt(s['sign_stability_mean'])} "
            f"(null {null}).")


def module_set_note(runs: Sequence[RunStats], labels: Sequence[str]) -> str | None:
    """A note when the runs were recorded on different modules (names or shapes), else None."""
    sets = [{(s.name, tuple(s.shape)) for s in rs.specs} for rs in runs]
    if all(x == sets[0] for x in sets):
        return None
    common = set.intersection(*sets)
    odd = sorted({f"{name} {d}x{r}" for x in sets for name, (d, r) in x - common})
    per_run = ", ".join(f"{label} {len(x)} ({len(x - common)} not in every run)"
                        for x, label in zip(sets, labels, strict=True))
    more = f" and {len(odd) - 3} more" if len(odd) > 3 else ""
    return (f"Note: the runs were recorded on different module sets, so their statistics cover different modules: "
            f"modules per run {per_run}; {len(common)} in common; not in every run: {', '.join(odd[:3])}{more}")


def findings(runs: Sequence[RunStats], labels: Sequence[str], skipped_runs: Sequence[tuple[str, str]] = ()) -> str:
    """A few lines that read as a finding: per run, then GRPO against SFT when both are present; then what
    ``skip_bad`` left out, so a partial analysis never reads as a whole one."""
    lines = []
    for rs, label in zip(runs, labels, strict=True):
        lines.append(_run_line(rs, label))
        if rs.window is not None:
            lines.append(_window_line(rs))
    note = module_set_note(runs, labels)
    if note:
        lines.append(note)
    by_regime: dict[str, RunStats] = {}
    for rs in sorted(runs, key=lambda rs: rs.source != RAW_SOURCE):  # the first of each regime, raw shards first
        by_regime.setdefault(rs.regime, rs)
    if "sft" in by_regime and "grpo" in by_regime:
        lines.append(_comparison_line(by_regime["sft"], by_regime["grpo"]))
    lines += [f"Skipped ({label}): {why}" for rs, label in zip(runs, labels, strict=True) for _, why in rs.skipped]
    lines += [f"Skipped run: {why}" for _, why in skipped_runs]
    return "\n".join(lines)


def provenance(runs: Sequence[RunStats], labels: Sequence[str], config: AnalyzeConfig,
               skipped_runs: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """What produced the outputs: the config, package versions, each source run's path, seed and steps, and notes
    (runs compared on different module sets)."""
    note = module_set_note(runs, labels)
    return {
        "tool": "gradlens analyze",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": asdict(config),
        "argv": list(sys.argv),
        "versions": package_versions(),
        "runs": [{
            "label": label, "path": str(rs.path.resolve()), "regime": rs.regime, "seed": rs.seed,
            "steps_used": len(rs.steps), "first_step": rs.steps[0], "last_step": rs.steps[-1],
            "nonfinite_steps_excluded": rs.excluded, "zero_gradient_steps": rs.zero_steps, "window": rs.window,
            "modules": len(rs.specs), "source": rs.source, "needs_raw_shards": rs.unavailable,
            "window_needs_raw_shards": rs.window_unavailable, "note": source_note(rs),
            "created": rs.meta.get("created"), "complete": rs.meta.get("complete"), "dtype": rs.meta.get("dtype"),
            "record_config": (rs.meta.get("config") or {}).get("record"), "versions": rs.meta.get("versions"),
            "skipped_shards": [{"file": file, "reason": why} for file, why in rs.skipped],
        } for rs, label in zip(runs, labels, strict=True)],
        "notes": [note] if note else [],
        "skipped_runs": [{"path": path, "reason": why} for path, why in skipped_runs],
    }


def recording(meta: dict[str, Any]) -> dict[str, Any]:
    """How a run was recorded, from its manifest: ``gradlens record``'s config, or for a run recorded from a user's
    own script the recorder's settings, the model, the data and the training arguments."""
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    keys = ("model", "dataset", "task", "trainer_class", "recorder", "adapter", "training_args")
    return {key: config[key] for key in keys if config.get(key) is not None}


def _write_parquet(df: pd.DataFrame, path: Path, prov: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[PARQUET_KEY] = json.dumps(prov).encode()
    pq.write_table(table.replace_schema_metadata(meta), path)


def write_outputs(result: AnalysisResult, out_dir: Path, config: AnalyzeConfig) -> list[Path]:
    """Write the CSV and parquet tables, ``provenance.json`` and (unless disabled) the figures into ``out_dir``."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GradlensError(f"{out_dir}: cannot create the output directory ({e.strerror})") from None
    files = []
    prov = result.provenance
    for name in TABLES:
        df = getattr(result, name)
        if name in CSV_TABLES:
            df.to_csv(out_dir / f"{name}.csv", index=False)
            files.append(out_dir / f"{name}.csv")
        _write_parquet(df, out_dir / f"{name}.parquet", prov)
        files.append(out_dir / f"{name}.parquet")
    if config.figures:
        from gradlens.analysis.figures import make_figures

        files += make_figures(result, out_dir)
    prov["findings"] = result.findings
    prov["files"] = [p.name for p in [*files, out_dir / PROVENANCE]]
    (out_dir / PROVENANCE).write_text(json.dumps(prov, indent=1, default=str) + "\n")
    files.append(out_dir / PROVENANCE)
    return files


def analyze_runs(paths: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str] | None = None,
                 config: AnalyzeConfig | None = None) -> AnalysisResult:
    """Analyse each run (one streaming pass per run), build the tables and the finding, and write them if asked.

    ``out_dir`` (default ``config.out``; empty: write nothing) receives ``summary/modules/proj/layers.csv``, all six
    tables as parquet, the PNG figures and ``provenance.json``. With ``config.skip_bad`` a bad shard drops only its
    steps and a run that cannot be analysed at all is left out; both are listed in the finding and the provenance.
    """
    from gradlens.store import open_run

    config = config or AnalyzeConfig()
    paths = [Path(p) for p in paths]
    if not paths:
        raise GradlensError("no run directories given")
    target = out_dir if out_dir is not None else config.out
    if target:
        check_unused_out(target, config.overwrite)
    if not config.skip_bad:
        for p in paths:  # fail fast on a bad path before the long passes
            open_run(p)
    runs, kept, skipped_runs = [], [], []
    for p in paths:
        try:
            runs.append(analyze_run(p, lags=config.lags, window=config.window, bins=config.bins,
                                    memory_mb=config.memory_mb, unclip=config.unclip, progress=config.progress,
                                    skip_bad=config.skip_bad))
            kept.append(p)
        except GradlensError as e:
            if not config.skip_bad:
                raise
            skipped_runs.append((str(p), str(e)))
    if not runs:
        raise GradlensError(f"no run could be analysed: {'; '.join(why for _, why in skipped_runs)}")
    labels = _labels(kept)
    tables = build_tables(runs, labels, config.lags, config.window)
    states = [announce({**rs.meta, "steps": [{"step": s} for s in rs.steps]}, label)
              for rs, label in zip(runs, labels, strict=True)]
    notes = [note for state in states for note in state["notes"]]
    result = AnalysisResult(**tables, runs=runs, findings="\n".join([findings(runs, labels, skipped_runs), *notes]),
                            provenance=provenance(runs, labels, config, skipped_runs), skipped_runs=skipped_runs)
    for run, rs, state in zip(result.provenance["runs"], runs, states, strict=True):
        run.update(state, recording=recording(rs.meta))
    result.provenance["notes"] += notes
    if target:
        result.files = write_outputs(result, Path(target), config)
    return result
