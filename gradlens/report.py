"""``write_report``: one self-contained HTML page from recorded runs, analysis and compare directories.

The page is for a person without Python: what was run, the key statistics, the figures, the placement table and the
findings in words. It has no external resource (figures are base64 ``data:`` URIs, the CSS is inline, there is no
script), and every string that comes from a file is HTML-escaped, since module names and config values are
arbitrary text.

Inputs are recognised by their files: a run directory has ``manifest.json``; a ``gradlens compare`` output has
``placement.csv`` and ``provenance.json``; a ``gradlens analyze`` output has ``summary.csv`` and ``provenance.json``.
Run directories are analysed here, together (so an SFT and a GRPO run get the comparing finding), into a temporary
directory whose figures are embedded.
"""

from __future__ import annotations

import base64
import html
import json
import numbers
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from gradlens.analysis.analyze import PROVENANCE, analyze_runs
from gradlens.analysis.figures import FIGURES
from gradlens.compare.tables import PLACEMENT, format_ci, format_pct
from gradlens.config import AnalyzeConfig, ReportConfig
from gradlens.errors import GradlensError
from gradlens.fsio import atomic_write, check_unused_out
from gradlens.modules import sort_projections
from gradlens.provenance import package_versions
from gradlens.store import MANIFEST
from gradlens.store.runstate import adapter_line

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Whole-adapter and per-projection statistics shown, with their column headers.
KEY_COLUMNS: dict[str, str] = {
    "cos_lag1_mean": "lag-1 cosine",
    "cos_to_mean_mean": "cosine to mean",
    "erank_traj": "trajectory erank (raw)",
    "erank_traj_unit": "trajectory erank (unit rows)",
    "erank_step_mean": "per-step erank",
    "sign_stability_mean": "sign stability",
    "sign_null_mean": "sign stability, null",
    "sign_stable_frac_0.8": "share above 0.8",
    "sign_null_frac_0.8": "share above 0.8, null",
}
SUMMARY_LEAD = ["run", "regime", "steps"]
PROJ_LEAD = ["run", "proj", "modules", "entries", "steps"]
# Columns of compare's summary.csv and where.csv that the page shows.
PLACEMENT_COLUMNS = ["regime", "method", "budget", "n_seeds", "accuracy_mean", "ci95_lo", "ci95_hi",
                     "sampled_accuracy_mean", "gain_recovered", "k", "lr", "steps"]
WHERE_COLUMNS = ["regime", "method", "budget", "group", "key", "enrichment"]
CAPTIONS: dict[str, str] = dict(zip(FIGURES, (
    "Mean cosine between the gradient of step t and of step t+L against the lag L, per projection type and for the "
    "whole adapter (black). Near 0: gradients a few steps apart point in unrelated directions.",
    "Lag-1 cosine at every step (per projection type, and the whole adapter in black) and each step's cosine to the "
    "mean gradient (dashed).",
    "Effective rank of the trajectory of T gradients, raw and with unit rows, per projection type and for the whole "
    "adapter; the dotted line is T, the largest possible value (each step a new direction).",
    "Sign stability |sum of sign(g)| / n of every B entry, over its n steps with a non-zero gradient, against the "
    "null of as many independent random signs (black steps); dashed and dotted lines: the two means. Mass to the "
    "right of the null: entries whose gradient keeps one sign.",
    "Sign stability and lag-1 cosine of every module, by projection type (rows) and layer (columns).",
), strict=True))
STYLE = """
body { font-family: system-ui, sans-serif; max-width: 82rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 0.6rem 0 1.2rem; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: right; vertical-align: top; }
th { background: #f2f2f2; }
td:first-child, th:first-child, td.text { text-align: left; }
figure { margin: 1rem 0 2rem; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9rem; color: #444; max-width: 60rem; }
p.sub { margin-left: 2rem; }
details { margin: 0.5rem 0 1rem; }
code { font-size: 0.85rem; }
"""


@dataclass
class Analysis:
    """One analysis on the page: its tables, finding text (``None`` when the directory does not hold it),
    provenance, figures (PNG bytes by file name) and, for runs analysed here, bytes on disk per run label."""

    source: str
    summary: pd.DataFrame
    proj: pd.DataFrame
    findings: str | None
    provenance: dict[str, Any]
    figures: dict[str, bytes]
    disk_bytes: dict[str, int] = field(default_factory=dict)


@dataclass
class Comparison:
    """One ``gradlens compare`` output: summary over seeds, where the informed entries sit, finding, plot."""

    path: Path
    summary: pd.DataFrame
    where: pd.DataFrame
    findings: str
    provenance: dict[str, Any]
    plot: bytes


# --------------------------------------------------------------------------------------------------------------------
# Reading the inputs


def input_kind(path: str | os.PathLike[str]) -> str:
    """``run``, ``analysis`` or ``compare``, from the files in ``path``; anything else is an error naming it."""
    p = Path(path)
    if not p.is_dir():
        raise GradlensError(f"{p}: no such directory (expected a run, analysis or compare directory)")
    if (p / MANIFEST).is_file():
        return "run"
    if (p / PROVENANCE).is_file() and (p / PLACEMENT).is_file():
        return "compare"
    if (p / PROVENANCE).is_file() and (p / "summary.csv").is_file():
        return "analysis"
    raise GradlensError(f"{p}: not a run directory ({MANIFEST}), an analysis directory (summary.csv + "
                        f"{PROVENANCE}) or a compare directory ({PLACEMENT} + {PROVENANCE})")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise GradlensError(f"{path}: cannot read it as JSON ({e})".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise GradlensError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_csv(path: Path, required: Sequence[str], text_columns: Sequence[str] = ()) -> pd.DataFrame:
    """A CSV of an output directory (empty if absent) that must hold the ``required`` columns the page shows;
    ``text_columns`` stay strings (a label such as "1%" or a module name such as "nan")."""
    if not path.is_file():
        return pd.DataFrame()
    try:
        df = pd.read_csv(path, dtype={c: str for c in text_columns}, keep_default_na=False, na_values=[""])
    except (OSError, ValueError) as e:
        raise GradlensError(f"{path}: cannot read it as CSV ({e})".splitlines()[0]) from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise GradlensError(f"{path}: lacks the column(s) {', '.join(missing)}")
    return df


def _read_png(path: Path) -> bytes:
    """The bytes of a PNG, refusing anything else (it would show as a broken image)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise GradlensError(f"{path}: cannot read it ({e.strerror})") from None
    if not data.startswith(PNG_SIGNATURE):
        raise GradlensError(f"{path}: not a PNG image")
    return data


def _figures(directory: Path) -> dict[str, bytes]:
    return {name: _read_png(directory / name) for name in FIGURES if (directory / name).is_file()}


def _analysis_of_runs(paths: Sequence[Path], config: ReportConfig) -> Analysis:
    """Analyse run directories together in a temporary directory, keeping the tables, finding and figures."""
    from gradlens.analysis.runinfo import run_info

    with tempfile.TemporaryDirectory(prefix="gradlens-report-") as tmp:
        result = analyze_runs(paths, tmp, AnalyzeConfig(lags=config.lags, window=config.window, progress=False))
        figures = _figures(Path(tmp))
    labels = [r["label"] for r in result.provenance["runs"]]
    return Analysis(source="run directories, analysed for this report: " + ", ".join(map(str, paths)),
                    summary=result.summary, proj=result.proj, findings=result.findings,
                    provenance=result.provenance, figures=figures,
                    disk_bytes={label: run_info(p)["bytes"] for label, p in zip(labels, paths, strict=True)})


def _analysis_of_dir(path: Path) -> Analysis:
    prov = _read_json(path / PROVENANCE)
    return Analysis(source=f"analysis directory {path}",
                    summary=_read_csv(path / "summary.csv", [*SUMMARY_LEAD, "modules", "entries"], ["run"]),
                    proj=_read_csv(path / "proj.csv", PROJ_LEAD, ["run", "proj"]), findings=prov.get("findings"),
                    provenance=prov, figures=_figures(path))


def _comparison_of_dir(path: Path) -> Comparison:
    prov = _read_json(path / PROVENANCE)
    return Comparison(path=path, summary=_read_csv(path / "summary.csv", PLACEMENT_COLUMNS, ["budget"]),
                      where=_read_csv(path / "where.csv", WHERE_COLUMNS, ["budget", "key"]),
                      findings=str(prov.get("findings", "")), provenance=prov,
                      plot=_read_png(path / "placement.png"))


def collect(kinds: Sequence[tuple[Path, str]], config: ReportConfig) -> tuple[list[Analysis], list[Comparison]]:
    """Read every ``(path, kind)`` input; all run directories are analysed together, and come first."""
    runs = [p for p, kind in kinds if kind == "run"]
    analyses = [_analysis_of_runs(runs, config)] if runs else []
    analyses += [_analysis_of_dir(p) for p, kind in kinds if kind == "analysis"]
    return analyses, [_comparison_of_dir(p) for p, kind in kinds if kind == "compare"]


# --------------------------------------------------------------------------------------------------------------------
# HTML


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: Any) -> str:
    """A cell's text: numbers to 3 decimals, missing as a dash, lists and mappings as JSON."""
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, default=str)
    if v is None or (not isinstance(v, str) and pd.isna(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, numbers.Integral):
        return str(int(v))
    if isinstance(v, numbers.Real):
        return f"{float(v):.3f}"
    return str(v)


def _td(v: Any) -> str:
    """One escaped cell; text is left-aligned, numbers right-aligned."""
    return f'<td class="text">{_esc(v)}</td>' if isinstance(v, str) else f"<td>{_esc(_fmt(v))}</td>"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An HTML table of escaped cells."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_td(v) for v in row) + "</tr>\n" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>\n"


def _kv(mapping: Mapping[str, Any] | None) -> str:
    if not mapping:
        return "<p>(none recorded)</p>\n"
    return _table(["setting", "value"], [[str(k), _fmt(v)] for k, v in mapping.items()])


def _paragraphs(text: str) -> str:
    """Finding text as paragraphs, one per line; indented lines (a detail of the line above) are indented."""
    return "".join(f'<p class="sub">{_esc(line.strip())}</p>\n' if line.startswith(" ") else f"<p>{_esc(line)}</p>\n"
                   for line in text.splitlines() if line.strip())


def _img(data: bytes, alt: str) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}" alt="{_esc(alt)}">'


def _stat_table(df: pd.DataFrame, lead: Sequence[str], suffix: str = "") -> str:
    """The key statistics of ``df`` (columns suffixed ``suffix`` for a window), after the ``lead`` columns."""
    cols = [c for c in KEY_COLUMNS if f"{c}{suffix}" in df.columns]
    headers = [*lead, *(KEY_COLUMNS[c] for c in cols)]
    return _table(headers, [[row[c] for c in lead] + [row[f"{c}{suffix}"] for c in cols]
                            for row in df.to_dict("records")])


def _runs_table(a: Analysis) -> str:
    """What was run: one row per run, from the analysis provenance and the whole-adapter table."""
    summary = a.summary.set_index("run") if len(a.summary) else a.summary
    projs = ({run: ", ".join(sort_projections(list(g["proj"]))) for run, g in a.proj.groupby("run")}
             if len(a.proj) else {})
    rows = []
    for r in a.provenance.get("runs", []):
        label = str(r.get("label"))
        s = summary.loc[label] if label in summary.index else pd.Series(dtype=object)
        size = a.disk_bytes.get(label)
        zero = r.get("zero_gradient_steps")
        model = (r.get("record_config") or {}).get("model") or (r.get("recording") or {}).get("model") or "–"
        state = (r.get("run_state") or {}).get("description") or r.get("complete")
        rows.append([label, str(r.get("regime")), str(model),
                     r.get("steps_used"), r.get("seed"), f"{_fmt(s.get('modules'))} ({projs.get(label, '')})",
                     s.get("entries"), None if size is None else f"{size / 2**20:.1f} MiB", str(r.get("dtype")),
                     state, None if zero is None else len(zero), str(r.get("source", "–")),
                     str(r.get("path"))])
    return _table(["run", "regime", "model", "steps", "seed", "modules (projections)", "B entries", "on disk",
                   "dtype", "state", "zero-gradient steps", "statistics from", "path"], rows)


def _analysis_section(a: Analysis) -> str:
    prov = a.provenance
    window = (prov.get("config") or {}).get("window")
    parts = [f"<section>\n<h2>Analysis: {_esc(a.source)}</h2>\n<h3>What was run</h3>\n", _runs_table(a)]
    for r in prov.get("runs", []):
        recording = dict(r.get("recording") or {})
        training_args = recording.pop("training_args", None)
        adapter = recording.get("adapter")
        if isinstance(adapter, dict):
            recording["adapter"] = adapter_line(adapter)
        if r.get("record_config"):  # gradlens record's own config says it all; else the recorder's manifest fields
            recording = {"task": recording.get("task"), "adapter": recording.get("adapter"), **r["record_config"]}
        args = f"<h4>Training arguments</h4>\n{_kv(training_args)}" if training_args else ""
        parts.append(f"<details><summary>Run {_esc(r.get('label'))}: recording config and package versions"
                     f"</summary>\n<h4>Recording config</h4>\n{_kv(recording)}{args}"
                     f"<h4>Package versions</h4>\n{_kv(r.get('versions'))}</details>\n")
    parts.append(f"<details><summary>Analysis config and package versions ({_esc(prov.get('tool', ''))}, "
                 f"{_esc(prov.get('created', ''))})</summary>\n{_kv(prov.get('config'))}"
                 f"<h4>Package versions</h4>\n{_kv(prov.get('versions'))}</details>\n")
    parts.append("<h3>Whole adapter</h3>\n<p>Per run over all T recorded steps. Each sign-stability value stands "
                 "next to its null (independent random signs), so it reads against chance; an entry's sign "
                 "stability counts only its steps with a non-zero gradient, and its null is that of as many random "
                 "signs. A run recorded without raw shards shows – for the statistics that need them.</p>\n")
    parts.append(_stat_table(a.summary, SUMMARY_LEAD))
    if window and f"cos_lag1_mean_w{window}" in a.summary.columns:
        parts.append(f"<h4>First {_esc(window)} steps</h4>\n")
        parts.append(_stat_table(a.summary, ["run", "regime"], f"_w{window}"))
    if len(a.proj):
        parts.append("<h3>Per projection type</h3>\n")
        parts.append(_stat_table(a.proj, PROJ_LEAD))
    if a.figures:
        parts.append("<h3>Figures</h3>\n")
    for name, data in a.figures.items():
        parts.append(f"<figure>{_img(data, name)}<figcaption>{_esc(name)}: {_esc(CAPTIONS[name])}</figcaption>"
                     "</figure>\n")
    return "".join(parts) + "</section>\n"


def _where_table(where: pd.DataFrame) -> str:
    """Mean enrichment (share of selected entries / share of all entries) per projection type, over seeds."""
    proj = where[where["group"] == "proj"]
    if proj.empty:
        return "<p>(no informed masks)</p>\n"
    keys = sort_projections(list(dict.fromkeys(proj["key"])))
    proj = proj.assign(regime=_regime_labels(proj))
    mean = proj.groupby(["regime", "method", "budget", "key"], sort=False)["enrichment"].mean()
    rows = []
    for (regime, method, budget), g in mean.groupby(level=[0, 1, 2], sort=False):
        by_key = g.droplevel([0, 1, 2])
        rows.append([str(regime), str(method), str(budget), *(by_key.get(k) for k in keys)])
    return _table(["regime", "method", "budget", *keys], rows)


def _regime_labels(df: pd.DataFrame) -> pd.Series:
    """The regime, with the space named where it is not the default lora_b (a compare over both spaces)."""
    if "space" not in df:
        return df["regime"].astype(str)
    return pd.Series([str(r) if str(sp) in ("lora_b", "nan") else f"{r} [space {sp}]"
                      for r, sp in zip(df["regime"], df["space"], strict=True)], index=df.index)


def _comparison_section(c: Comparison) -> str:
    s = c.summary.assign(regime=_regime_labels(c.summary))
    rows = [[str(r["regime"]), str(r["method"]), r["budget"], r["n_seeds"],
             format_ci(r), r["sampled_accuracy_mean"], format_pct(r["gain_recovered"]),
             None if pd.isna(r["k"]) else int(r["k"]), f"{r['lr']:g}", r["steps"]]
            for _, r in s.iterrows()]
    config = c.provenance.get("config")
    return "".join([
        f"<section>\n<h2>Placement: {_esc(c.path)}</h2>\n",
        "<p>Held-out greedy accuracy, mean over seeds with its 95% t-interval; the share of the gain of full-B "
        "LoRA over the base model that each sparse-B placement recovers; k trained B entries.</p>\n",
        _table(["regime", "method", "budget", "seeds", "accuracy [95% CI]", "sampled accuracy",
                "share of full-LoRA gain", "k", "learning rate", "steps"], rows),
        f"<figure>{_img(c.plot, 'placement.png')}<figcaption>placement.png: accuracy per method and budget (mean and "
        "95% interval over seeds); dashed: base model, solid band: full-B LoRA.</figcaption></figure>\n",
        "<h3>Where the informed entries sit</h3>\n<p>Enrichment per projection type: the share of selected entries "
        "in that projection over its share of all B entries (above 1: favoured beyond its size), mean over "
        "seeds.</p>\n",
        _where_table(c.where) if len(c.where) else "<p>(no where.csv)</p>\n",
        f"<details><summary>Compare config and package versions</summary>\n{_kv(config)}"
        f"<h4>Package versions</h4>\n{_kv(c.provenance.get('versions'))}</details>\n</section>\n",
    ])


def render(analyses: Sequence[Analysis], comparisons: Sequence[Comparison], title: str,
           inputs: Sequence[tuple[Path, str]]) -> str:
    """The whole page: inputs, findings, then one section per analysis and per comparison."""
    findings = []
    for a in analyses:
        text = (_paragraphs(a.findings) if a.findings else
                "<p>This analysis directory (from an older gradlens) does not hold its finding text; give the run "
                "directories to get it.</p>\n")
        findings.append(f"<h3>{_esc(a.source)}</h3>\n{text}")
    findings += [f"<h3>Placement: {_esc(c.path)}</h3>\n{_paragraphs(c.findings)}" for c in comparisons]
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return "".join([
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n',
        f"<title>{_esc(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{_esc(title)}</h1>\n",
        f"<p>Written {_esc(created)} by gradlens {_esc(package_versions()['gradlens'])} from:</p>\n",
        _table(["path", "kind"], [[str(p), kind] for p, kind in inputs]),
        "<h2>Findings</h2>\n", *findings,
        *(_analysis_section(a) for a in analyses), *(_comparison_section(c) for c in comparisons),
        "</body>\n</html>\n",
    ])


def write_report(paths: Sequence[str | os.PathLike[str]], config: ReportConfig) -> Path:
    """Read the inputs, render the page and write it atomically to ``config.out``; returns that path."""
    if not paths:
        raise GradlensError("no paths given (run, analysis or compare directories)")
    kinds = [(Path(p), input_kind(p)) for p in paths]  # every path checked before the long analysis
    check_unused_out(config.out, config.overwrite)
    analyses, comparisons = collect(kinds, config)
    page = render(analyses, comparisons, config.title, kinds)
    out = Path(config.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    except OSError as e:
        raise GradlensError(f"{out}: cannot write the report ({e.strerror})") from None
    return out
