"""Property-based fuzzing of every subcommand's arguments: whatever is wrong, the answer is exit code 2 and one line.

Each case is a valid command line (defaults of the subcommand's config dataclass, in random order and subset) with at
least one invalid argument: a value of the wrong type, a number out of range, an empty string, an unknown choice, an
unknown flag, or a ``--config`` YAML file with a wrongly typed setting. The CLI runs in this process. Guards replace
the functions that would load a model, build a toy base model or start a comparison, so a case that slipped past
validation fails the test instead of starting to train.
"""

from __future__ import annotations

import dataclasses
import itertools
import tempfile
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradlens.cli.dataclass_args import _scalar_type
from gradlens.cli.main import SUBCOMMANDS, main
from gradlens.config import (
    AnalyzeConfig,
    CompareConfig,
    DiagnoseConfig,
    ProbeConfig,
    RecordConfig,
    ReportConfig,
    SelectConfig,
    TrainConfig,
)
from tests.helpers.store import write_run

CONFIGS: dict[str, type] = {"record": RecordConfig, "probe": ProbeConfig, "compare": CompareConfig,
                            "analyze": AnalyzeConfig, "select": SelectConfig, "report": ReportConfig,
                            "diagnose": DiagnoseConfig, "train": TrainConfig}
# Values out of range for fields whose type alone does not say so (a type's wrong values are generated from it).
OUT_OF_RANGE: dict[str, list[str]] = {
    "max_steps": ["0", "-1"], "every_n_steps": ["0", "-2"], "steps_per_shard": ["0", "-5"], "n_train": ["0", "-1"],
    "lora_r": ["0", "-8"], "lora_alpha": ["0", "-1"], "learning_rate": ["0", "-1e-3", "nan", "inf"],
    "seed": ["-1", "-99999999999999999999"], "train_steps": ["0"], "lags": ["0", "-3"],
    "window": ["1", "0", "-2"], "bins": ["1", "0"], "memory_mb": ["0", "15.9", "nan", "inf", "-1"],
    "probe_steps": ["0"], "n_val": ["0"], "n_eval": ["-1"], "eval_max_new_tokens": ["0"], "eval_samples": ["-1"],
    "curve_every": ["-1"], "sweep_seeds": ["-1", "4294967296"], "grid_extensions": ["-1"],
    "divergence_margin": ["-0.5", "1.5"],
    "seeds": ["-1", "1 1", "4294967296"], "full_lrs": ["0", "-1", "nan", "inf"],
    "sparse_lrs": ["0", "nan", "inf", "-0.1"], "budgets": ["0", "-1%", "101%", "abc", "0%", "nan%", "1.5"],
    "out": [""], "model": ["", "toy:nope"],
}
REPORT_OUT = ["", "report.txt", "page"]
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
GUARDED = [
    "gradlens.models.load_model", "gradlens.compare.runs.CompareRuns", "gradlens.toy_base_report.ensure_base_model",
]


def _parses(kind: type, s: str) -> bool:
    try:
        kind(s)
    except ValueError:
        return False
    return True


def _cli_value(value: typing.Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def _valid_flags(cls: type) -> dict[str, list[str]]:
    """Each CLI field of ``cls`` at its default, as argv tokens (fields defaulting to None or "" are left out)."""
    out = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli") is False:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, bool):
            out[f.name] = [f"--{f.name}" if default else f"--no-{f.name}"]
        elif default not in (None, "", []):
            out[f.name] = [f"--{f.name}", *_cli_value(default)]
    return out


def _invalid(cls: type, command: str) -> st.SearchStrategy[tuple[str, list[str]]]:
    """(field, argv tokens) with a wrong value for one CLI field of ``cls``."""
    hints = typing.get_type_hints(cls)
    options = []
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli") is False:
            continue
        tp, is_list = _scalar_type(hints[f.name])
        flag = f"--{f.name}"
        wrong: list[st.SearchStrategy[list[str]]] = []
        if tp is bool:
            wrong.append(st.sampled_from([[f"{flag}=yes"], [f"--no-{f.name}=1"]]))
        elif tp in (int, float):
            wrong.append(TEXT.filter(lambda s, tp=tp: not _parses(tp, s)).map(lambda s, flag=flag: [flag, s]))
        if "choices" in f.metadata:
            choices = f.metadata["choices"]
            wrong.append(TEXT.filter(lambda s, c=choices: s not in c).map(lambda s, flag=flag: [flag, s]))
        if is_list:
            wrong.append(st.just([flag]))  # no value at all
        ranges = REPORT_OUT if (command, f.name) == ("report", "out") else OUT_OF_RANGE.get(f.name, [])
        if ranges:
            wrong.append(st.sampled_from(ranges).map(lambda s, flag=flag: [flag, *s.split(" ")] if s else [flag, s]))
        options += [w.map(lambda argv, name=f.name: (name, argv)) for w in wrong]
    options.append(st.sampled_from(["--no_such_flag", "--lr"]).map(lambda s: ("flag", [s, "1"])))
    return st.one_of(options)


WRONG_YAML = {int: ["abc", 1.5, [1], {"a": 1}, True], float: ["abc", [1.0], True, {"a": 1}],
              str: [[1, 2], {"a": 1}, True], bool: ["maybe", 1, [True]]}
_yaml_count = itertools.count()


def _yaml_invalid(cls: type, directory: Path) -> st.SearchStrategy[tuple[str, list[str]]]:
    """(field, ["--config", file in ``directory``]) where the YAML file gives one field a value of the wrong type."""
    hints = typing.get_type_hints(cls)
    cases = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, is_list = _scalar_type(hints[f.name])
        if typing.get_origin(hints[f.name]) is dict or hints[f.name] is dict:
            cases += [(f.name, v) for v in ([1], "x", 3)]
        elif is_list:
            cases += [(f.name, v) for v in ({"a": 1}, [[1]], [{"a": 1}])]
        elif tp in WRONG_YAML:
            cases += [(f.name, v) for v in WRONG_YAML[tp]]

    def write(case: tuple[str, typing.Any]) -> tuple[str, list[str]]:
        path = directory / f"{next(_yaml_count)}.yaml"
        path.write_text(yaml.safe_dump({case[0]: case[1]}))
        return case[0], ["--config", str(path)]

    return st.sampled_from(cases).map(write)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / "run"
    write_run(path, range(4), steps_per_shard=2)
    return path


@pytest.fixture(scope="module", autouse=True)
def no_training():
    """Replace what would load a model, build a base model or run a comparison: reaching it fails the case."""
    def reached(*args, **kwargs):
        raise AssertionError("a fuzzed command line got past validation to real work")

    with pytest.MonkeyPatch.context() as mp:
        for target in GUARDED:
            mp.setattr(target, reached)
        yield


def assert_usage_error(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert rc == 2, (argv, rc, err)
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith("gradlens"), (argv, err)
    assert "error: " in lines[0] and out == "", (argv, out, err)


def command_lines(command: str, base: list[str], directory: Path) -> st.SearchStrategy[tuple[list[str], list[str]]]:
    """(argv, names of the invalid fields) for ``command``: valid defaults, then 1-2 invalid arguments, shuffled."""
    cls = CONFIGS[command]
    valid = _valid_flags(cls)

    @st.composite
    def build(draw) -> tuple[list[str], list[str]]:
        bad = draw(st.lists(st.one_of(_invalid(cls, command), _yaml_invalid(cls, directory)), min_size=1, max_size=2,
                            unique_by=lambda x: x[0]))
        names = [name for name, _ in bad]
        chosen = draw(st.lists(st.sampled_from(sorted(valid)), unique=True)) if valid else []
        groups = [valid[n] for n in chosen if n not in names] + [tokens for _, tokens in bad]
        groups = draw(st.permutations(groups))
        return [command, *base, *itertools.chain.from_iterable(groups)], names

    return build()


FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])


def test_every_subcommand_is_fuzzed() -> None:
    assert set(SUBCOMMANDS) == {*CONFIGS, "info", "toy"}


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_fuzzed_config_flags_end_in_exit_2_and_one_line(command: str, run_dir: Path, tmp_path_factory,
                                                         capsys: pytest.CaptureFixture) -> None:
    out = tmp_path_factory.mktemp(f"fuzz-{command}")
    base = {"record": ["--out", str(out / "run")], "probe": ["--out", str(out / "probe")],
            "compare": ["--out", str(out / "compare")],
            "analyze": [str(run_dir), "--out", str(out / "a"), "--no-progress", "--no-figures"],
            "select": [str(run_dir), "--out", str(out / "s")], "report": [str(run_dir), "--out", str(out / "r.html")],
            "diagnose": [str(run_dir)], "train": ["--out", str(out / "train")],
            }[command]

    @FUZZ
    @given(command_lines(command, base, out))
    def check(case: tuple[list[str], list[str]]) -> None:
        assert_usage_error(case[0], capsys)

    check()


TRUTH_WORDS = {"yes", "no", "true", "false", "t", "f", "y", "n", "1", "0"}


def _trl_wrong_values(regime: str) -> st.SearchStrategy[tuple[str, str]]:
    """(TRL field, a value of the wrong type) for every bool, int and float field of the regime's TRL config."""
    from gradlens.training.settings import config_class

    cls = config_class(regime)
    hints = typing.get_type_hints(cls)
    options = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
        if len(args) != 1 or args[0] not in (bool, int, float):
            continue
        tp = args[0]
        wrong = TEXT.filter(lambda s, tp=tp: not s.startswith("-") and s.strip().lower() not in ("none", "null") and (
            s.lower() not in TRUTH_WORDS if tp is bool else not _parses(tp, s)))
        options.append(wrong.map(lambda s, name=f.name: (name, s)))
    return st.one_of(options)


@pytest.mark.parametrize(("command", "regime"), [("record", "sft"), ("record", "grpo"), ("train", "grpo"),
                                                 ("probe", "sft")])
def test_fuzzed_trl_fields_of_the_wrong_type_end_in_exit_2_before_training(command: str, regime: str,
                                                                           tmp_path_factory, capsys) -> None:
    """TRL's own fields, drawn from the config dataclasses with values their declared type rejects: one line, exit
    2, and nothing loads (the guards fail a case that gets to a model)."""
    out = tmp_path_factory.mktemp(f"trl-{command}") / "out"

    @FUZZ
    @given(case=_trl_wrong_values(regime))
    def check(case: tuple[str, str]) -> None:
        assert_usage_error([command, "--regime", regime, "--out", str(out), f"--{case[0]}", case[1]], capsys)
        assert not out.exists()

    check()


PATHS = TEXT.filter(lambda s: not s.startswith("-"))


@FUZZ
@given(paths=st.lists(st.one_of(PATHS.map(lambda s: Path(tempfile.gettempdir()) / "gradlens-fuzz-none" / s),
                                st.sampled_from(["", "/dev/null", "/", tempfile.gettempdir()])), min_size=1,
                      max_size=3),
       unknown_flag=st.booleans())
def test_fuzzed_info_paths_end_in_exit_2_and_one_line(paths, unknown_flag, capsys) -> None:
    argv = ["info", *map(str, paths), *(["--bogus"] if unknown_flag else [])]
    assert_usage_error(argv, capsys)


TOY_VALID = {"preset": ["--preset", "tiny"], "seed": ["--seed", "0"], "rebuild": ["--rebuild"], "n": ["--n", "400"],
             "k": ["--k", "8"]}
TOY_INVALID = st.one_of(
    TEXT.filter(lambda s: s not in ("tiny", "small")).map(lambda s: ("preset", ["--preset", s])),
    st.one_of(st.integers(max_value=-1).map(str), TEXT.filter(lambda s: not _parses(int, s))).map(
        lambda s: ("seed", ["--seed", s])),
    st.one_of(st.integers(max_value=0).map(str), st.integers(min_value=401).map(str),
              TEXT.filter(lambda s: not _parses(int, s))).map(lambda s: ("n", ["--n", s])),
    st.one_of(st.integers(max_value=-1).map(str), TEXT.filter(lambda s: not _parses(int, s))).map(
        lambda s: ("k", ["--k", s])),
    st.just(("rebuild", ["--rebuild=1"])),
)


@FUZZ
@given(bad=st.lists(TOY_INVALID, min_size=1, max_size=2, unique_by=lambda x: x[0]),
       valid=st.lists(st.sampled_from(sorted(TOY_VALID)), unique=True), rnd=st.randoms())
def test_fuzzed_toy_base_ends_in_exit_2_and_one_line(bad, valid, rnd, capsys) -> None:
    names = [name for name, _ in bad]
    groups = [TOY_VALID[n] for n in valid if n not in names] + [tokens for _, tokens in bad]
    rnd.shuffle(groups)
    assert_usage_error(["toy", "base", *itertools.chain.from_iterable(groups)], capsys)


def test_out_of_range_table_names_real_fields() -> None:
    """The hand-written range table must not drift from the configs (a renamed field would silently go unfuzzed)."""
    fields = {f.name for cls in CONFIGS.values() for f in dataclasses.fields(cls)}
    assert set(OUT_OF_RANGE) <= fields, set(OUT_OF_RANGE) - fields
