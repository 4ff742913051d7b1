"""``benchmarks/gpu_check.sh``, run blind on a lent GPU machine, tried here: the wheel preparation for real (from
PyPI) and their offline install into a temporary target, the import preflight that writes the JSON when an import
fails, and ``--cpu`` running every part, the correctness comparisons included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIMIT = 64 * 2**20  # what a device call carries


def run(cmd: list[str], tmp_path: Path, timeout: int, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(cmd, cwd=REPO, env={**base, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env},
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.slow
def test_wheels_are_prepared_under_the_limit_and_install_offline(tmp_path: Path) -> None:
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    prep = run(["bash", "scripts/gpu_wheels.sh"], tmp_path, 300, GPU_WHEELS=str(wheels), GPU_PYTHONS="3.11 3.12")
    assert prep.returncode == 0, prep.stderr[-2000:]
    pins = (wheels / "PINS").read_text().split()
    assert {p.split("==")[0] for p in pins} == {"trl", "datasets", "dill", "multiprocess", "xxhash"}
    files = list(wheels.glob("*.whl"))
    assert sum(f.stat().st_size for f in files) < LIMIT
    assert {f.name.split("-")[0] for f in files} == {"trl", "datasets", "dill", "multiprocess", "xxhash"}
    assert len([f for f in files if f.name.startswith("xxhash-")]) == 2  # one per interpreter asked for
    # the GPU command's install step, for real, into a temporary target (--help: nothing runs after it)
    done = run(["bash", "benchmarks/gpu_check.sh", "--help"], tmp_path, 300, GPU_WHEELS=str(wheels),
               GPU_SITE=str(site), OUT=str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:] + (tmp_path / "gpu_wheels_install.log").read_text()
    for pin in pins:
        name, version = pin.split("==")
        assert list(site.glob(f"{name}-{version}.dist-info")), f"{pin} not installed in {site}"


def test_a_failed_import_is_written_to_the_json(tmp_path: Path) -> None:
    """The preflight runs before any part: an import that fails (here trl) ends the check with a JSON saying so."""
    broken = tmp_path / "broken"
    (broken / "trl").mkdir(parents=True)
    (broken / "trl" / "__init__.py").write_text("raise ImportError('no trl on this machine')\n")
    out = tmp_path / "gpu_check.json"
    proc = run([sys.executable, "benchmarks/gpu_check.py", "--out", str(out), "--cpu"], tmp_path, 300,
               PYTHONPATH=os.pathsep.join([str(broken), str(REPO), str(REPO / "benchmarks")]))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("gpu_check: preflight FAILED: import trl: ImportError")
    result = json.loads(out.read_text())
    assert result["ok"] is False and result["preflight"]["ok"] is False and "parts" not in result
    assert result["preflight"]["error"] == "import trl: ImportError: no trl on this machine"
    assert set(result["preflight"]["modules"]) == {"torch", "transformers", "peft", "accelerate"}  # before trl


@pytest.mark.slow  # about 90 s on 2 shared cores: the recipe part trains and compares the toy
def test_cpu_runs_every_part_with_the_correctness_comparisons(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from gpu_check import PARTS
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    proc = run(["bash", "benchmarks/gpu_check.sh", "--cpu", "--dir", str(tmp_path)], tmp_path, 600,
               OUT=str(tmp_path), GPU_WHEELS=str(tmp_path / "none"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["ok"] and result["finished"] and result["preflight"]["ok"]
    assert result["preflight"]["modules"]["gradlens"]["file"].startswith(str(REPO))  # the path the script set
    parts = {p["name"]: p for p in result["parts"]}
    assert list(parts) == [p.name for p in PARTS]
    assert list(parts)[0] == "recording-1.5b" and list(parts)[-2:] == ["recipe-sft-hub-id", "toy-path"]
    for name in ("correctness-float32", "correctness-max-queue-1", "correctness-bf16-gradients"):
        p = parts[name]
        assert p["steps"] == 3 and p["mismatched_steps"] == [] and p["unequal_sums"] == [], name
    assert parts["correctness-bf16-gradients"]["gradient_dtype"] == "bfloat16"
    assert parts["correctness-max-queue-1"]["max_queue"] == 1
    assert parts["correctness-two-gpus"]["skipped"] == "needs two GPUs"
    for dtype in ("bfloat16", "float32"):
        bench = parts["recording-1.5b"][dtype]
        assert bench["steps"] == 3 and bench["recorder_blocked_ms"] > -bench["bare_step_ms"]
    assert parts["toy-path"]["sft"]["record"]["steps"] == 2 and parts["toy-path"]["compare"]["rows"] > 0
    recipe = parts["recipe-sft-hub-id"]  # the SFT recipe through gradlens record --config, under a local hub id
    assert recipe["steps"] == 2 and recipe["recipe"] == "recipes/qwen2.5-1.5b-gsm8k-sft.yaml"
    assert recipe["hub_id"].count("/") == 1 and recipe["storage_dtype"] == "bfloat16"  # the recipe's own shard dtype
    assert recipe["model_dtype"] == "float32" and all(n > 0 for n in recipe["b_grad_norms"])  # CPU: float32 weights
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("gradlens-gpu-check-")]
