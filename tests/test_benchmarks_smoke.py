"""Each benchmark script runs end to end on tiny shapes and writes its JSON (benchmarks are not tests)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # 4 child processes and 2 short trainings: about 30 s on 2 idle cores
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = {
    "bench_recording.py": ["--layers", "1", "--steps", "2", "--dtypes", "bfloat16", "--disk-repeats", "1"],
    "bench_analysis.py": ["--layers", "1", "--steps", "3", "--repeats", "1"],
    "bench_selection.py": ["--layers", "1", "--repeats", "1", "--scopes", "global", "--preset", "tiny",
                           "--probe-steps", "1", "--train-steps", "2", "--probe-reps", "1"],
    "bench_recorder_overhead.py": ["--regime", "sft", "--steps", "2", "--reps", "1"],
}


@pytest.mark.parametrize("script", sorted(TINY))
def test_benchmark_runs(script: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "result.json"
    extra = ["--dir", str(tmp_path)] if script in ("bench_recording.py", "bench_analysis.py") else []
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(sys, "argv", [script, *TINY[script], *extra, "--json", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(BENCHMARKS / script), run_name="__main__")
    assert exit_info.value.code == 0
    result = json.loads(out.read_text())
    assert result["rows"] and result["machine"]["nproc"] >= 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("gradlens-bench-")]  # temporary runs deleted
