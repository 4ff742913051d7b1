"""Hub ids resolve as transformers resolves them: an existing directory is a local model, anything else goes to
``from_pretrained`` (hub cache, ``HF_HUB_OFFLINE``, ``--model_revision``). All offline: the model sits in a hub cache
the fixture wrote (tests/helpers/hub_cache.py); errors for ids the cache lacks are one line naming the id and the
cause."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from gradlens import open_run
from tests.conftest import HUB_DATASET_ID, HUB_MODEL_ID
from tests.helpers.cli import assert_one_line_error, gradlens_inproc
from tests.helpers.hub_cache import commit_of, offline_env
from tests.helpers.models import ROWS

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--logging_steps", "100", "--disable_tqdm", "true"]
TINY_SFT = ["--max_steps", "2", "--lora_r", "2", "--per_device_train_batch_size", "4", "--max_length", "128", *QUIET]


def test_transformers_itself_loads_the_fixture_offline(offline_hub: Path) -> None:
    """The fixture is a real hub cache: plain transformers resolves the id from it with the hub switched off."""
    import torch
    from huggingface_hub import constants
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gradlens.models import load_model_and_tokenizer

    assert constants.HF_HUB_OFFLINE and constants.HF_HUB_CACHE == str(offline_hub / "hub")
    plain = AutoModelForCausalLM.from_pretrained(HUB_MODEL_ID)
    ours, tokenizer = load_model_and_tokenizer(HUB_MODEL_ID, revision="main")
    snapshot = offline_hub / "hub" / "models--gradlens-test--tiny-qwen2" / "snapshots" / commit_of(HUB_MODEL_ID)
    saved = load_file(snapshot / "model.safetensors")
    for model in (plain, ours):
        assert model.name_or_path == HUB_MODEL_ID
        state = model.state_dict()
        assert set(saved) <= set(state)
        assert all(torch.equal(saved[k], state[k]) for k in saved)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(snapshot).get_vocab()


def test_record_resolves_a_hub_id(offline_hub: Path, gsm_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    proc = gradlens_inproc(capsys, "record", "--model", HUB_MODEL_ID, "--task", f"gsm8k:{gsm_dir}", "--out",
                           str(out), *TINY_SFT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = open_run(out)
    assert run.steps == [1, 2] and len(run.modules) == 7 * 2
    record = run.meta["config"]["record"]
    assert record["model"] == HUB_MODEL_ID and record["model_revision"] == "main"


def test_train_resolves_a_hub_id(offline_hub: Path, gsm_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "train"
    proc = gradlens_inproc(capsys, "train", "--model", HUB_MODEL_ID, "--task", f"gsm8k:{gsm_dir}", "--out",
                           str(out), *TINY_SFT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = json.loads((out / "train.json").read_text())
    assert train["config"]["model"] == HUB_MODEL_ID and train["steps"] == 2
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == HUB_MODEL_ID  # PEFT reloads it by the id, as it was given


def test_probe_resolves_a_hub_id(offline_hub: Path, gsm_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "probe"
    proc = gradlens_inproc(capsys, "probe", "--model", HUB_MODEL_ID, "--task", f"gsm8k:{gsm_dir}", "--out", str(out),
                           "--methods", "sign", "--budgets", "10%", *TINY_SFT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = json.loads((out / "probe.json").read_text())
    assert probe["config"]["model"] == HUB_MODEL_ID
    assert (out / "masks" / "sign-10pct.safetensors").is_file()


@pytest.mark.slow
def test_compare_resolves_a_hub_id(offline_hub: Path, gsm_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    proc = gradlens_inproc(capsys, "compare", "--model", HUB_MODEL_ID, "--task", f"gsm8k:{gsm_dir}", "--out",
                           str(out), "--regimes", "sft", "--methods", "random", "--budgets", "10%", "--seeds", "0",
                           "--max_steps", "1", "--probe_steps", "1", "--full_lrs", "1e-2", "--sparse_lrs", "1e-1",
                           "--n_val", "2", "--n_eval", "2", "--eval_samples", "0", "--eval_max_new_tokens", "4",
                           "--lora_r", "2", "--no-progress", "--no-export", "--per_device_train_batch_size", "4",
                           "--max_length", "128")
    assert proc.returncode == 0, proc.stderr[-3000:]
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["config"]["model"] == HUB_MODEL_ID and prov["config"]["model_revision"] == "main"


@pytest.mark.slow
def test_record_in_a_child_process_reads_the_offline_environment(hub_home: Path, gsm_dir: Path,
                                                                 tmp_path: Path) -> None:
    """The environment alone (what a user sets) is enough: no patched module constants in the child."""
    out = tmp_path / "run"
    env = {**os.environ, **offline_env(hub_home), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "gradlens.cli.main", "record", "--model", HUB_MODEL_ID, "--task",
                           f"gsm8k:{gsm_dir}", "--out", str(out), *TINY_SFT], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert open_run(out).steps == [1, 2]


# --------------------------------------------------------------------------------------------------------------------
# One-line errors


def test_an_id_the_offline_cache_lacks_is_one_line(offline_hub: Path, gsm_dir: Path, tmp_path: Path, capsys) -> None:
    proc = gradlens_inproc(capsys, "record", "--model", "gradlens-test/not-cached", "--task", f"gsm8k:{gsm_dir}",
                           "--out", str(tmp_path / "run"), *TINY_SFT)
    assert_one_line_error(proc, "'gradlens-test/not-cached'", "not in the hub cache", str(offline_hub / "hub"),
                          "HF_HUB_OFFLINE", "hf download gradlens-test/not-cached")
    assert not (tmp_path / "run").exists()


def test_a_revision_the_offline_cache_lacks_is_one_line(offline_hub: Path, gsm_dir: Path, tmp_path: Path,
                                                        capsys) -> None:
    proc = gradlens_inproc(capsys, "record", "--model", HUB_MODEL_ID, "--model_revision", "v2", "--task",
                           f"gsm8k:{gsm_dir}", "--out", str(tmp_path / "run"), *TINY_SFT)
    assert_one_line_error(proc, repr(HUB_MODEL_ID), "at revision 'v2'", "HF_HUB_OFFLINE")


@pytest.mark.parametrize(("model", "needle"), [
    ("./no-such-dir", "does not exist"),
    ("a//b", "nor a hub id"),
])
def test_neither_a_directory_nor_an_id_is_one_line(offline_hub: Path, tmp_path: Path, capsys, model: str,
                                                   needle: str) -> None:
    proc = gradlens_inproc(capsys, "record", "--model", model, "--out", str(tmp_path / "run"), *TINY_SFT)
    assert_one_line_error(proc, repr(model), needle)


def test_a_file_or_a_revision_of_a_local_directory_is_one_line(offline_hub: Path, make_tiny_model, char_tokenizer,
                                                               tmp_path: Path, capsys) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    proc = gradlens_inproc(capsys, "record", "--model", str(tmp_path / "weights.bin"), "--out", str(tmp_path / "a"),
                           *TINY_SFT)
    assert_one_line_error(proc, "is a file, not a model directory")
    local = tmp_path / "local"
    make_tiny_model().save_pretrained(local)
    char_tokenizer.save_pretrained(local)
    proc = gradlens_inproc(capsys, "record", "--model", str(local), "--model_revision", "v2", "--out",
                           str(tmp_path / "b"), *TINY_SFT)
    assert_one_line_error(proc, "--model_revision v2", "is a local directory")


# --------------------------------------------------------------------------------------------------------------------
# Data ids: through datasets' cache, as load_dataset resolves them


def test_task_gsm8k_is_openai_gsm8k_from_the_datasets_cache(offline_hub: Path) -> None:
    from gradlens.tasks.gsm8k import MathTask, gold_answer

    task = MathTask.from_spec("gsm8k")
    assert (task.source, task.dataset_config) == ("openai/gsm8k", "main")
    data = task.dataset("train")
    assert [r["answer"] for r in data] == [gold_answer(r["answer"]) for r in ROWS]  # the rows cached under that id
    assert len(task.dataset("test")) == 3


def test_record_resolves_a_dataset_id(offline_hub: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    proc = gradlens_inproc(capsys, "record", "--model", HUB_MODEL_ID, "--task", f"gsm8k:{HUB_DATASET_ID}", "--out",
                           str(out), "--n_eval", "2", "--eval_max_new_tokens", "4", *TINY_SFT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert open_run(out).steps == [1, 2]
    assert json.loads((out / "eval.json").read_text())["n"] == 2


def test_a_dataset_id_the_offline_cache_lacks_is_one_line(offline_hub: Path, tmp_path: Path, capsys) -> None:
    proc = gradlens_inproc(capsys, "record", "--model", HUB_MODEL_ID, "--task", "gsm8k:gradlens-test/not-cached",
                           "--out", str(tmp_path / "run"), *TINY_SFT)
    assert_one_line_error(proc, "math task gradlens-test/not-cached", "not in the datasets cache",
                          str(offline_hub / "datasets"), "HF_HUB_OFFLINE")


# --------------------------------------------------------------------------------------------------------------------
# Gated, missing, no such revision: huggingface_hub's real HTTP error handling, against a local server that answers
# as the hub does (status code and X-Error-Code header), in a child process pointed at it with HF_ENDPOINT


class HubErrors(http.server.BaseHTTPRequestHandler):
    """Every request is refused the way the hub refuses it: gated repositories (403, GatedRepo), a missing revision
    (404, RevisionNotFound) and, for everything else, a missing repository (404, RepoNotFound)."""

    def refuse(self) -> None:
        code, error = ((403, "GatedRepo") if "gated" in self.path else (404, "RevisionNotFound")
                       if "/v9" in self.path else (404, "RepoNotFound"))
        self.send_response(code)
        self.send_header("X-Error-Code", error)
        self.send_header("X-Error-Message", f"{error} (test hub)")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = refuse

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def refusing_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HubErrors)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize(("flags", "needles"), [
    (["--model", "myorg/gated-model"], ["'myorg/gated-model'", "gated repository", "/myorg/gated-model", "HF_TOKEN"]),
    (["--model", "myorg/missing"], ["'myorg/missing'", "the hub has no model 'myorg/missing'"]),
    (["--model", "myorg/x", "--model_revision", "v9"], ["'myorg/x'", "has no revision 'v9'"]),
    (["--task", "gsm8k:myorg/gated-data"], ["myorg/gated-data", "is a gated dataset", "HF_TOKEN"]),
    (["--task", "gsm8k:myorg/missing-data"], ["myorg/missing-data", "doesn't exist on the Hub"]),
])
def test_gated_missing_and_revision_errors_from_the_hub_are_one_line(refusing_hub: str, tmp_path: Path,
                                                                     flags: list[str], needles: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_ENDPOINT=refusing_hub, OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))
    flags = flags if "--model" in flags else ["--model", "toy:tiny", *flags]
    proc = subprocess.run([sys.executable, "-m", "gradlens.cli.main", "record", *flags, "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert_one_line_error(proc, *needles)
