"""Tests for ``gradlens report``: one self-contained, escaped HTML page from runs, an analysis and a comparison.

The runs are written by ``RunWriter`` with synthetic gradients (one labelled SFT, one GRPO, through the manifest's
recording config), one module named like a script tag; the comparison directory is written by compare's own
``write_results`` from hand-made placement rows, so its files are the real format.
"""

from __future__ import annotations

import base64
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gradlens.analysis.analyze import analyze_runs
from gradlens.cli.main import main
from gradlens.compare.protocol import write_results
from gradlens.compare.tables import where_rows
from gradlens.config import AnalyzeConfig, CompareConfig, ReportConfig
from gradlens.errors import GradlensError
from gradlens.report import PNG_SIGNATURE, input_kind, write_report
from gradlens.store import ModuleSpec, RunWriter
from tests.helpers.stats import random_grads, reference_row, stacked

EVIL = "<script>alert(1)</script>"
SPECS = [ModuleSpec.from_name(n, s) for n, s in [
    ("model.layers.0.self_attn.v_proj", (6, 4)), ("model.layers.0.mlp.down_proj", (5, 4)),
    (f"model.layers.1.self_attn.{EVIL}", (4, 4))]]
T = 8
VOID = {"meta", "img", "br", "hr", "input", "link"}


class Page(HTMLParser):
    """Checks that tags nest and close, and collects images, attributes, tables (rows of cell texts) and text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.images: list[dict[str, str | None]] = []
        self.attrs: list[tuple[str, str | None]] = []
        self.tables: list[list[list[str]]] = []
        self.text: list[str] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.attrs += attrs
        if tag == "img":
            self.images.append(dict(attrs))
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = []
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self.cell))
            self.cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self.cell is not None:
            self.cell.append(data)


def parse(page: str) -> Page:
    parser = Page()
    parser.feed(page)
    parser.close()
    assert not parser.errors and not parser.stack, (parser.errors, parser.stack)
    return parser


def write_run(path: Path, regime: str, seed: int) -> Path:
    config = {"record": {"regime": regime, "model": "toy:tiny", "max_steps": T, "note": "<b>bold</b>"}}
    with RunWriter(path, SPECS, config=config, seed=seed, steps_per_shard=3) as w:
        for step, g in enumerate(random_grads(T, SPECS, seed=seed)):
            w.add_step(step + 1, g, {"loss": 0.0, "clip_coef": 1.0})
    return path


def write_compare(out: Path) -> Path:
    """A comparison directory (placement.csv, summary.csv, where.csv, placement.png, provenance.json)."""
    rng = np.random.default_rng(0)
    rows = []
    for regime, base in (("sft", 0.3), ("grpo", 0.4)):
        rows.append({"regime": regime, "method": "base", "budget": "", "seed": 0, "lr": 0.0, "steps": 0, "k": None,
                     "accuracy": base, "sampled_accuracy": base})
        for method, budget, gain in (("full", "", 0.3), ("random", "1%", 0.1), ("sign", "1%", 0.25)):
            for seed in range(3):
                acc = base + gain + 0.02 * rng.standard_normal()
                rows.append({"regime": regime, "method": method, "budget": budget, "seed": seed, "lr": 3e-2,
                             "steps": 10, "k": None if method == "full" else 3, "accuracy": acc,
                             "sampled_accuracy": acc - 0.05})
    mask = {s.name: np.zeros(s.shape, bool) for s in SPECS}
    mask[SPECS[2].name][0, :3] = True
    where = [where_rows(mask, regime, "sign", "1%", seed) for regime in ("sft", "grpo") for seed in range(3)]
    write_results(CompareConfig(out=str(out), progress=False), out, pd.DataFrame(rows), pd.DataFrame(), where, [], [],
                  0.0)
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report_inputs")
    paths = {"sft": write_run(root / "sft", "sft", 0), "grpo": write_run(root / "grpo", "grpo", 1)}
    analyze_runs([paths["sft"], paths["grpo"]], root / "analysis", AnalyzeConfig(progress=False, window=4))
    (root / "compare").mkdir()
    return {**paths, "analysis": root / "analysis", "compare": write_compare(root / "compare")}


def test_input_kinds(inputs, tmp_path):
    assert [input_kind(inputs[k]) for k in ("sft", "analysis", "compare")] == ["run", "analysis", "compare"]
    (tmp_path / "summary.csv").write_text("run\nx\n")  # no provenance.json: not an analysis directory
    for bad in (tmp_path, tmp_path / "missing", tmp_path / "summary.csv"):
        with pytest.raises(GradlensError, match=str(bad)) as err:
            input_kind(bad)
        assert "\n" not in str(err.value)


def test_report_is_self_contained_escaped_and_matches_the_statistics(inputs, tmp_path):
    out = tmp_path / "sub" / "report.html"
    config = ReportConfig(out=str(out), title="Report <i>x</i>", window=4)
    paths = [inputs["sft"], inputs["grpo"], inputs["analysis"], inputs["compare"]]
    assert write_report(paths, config) == out
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # the temp file was renamed
    page = out.read_text(encoding="utf-8")
    doc = parse(page)

    # Self-contained: 5 figures from the runs, 5 from the analysis directory, the placement plot; all embedded PNGs.
    assert len(doc.images) == 11
    for img in doc.images:
        src = img["src"]
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1], validate=True).startswith(PNG_SIGNATURE)
    assert all(name not in ("href", "src") or value.startswith("data:") for name, value in doc.attrs)
    assert "<link" not in page and "http://" not in page and "https://" not in page

    # Escaped: the module name, a config value and the title show as text, never as markup.
    assert "<script" not in page.lower() and "<i>" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    text = "".join(doc.text)
    assert EVIL in text and "Report <i>x</i>" in text

    # The whole-adapter table of the runs analysed for the report equals numpy on the raw gradients.
    summary = next(t for t in doc.tables if t[0][:3] == ["run", "regime", "steps"])
    head = summary[0]
    for label, seed in (("sft", 0), ("grpo", 1)):
        grads = random_grads(T, SPECS, seed=seed)
        ref = reference_row([stacked(grads, i) for i in range(len(SPECS))], lags=10)
        row = next(r for r in summary[1:] if r[0] == label)
        assert row[1] == label and row[2] == str(T)
        for column, header in (("cos_lag1_mean", "lag-1 cosine"), ("erank_traj_unit", "trajectory erank (unit rows)"),
                               ("sign_stability_mean", "sign stability"), ("sign_null_frac_0.8",
                                                                           "share above 0.8, null")):
            assert row[head.index(header)] == f"{ref[column]:.3f}", (label, column)
    proj = next(t for t in doc.tables if t[0][:2] == ["run", "proj"])
    assert {r[1] for r in proj[1:]} == {"v", "down", f"self_attn.{EVIL}"}
    assert any(t[0][:3] == ["run", "regime", "lag-1 cosine"] and len(t) == 3 for t in doc.tables)  # first 4 steps

    # What was run, the placement table and where table, and both findings as paragraphs.
    runs = next(t for t in doc.tables if t[0][:3] == ["run", "regime", "model"])
    assert [r[:5] for r in runs[1:3]] == [["sft", "sft", "toy:tiny", str(T), "0"], ["grpo", "grpo", "toy:tiny",
                                                                                     str(T), "1"]]
    placement = next(t for t in doc.tables if "accuracy [95% CI]" in t[0])
    assert {(r[0], r[1]) for r in placement[1:]} >= {("sft", "base"), ("grpo", "sign")}
    where = next(t for t in doc.tables if t[0][:3] == ["regime", "method", "budget"] and f"self_attn.{EVIL}" in t[0])
    assert where[1][:3] == ["sft", "sign", "1%"]
    assert "Finding: GRPO lag-1 cosine" in text and "SFT: base 0.300" in text
    assert "sign - random, paired over 3 seeds" in text


def test_cli_report_and_one_line_errors(inputs, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(inputs["analysis"]), str(inputs["compare"]), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"gradlens report: wrote {out}"
    doc = parse(out.read_text(encoding="utf-8"))
    assert len(doc.images) == 6 and "Finding: GRPO lag-1 cosine" in "".join(doc.text)  # kept by analyze

    missing = tmp_path / "nope"
    for argv, needle in (([str(missing), "--out", str(out)], str(missing)),
                         ([str(tmp_path), "--out", str(out)], str(tmp_path)),
                         ([str(inputs["analysis"]), "--out", str(tmp_path / "r.txt")], "r.txt")):
        assert main(["report", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("gradlens report: error: ") and needle in err


def test_malformed_analysis_directory_is_a_one_line_error_naming_the_file(inputs, tmp_path):
    bad = tmp_path / "analysis"
    shutil.copytree(inputs["analysis"], bad)
    (bad / "heatmap.png").write_bytes(b"<svg/>")
    with pytest.raises(GradlensError, match=r"heatmap\.png: not a PNG image$"):
        write_report([bad], ReportConfig(out=str(tmp_path / "r.html")))
    (bad / "heatmap.png").unlink()
    pd.read_csv(bad / "summary.csv").drop(columns="regime").to_csv(bad / "summary.csv", index=False)
    with pytest.raises(GradlensError, match=r"summary\.csv: lacks the column\(s\) regime$"):
        write_report([bad], ReportConfig(out=str(tmp_path / "r.html")))
    assert not (tmp_path / "r.html").exists()


def test_report_on_a_run_without_raw_shards(tmp_path):
    """A probe-like run (save_raw=False): the page shows what the accumulators allow and says what is missing."""
    grads = random_grads(T, SPECS, seed=3)
    path = tmp_path / "probe"
    with RunWriter(path, SPECS, config={"record": {"regime": "sft"}}, seed=3, save_raw=False) as w:
        for step, g in enumerate(grads):
            w.add_step(step + 1, g, {"loss": 0.0, "clip_coef": 1.0})
    out = write_report([path], ReportConfig(out=str(tmp_path / "r.html")))
    doc = parse(out.read_text(encoding="utf-8"))
    assert len(doc.images) == 5
    summary = next(t for t in doc.tables if t[0][:3] == ["run", "regime", "steps"])
    head, row = summary[0], summary[1]
    ref = reference_row([stacked(grads, i) for i in range(len(SPECS))], lags=10)
    for column, header in (("cos_lag1_mean", "lag-1 cosine"), ("sign_stability_mean", "sign stability"),
                           ("sign_null_mean", "sign stability, null")):
        assert row[head.index(header)] == f"{ref[column]:.3f}", column
    assert row[head.index("trajectory erank (raw)")] == "–" and row[head.index("cosine to mean")] == "–"
    runs = next(t for t in doc.tables if t[0][:3] == ["run", "regime", "model"])
    assert runs[1][runs[0].index("statistics from")] == "accumulators"
    assert "accumulators only (save_raw=False)" in "".join(doc.text)
