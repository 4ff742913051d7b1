"""The ``gradlens`` command line: help, ``gradlens toy base``, error reporting, and dataclass flags / YAML configs."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from gradlens.cli.dataclass_args import add_dataclass_arguments, config_from_args, load_yaml, parse_extra_flags
from gradlens.cli.main import SUBCOMMANDS, main
from gradlens.errors import GradlensError

HEAVY = ("torch", "transformers", "trl", "peft", "datasets")


def gradlens(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gradlens.cli.main", *argv], capture_output=True, text=True,
                          timeout=300)


def test_help_lists_subcommands_without_importing_torch():
    out = gradlens("--help")
    assert out.returncode == 0, out.stderr
    for name in SUBCOMMANDS:
        assert re.search(rf"^\s+{name}\s", out.stdout, re.M), out.stdout
    code = ("import sys; from gradlens.cli.main import build_parser; build_parser().format_help(); "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert imported.stdout.strip() == "[]", imported.stdout + imported.stderr


def test_toy_base_unknown_preset_is_one_line_exit_2():
    out = gradlens("toy", "base", "--preset", "nope")
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and "'nope'" in lines[0] and lines[0].startswith("gradlens toy: error:"), out.stderr
    assert "Traceback" not in out.stderr


def test_toy_base_reports_the_shipped_model(capsys):
    assert main(["toy", "base", "--n", "100", "--k", "4"]) == 0
    out = capsys.readouterr().out
    assert "source:            shipped" in out and str(Path("checkpoints") / "tiny-seed0-v1") in out
    assert int(re.search(r"parameters:\s+([\d,]+)", out)[1].replace(",", "")) > 50_000
    greedy = float(re.search(r"greedy accuracy:\s+([\d.]+)", out)[1])
    sampled = float(re.search(r"sampled accuracy:\s+([\d.]+)", out)[1])
    pass_k = float(re.search(r"pass@4:\s+([\d.]+)", out)[1])
    assert 0.15 <= greedy <= 0.5 and 0 < sampled < pass_k <= 1


def test_toy_base_builds_then_caches_a_new_preset(tmp_path, monkeypatch, capsys):
    import dataclasses

    import gradlens.toy_presets as toy_presets

    quick = dataclasses.replace(toy_presets.PRESETS["tiny"], pretrain_steps=5)
    monkeypatch.setitem(toy_presets.PRESETS, "tiny5", quick)
    monkeypatch.setenv("GRADLENS_CACHE", str(tmp_path))
    argv = ["toy", "base", "--preset", "tiny5", "--seed", "2", "--n", "20", "--k", "0"]
    sources = []
    for extra in ([], [], ["--rebuild"]):
        assert main(argv + extra) == 0
        out = capsys.readouterr().out
        sources.append(re.search(r"source:\s+(\w+)", out)[1])
        assert str(tmp_path / "toy" / "tiny5-seed2-v1") in out and "held-out prompts:  20" in out
        assert "greedy accuracy:" in out and "pass@" not in out  # k=0: no sampling
    assert sources == ["built", "cached", "built"]


def test_toy_base_saves_its_default_evaluation_next_to_the_model(tmp_path, monkeypatch, capsys):
    """With the default --n and --k the printed report is also saved beside the weights (what the docs' accuracy
    table is checked against); any other --n or --k leaves the saved file alone."""
    import dataclasses

    import gradlens.toy_presets as toy_presets
    from gradlens.toy_base_report import REPORT_FILE

    quick = dataclasses.replace(toy_presets.PRESETS["tiny"], pretrain_steps=5)
    monkeypatch.setitem(toy_presets.PRESETS, "tiny5", quick)
    monkeypatch.setenv("GRADLENS_CACHE", str(tmp_path))
    assert main(["toy", "base", "--preset", "tiny5"]) == 0
    out = capsys.readouterr().out
    saved_path = tmp_path / "toy" / "tiny5-seed0-v1" / REPORT_FILE
    assert f"saved:             {saved_path}" in out
    saved = json.loads(saved_path.read_text())
    labels = {"greedy": "greedy accuracy", "sampled": "sampled accuracy", "pass_at_k": "pass@8"}
    printed = {key: float(re.search(rf"{label}:\s+([\d.]+)", out)[1]) for key, label in labels.items()}
    assert {key: round(saved[key], 3) for key in printed} == printed
    assert (saved["n"], saved["k"], saved["preset"], saved["versions"]["torch"]) == (400, 8, "tiny5",
                                                                              importlib.metadata.version("torch"))
    before = saved_path.read_bytes()
    assert main(["toy", "base", "--preset", "tiny5", "--n", "20"]) == 0
    assert "saved:" not in capsys.readouterr().out and saved_path.read_bytes() == before


@pytest.mark.parametrize(("argv", "message"), [(["--n", "0"], "--n"), (["--n", "401"], "401"), (["--k", "-1"], "--k")])
def test_toy_base_bad_numbers_are_errors(argv, message, capsys):
    assert main(["toy", "base", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_toy_without_action_and_unknown_flags_are_usage_errors(capsys):
    for argv in (["toy"], ["toy", "base", "--bogus", "1"], ["toy", "other"]):
        assert main(argv) == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("gradlens toy") and "--help" in lines[0], lines


# --- dataclass flags and YAML configs -----------------------------------------------------------------------------


@dataclass
class Opts:
    lr: float = field(default=0.1, metadata={"help": "learning rate"})
    steps: int = field(default=10, metadata={"help": "optimizer steps"})
    name: str = field(default="run", metadata={"help": "run name, 100% free-form"})
    flag: bool = field(default=False, metadata={"help": "a switch"})
    tags: list[str] = field(default_factory=list, metadata={"help": "labels"})
    limit: int | None = field(default=None, metadata={"help": "cap (default: none)"})
    mode: Literal["a", "b"] = field(default="a", metadata={"help": "mode", "choices": ("a", "b")})
    extra: dict = field(default_factory=dict, metadata={"cli": False})


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="t")
    add_dataclass_arguments(parser, Opts)
    return parser.parse_args(argv)


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    assert config_from_args(Opts, parse([])) == Opts()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 1e-4\nsteps: 20\ntags: [x, y]\nflag: true\n")
    opts = config_from_args(Opts, parse(["--config", str(cfg), "--steps", "30", "--no-flag", "--limit", "7"]))
    assert opts == Opts(lr=1e-4, steps=30, tags=["x", "y"], flag=False, limit=7)
    assert isinstance(opts.lr, float)
    opts = config_from_args(Opts, parse(["--lr", "2e-3", "--tags", "a", "b", "--flag", "--mode", "b"]))
    assert opts == Opts(lr=2e-3, tags=["a", "b"], flag=True, mode="b")


def test_unknown_yaml_keys_fail_or_go_to_the_extra_field(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: 3\nnum_generations: 8\nbeta: 4e-2\n")
    with pytest.raises(GradlensError, match="beta, num_generations"):
        config_from_args(Opts, parse(["--config", str(cfg)]))
    opts = config_from_args(Opts, parse(["--config", str(cfg)]), {"beta": 0.5, "temperature": 0.7},
                            extra_field="extra")
    assert opts.steps == 3 and opts.extra == {"num_generations": 8, "beta": 0.5, "temperature": 0.7}


def test_parse_extra_flags_keeps_the_typed_text_and_several_values():
    flags = parse_extra_flags(["--num_generations", "8", "--beta", "0.04", "--lr=1e-4", "--use_vllm=false",
                               "--bf16", "--run-name", "abc", "--x=y", "--delta", "-1", "--report_to", "wandb",
                               "tensorboard"])
    assert flags == {"num_generations": "8", "beta": "0.04", "lr": "1e-4", "use_vllm": "false", "bf16": "true",
                     "run_name": "abc", "x": "y", "delta": "-1", "report_to": ["wandb", "tensorboard"]}
    assert parse_extra_flags([]) == {}
    for bad in (["stray"], ["--"]):
        with pytest.raises(GradlensError):
            parse_extra_flags(bad)


@pytest.mark.parametrize(("regime", "given", "typed"), [
    ("sft", {"max_grad_norm": "0.5", "gradient_accumulation_steps": "2", "bf16": "false", "report_to": ["none"]},
     {"max_grad_norm": 0.5, "gradient_accumulation_steps": 2, "bf16": False, "report_to": ["none"]}),
    ("grpo", {"num_generations": 4, "beta": "4e-2", "use_vllm": False, "max_completion_length": "null",
              "report_to": "none"},
     {"num_generations": 4, "beta": 0.04, "use_vllm": False, "max_completion_length": None, "report_to": "none"}),
])
def test_trl_fields_are_typed_by_the_regimes_parser(regime: str, given: dict, typed: dict) -> None:
    from gradlens.training.settings import check_overrides

    out = check_overrides(regime, given)
    assert out == typed and all(type(out[k]) is type(v) for k, v in typed.items())


@pytest.mark.parametrize(("given", "message"), [
    ({"max_grad_norm": "abc"}, r"^SFTConfig field max_grad_norm: invalid float value: 'abc'$"),
    ({"gradient_accumulation_steps": "two"}, r"field gradient_accumulation_steps: invalid int value: 'two'"),
    ({"per_device_train_batch_size": 2.5}, r"field per_device_train_batch_size: invalid int value: '2.5'"),
    ({"bf16": "maybe"}, r"field bf16: Truthy value expected: got maybe"),
    ({"lr_scheduler_type": "sometimes"}, r"field lr_scheduler_type: invalid choice: 'sometimes'"),
    ({"max_grad_norm": ["1", "2"]}, r"field max_grad_norm takes one value, got 2: 1 2"),
    ({"report_to": ["none", "none"]}, r"report_to none cannot be combined"),
    ({"report_to": "tensorboard"}, r"report_to tensorboard: the tensorboard package is not installed"),
    ({"num_generations": 8}, r"unknown SFTConfig field\(s\): num_generations"),
])
def test_wrong_trl_values_are_one_line_errors(given: dict, message: str) -> None:
    import importlib.util

    from gradlens.training.settings import check_overrides

    if given.get("report_to") == "tensorboard" and importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here, so report_to tensorboard is valid")

    with pytest.raises(GradlensError, match=message) as e:
        check_overrides("sft", given)
    assert "\n" not in str(e.value)


def test_config_file_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(GradlensError, match=re.escape(str(missing))):
        config_from_args(Opts, parse(["--config", str(missing)]))
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(GradlensError, match="mapping"):
        load_yaml(listing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1,\n")
    with pytest.raises(GradlensError, match=re.escape(str(broken))):
        load_yaml(broken)
    (tmp_path / "empty.yaml").write_text("")
    assert load_yaml(tmp_path / "empty.yaml") == {}


def test_dataclass_flags_help_and_bad_values(capsys):
    parser = argparse.ArgumentParser(prog="t")
    add_dataclass_arguments(parser, Opts)
    text = parser.format_help()
    assert "learning rate (default: 0.1)" in text and "100% free-form" in text
    assert "cap (default: none)" in text and "(default: none) (default" not in text
    assert "--extra" not in text and "--no-flag" in text
    for argv in (["--steps", "x"], ["--mode", "c"]):
        with pytest.raises(SystemExit):
            parse(argv)
    capsys.readouterr()
    with pytest.raises(GradlensError, match="bogus"):  # forwarded flags need an extra field to land in
        config_from_args(Opts, parse([]), {"bogus": 1})
