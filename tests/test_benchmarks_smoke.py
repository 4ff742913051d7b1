"""Each benchmark script runs end to end on tiny shapes and writes its JSON (benchmarks are not tests)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

from gradlens.evaluate import wilson_interval

pytestmark = pytest.mark.slow  # 6 child processes and 4 short trainings: about 60 s on 2 idle cores
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = {
    "bench_recording.py": ["--layers", "1", "--steps", "2", "--dtypes", "bfloat16", "--disk-repeats", "1"],
    "bench_analysis.py": ["--layers", "1", "--steps", "3", "--repeats", "1"],
    "bench_selection.py": ["--layers", "1", "--repeats", "1", "--scopes", "global", "--preset", "tiny",
                           "--probe-steps", "1", "--train-steps", "2", "--probe-reps", "1"],
    "bench_recorder_overhead.py": ["--regime", "sft", "--steps", "2", "--reps", "1"],
    "bench_distributed.py": ["--layers", "1", "--steps", "2", "--pause", "0"],
}
REAL_SHAPE_TINY = ["--steps", "2", "--seq-len", "64", "--layers", "1", "--hidden", "56", "--intermediate", "112"]


@pytest.mark.parametrize("script", sorted(TINY))
def test_benchmark_runs(script: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "result.json"
    extra = ["--dir", str(tmp_path)] if script in ("bench_recording.py", "bench_analysis.py", "bench_distributed.py") \
        else []
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(sys, "argv", [script, *TINY[script], *extra, "--json", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(BENCHMARKS / script), run_name="__main__")
    assert exit_info.value.code == 0
    result = json.loads(out.read_text())
    assert result["rows"] and result["machine"]["nproc"] >= 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("gradlens-bench-")]  # temporary runs deleted


def test_real_shape_reports_both_runs_from_the_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real-shape script's own numbers: both runs timed, a shard written per recorded step, the Qwen2.5-0.5B
    config values kept apart from the sizes a smoke run shrinks."""
    out = tmp_path / "result.json"
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(sys, "argv", ["real_shape.py", *REAL_SHAPE_TINY, "--dir", str(tmp_path), "--json",
                                      str(out)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(BENCHMARKS / "real_shape.py"), run_name="__main__")
    assert exit_info.value.code == 0
    result = json.loads(out.read_text())
    assert result["rows"] and result["machine"]["nproc"] >= 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("gradlens-bench-")]  # the scratch model deleted
    assert result["hub_id"].count("/") == 1 and result["recipe"] == "recipes/qwen2.5-1.5b-gsm8k-sft.yaml"
    for kind in ("train", "record"):
        assert len(result["runs"][kind]["step_seconds"]) == result["runs"][kind]["steps"] == 2
        assert result["runs"][kind]["peak_rss_bytes"] > 0
    steps = result["runs"]["record"]["steps"]
    ratio = result["median_step_seconds"]["record"] / result["median_step_seconds"]["train"]
    assert result["recorder_step_ratio"] == pytest.approx(ratio)
    # 1 layer x 7 projections at r=16, bf16 shards (the recipe's dtype): at least 2 bytes per B entry and step
    entries = 16 * (56 + 8 + 8 + 56 + 112 + 112 + 56)  # q k v o gate up down rows: kv width 2 heads x head_dim 4
    assert result["shard_bytes_per_step"] >= 2 * entries and steps == 2
    config = result["model_config"]
    assert (config["vocab_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (151936, 14, 2)
    assert config["tie_word_embeddings"] and config["rope_theta"] == 1e6 and config["rms_norm_eps"] == 1e-6


def test_toy_math_explore_appends_runs_and_keeps_the_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """``toy_math.py --explore`` trains off the defaults, appends the run (its fields as TRL read them) to the JSON's
    exploration section and keeps what was there; a run below the base model's interval is marked collapsed."""
    out = tmp_path / "toy_math.json"
    earlier = {"base": {"greedy": 0.9, "n": 200}, "summary": {"sft": "kept"}, "exploration_seed0": {"runs": []}}
    out.write_text(json.dumps(earlier))
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(sys, "argv", ["toy_math.py", "--seeds", "0", "--steps", "2", "--n_eval", "4", "--work",
                                      str(tmp_path / "work"), "--json", str(out), "--explore", "sft", "lr1e-3",
                                      "learning_rate=1e-3", "per_device_train_batch_size=4"])
    runpy.run_path(str(BENCHMARKS / "toy_math.py"), run_name="__main__")
    result = json.loads(out.read_text())
    assert {k: result[k] for k in earlier} == earlier
    (run,) = result["exploration"]["runs"]
    assert run["fields"] == {"learning_rate": "1e-3", "per_device_train_batch_size": "4"}
    assert run["training_args"]["learning_rate"] == 1e-3 and run["training_args"]["per_device_train_batch_size"] == 4
    assert run["steps"] == 2 and run["n"] == 4 and run["versions"]["trl"]
    assert run["collapsed"] == (run["accuracy"] < wilson_interval(180, 200)[0])  # the base's 0.9 of 200
