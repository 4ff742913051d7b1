"""TRL's own example scripts (``trl/scripts/sft.py`` and ``grpo.py`` of the installed trl), copied with the one line
docs/trl.md asks for (``GradientRecorder.attach(trainer, out)``), record a run that ``info``, ``analyze`` and
``select`` read; the manifest says how the adapter trained (standard PEFT LoRA: A trainable; DoRA; rsLoRA)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trl

from gradlens import open_run
from tests.helpers.cli import gradlens_inproc
from tests.helpers.models import ROWS, build_bpe_tokenizer, model_config, save_model

SCRIPTS = Path(trl.__file__).parent / "scripts"
ANCHOR = "    # Train the model\n    trainer.train("
REWARD = "def length_reward(completions, **kwargs):\n    return [float(len(str(c))) for c in completions]\n"


def with_recorder(script: str, dest: Path, run: Path) -> Path:
    """Copy TRL's ``script`` to ``dest`` with the recorder attached after the trainer is built."""
    text = (SCRIPTS / script).read_text()
    assert text.count(ANCHOR) == 1, f"{SCRIPTS / script}: the anchor {ANCHOR!r} is gone; update this test"
    attach = f"    from gradlens import GradientRecorder\n    GradientRecorder.attach(trainer, {str(run)!r})\n\n"
    dest.write_text(text.replace(ANCHOR, attach + ANCHOR))
    return dest


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    import torch
    import transformers

    root = tmp_path_factory.mktemp("trl-scripts")
    tokenizer = build_bpe_tokenizer()
    torch.manual_seed(0)
    model = save_model(transformers.LlamaForCausalLM(model_config("llama", tokenizer)), tokenizer, root / "tiny-llama")
    data = root / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"prompt": r["question"], "completion": r["answer"]}) + "\n"
                                              for r in ROWS))
    return model, data


@pytest.mark.slow
@pytest.mark.parametrize(("script", "flags", "expect"), [
    ("sft.py", ["--per_device_train_batch_size", "2", "--use_dora"],
     {"use_dora": True, "dora_magnitude_trainable": True, "use_rslora": False, "scaling": 2.0}),
    ("grpo.py", ["--per_device_train_batch_size", "4", "--num_generations", "2", "--max_completion_length", "8",
                 "--reward_funcs", "rewards.length_reward", "--use_rslora"],
     {"use_dora": False, "dora_magnitude_trainable": None, "use_rslora": True, "scaling": 4.0}),
])
def test_trl_example_script_records_a_run_that_info_analyze_and_select_read(
        model_and_data, tmp_path: Path, capsys, script: str, flags: list[str], expect: dict) -> None:
    model, data = model_and_data
    run = tmp_path / "run"
    (tmp_path / "rewards.py").write_text(REWARD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), str(tmp_path)]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(with_recorder(script, tmp_path / script, run)), "--model_name_or_path", str(model),
         "--dataset_name", str(data), "--output_dir", str(tmp_path / "out"), "--max_steps", "3", "--use_peft",
         "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj", "--report_to", "none",
         "--save_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "true", "--bf16", "false", *flags],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # q_proj 32 x 4 and v_proj 16 x 4 (2 key-value heads of 8) in 2 layers
    assert f"gradlens: recording 4 LoRA-B modules (384 B entries) every 1 step(s) into {run}" in proc.stdout
    assert "LoRA with A trainable" in proc.stdout and "B's gradient then describes a moving A" in proc.stderr

    meta = open_run(run).meta
    adapter = meta["config"]["adapter"]
    assert adapter["a_trainable"] is True and adapter["lora_fa"] is False
    assert (adapter["r"], adapter["lora_alpha"], adapter["target_modules"]) == (4, 8, ["q_proj", "v_proj"])
    assert {key: adapter[key] for key in expect} == expect  # rsLoRA: alpha / sqrt(r) = 4; LoRA: alpha / r = 2
    assert (meta["status"], meta["planned_steps"], len(meta["steps"])) == ("complete", 3, 3)
    assert meta["config"]["model"] == str(model) and "8 rows" in meta["config"]["dataset"]

    info = gradlens_inproc(capsys, "info", str(run))
    assert info.returncode == 0 and "complete: 3 of 3 steps" in info.stdout
    assert "NOTE:     A trained too (standard LoRA, not LoRA-FA)" in info.stdout
    analysis = gradlens_inproc(capsys, "analyze", str(run), "--out", str(tmp_path / "a"), "--no-figures",
                               "--no-progress", "--lags", "1")
    assert analysis.returncode == 0 and "B's gradient then describes a moving A" in analysis.stderr
    prov = json.loads((tmp_path / "a" / "provenance.json").read_text())
    assert prov["runs"][0]["adapter"]["a_trainable"] is True
    assert prov["runs"][0]["recording"]["model"] == str(model)
    select = gradlens_inproc(capsys, "select", str(run), "--out", str(tmp_path / "s"), "--budgets", "10%")
    assert select.returncode == 0 and len(list((tmp_path / "s" / "masks").iterdir())) == 4  # 4 informed selectors
    report = gradlens_inproc(capsys, "report", str(run), "--out", str(tmp_path / "r.html"))
    page = (tmp_path / "r.html").read_text()
    assert report.returncode == 0 and str(model) in page and "(none recorded)" not in page.split("Analysis config")[0]
