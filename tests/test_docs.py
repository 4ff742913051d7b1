"""The README and the docs site say what gradlens does: every ``gradlens ...`` command shown parses with gradlens's own
parser into its config, every YAML block parses into the config of the command that reads it, every linked image
exists, each command's generated page lists exactly its ``--help`` flags, and the toy accuracy table is what
``gradlens toy base`` saved next to the shipped models. Nothing trains and nothing is evaluated: parsing only.

In prose, ``gradlens NAME`` alone names a command and is not checked; a command holding ``...`` is a sketch
(``gradlens compare ... --methods sign``) and is skipped; shell variables (``$g``) pass the parser as text and are
left out of the TRL field check.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import importlib
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from gradlens.cli.dataclass_args import CONFIG_DEFAULT, config_from_args, load_yaml, parse_extra_flags
from gradlens.cli.main import SUBCOMMANDS, UsageError, build_parser
from gradlens.errors import GradlensError

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w-]*)(.*)$")
INLINE_CODE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)")
CONTROL = {";", "&&", "||", "|", "&", "do", "then", "done"}


@dataclass(frozen=True)
class Block:
    """A fenced code block: where it is, its language, the rest of its info string (``title="run.yaml"``), text."""

    page: Path
    line: int
    lang: str
    info: str
    text: str

    @property
    def title(self) -> str | None:
        found = re.search(r'title="([^"]+)"', self.info)
        return found[1] if found else None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


@dataclass(frozen=True)
class Command:
    """One ``gradlens`` command line as shown (``full``: in a code block, so it should build its whole config)."""

    where: str
    argv: list[str]
    full: bool


def _blocks_and_prose(page: Path) -> tuple[list[Block], list[tuple[int, str]]]:
    blocks, prose, current = [], [], None
    for number, line in enumerate(page.read_text().splitlines(), start=1):
        fence = FENCE.match(line)
        if current is None and fence:
            current = (number, fence[1], fence[2], fence[3], [])
        elif current is not None and fence and fence[1].startswith(current[1]) and not fence[2]:
            blocks.append(Block(page, current[0], current[2], current[3], "\n".join(current[4]) + "\n"))
            current = None
        elif current is not None:
            current[4].append(line)
        else:
            prose.append((number, line))
    assert current is None, f"{page.relative_to(ROOT)}:{current[0]}: a code block is never closed"
    return blocks, prose


BLOCKS: list[Block] = []
PROSE: list[tuple[Path, int, str]] = []
for _page in PAGES:
    _blocks, _prose = _blocks_and_prose(_page)
    BLOCKS += _blocks
    PROSE += [(_page, number, line) for number, line in _prose]


def _gradlens_commands(text: str, where: str, full: bool) -> list[Command]:
    """Every ``gradlens SUBCOMMAND ...`` in shell text: continuation lines joined, comments dropped, split at ``;``,
    ``&&``, pipes and loop keywords, environment assignments in front allowed."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        if not any(m[1] in SUBCOMMANDS for m in re.finditer(r"(?:^|[\s;/])gradlens\s+(\w+)(?=\s|$)", line)):
            continue  # no command here (output such as "gradlens record: runs/sft: 40 steps" included)
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens, segment = list(lexer), []
        for token in [*tokens, ";"]:
            if token not in CONTROL:
                segment.append(token)
                continue
            starts = [i for i, t in enumerate(segment[:-1]) if t.rsplit("/", 1)[-1] == "gradlens"
                      and segment[i + 1] in SUBCOMMANDS]
            if starts and "..." not in segment:
                commands.append(Command(where, segment[starts[0] + 1 :], full))
            segment = []
    return commands


def _shown_commands() -> list[Command]:
    shell = ("bash", "sh", "console", "shell", "")
    commands = [c for b in BLOCKS if b.lang in shell for c in _gradlens_commands(b.text, b.where, full=True)]
    for page, number, line in PROSE:
        for span in INLINE_CODE.findall(line):
            shown = _gradlens_commands(span, f"{page.relative_to(ROOT)}:{number}", full=False)
            commands += [c for c in shown if len(c.argv) > 1]  # `gradlens diagnose` alone names the command
    return commands


COMMANDS = _shown_commands()
YAML_BLOCKS = {b.title: b for b in BLOCKS if b.lang == "yaml"}


def _parse(command: Command, tmp_path: Path) -> tuple[argparse.Namespace, list[str], object | None]:
    """The command through gradlens's own parser (as ``gradlens.cli.main.main`` parses it, then its config built as
    the command's ``run`` builds it), with ``--config NAME.yaml`` read from the YAML block titled NAME.yaml."""
    argv = list(command.argv)
    if "--config" in argv:
        i = argv.index("--config") + 1
        if argv[i] in YAML_BLOCKS:
            path = tmp_path / argv[i]
            path.write_text(YAML_BLOCKS[argv[i]].text)
            argv[i] = str(path)
        else:
            assert (ROOT / argv[i]).is_file(), f"{command.where}: --config {argv[i]} is neither a file of the " \
                                               "repository nor a YAML block with that title"
            argv[i] = str(ROOT / argv[i])
    args, extra = build_parser().parse_known_args(argv)
    forwards = getattr(importlib.import_module(args._module), "FORWARDS_UNKNOWN_FLAGS", False)
    assert forwards or not extra, f"{command.where}: unrecognized arguments {extra}"
    cls = getattr(args, CONFIG_DEFAULT, None)
    if cls is None or not command.full:
        return args, extra, None
    trl_field = "trl" if forwards else None
    return args, extra, config_from_args(cls, args, parse_extra_flags(extra), extra_field=trl_field)


def test_docs_show_commands_and_yaml() -> None:
    """The checks below have something to check (a parser that found nothing would pass them all)."""
    assert len(COMMANDS) > 40 and len([c for c in COMMANDS if c.full]) > 25
    assert {c.argv[0] for c in COMMANDS} == set(SUBCOMMANDS), "every subcommand is shown at least once"
    assert "run.yaml" in YAML_BLOCKS


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.where}:{' '.join(c.argv[:2])}" for c in COMMANDS])
def test_docs_command_parses_into_its_config(command: Command, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(ROOT)  # --config recipes/... as a reader runs it from the repository root
    try:
        _parse(command, tmp_path)
    except (UsageError, GradlensError) as e:
        pytest.fail(f"{command.where}: gradlens {' '.join(command.argv)}: {e}")


def test_docs_trl_fields_shown_are_fields_of_trl_configs(tmp_path: Path, monkeypatch, capsys) -> None:
    """The TRL fields forwarded by the commands shown (flags and YAML) are fields of the regime's TRL config, with
    values TRL's own parser accepts."""
    from gradlens.training.settings import check_overrides

    monkeypatch.chdir(ROOT)
    checked = 0
    for command in (c for c in COMMANDS if c.full):
        config = _parse(command, tmp_path)[2]
        trl = {k: v for k, v in getattr(config, "trl", {}).items() if "$" not in str(v)}
        for regime in getattr(config, "regimes", [getattr(config, "regime", "sft")]):
            check_overrides(regime, trl)
            checked += len(trl)
    assert checked >= 5


@pytest.mark.parametrize("title", sorted(YAML_BLOCKS, key=str))
def test_docs_yaml_block_parses_into_the_config_of_its_command(title: str | None, tmp_path: Path, capsys) -> None:
    """Each YAML block is named (``title="NAME.yaml"``) and read by a command shown with ``--config NAME.yaml``, into
    whose config it parses."""
    block = YAML_BLOCKS[title]
    assert title, f"{block.where}: a YAML block needs a title=\"NAME.yaml\" naming the file a command reads"
    readers = [c for c in COMMANDS if c.full and title in c.argv]
    assert readers, f"{block.where}: no command shown reads {title} (--config {title})"
    (tmp_path / title).write_text(block.text)
    assert load_yaml(tmp_path / title), f"{block.where}: {title} is empty"
    for command in readers:
        _, _, config = _parse(command, tmp_path)
        assert config is not None
        for key, value in load_yaml(tmp_path / title).items():
            if key in {f.name for f in dataclasses.fields(config)}:
                flag = f"--{key}"
                assert flag in command.argv or getattr(config, key) == value, f"{block.where}: {key}"
            else:
                assert config.trl[key] == value, f"{block.where}: {key} should reach TRL"


def test_docs_linked_images_exist() -> None:
    images = [(page, target) for page in PAGES for target in IMAGE.findall(page.read_text())]
    assert len(images) >= 3
    missing = [f"{page.relative_to(ROOT)}: {target}" for page, target in images
               if not (page.parent / target).resolve().is_file()]
    assert not missing, missing


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_docs_cli_page_lists_exactly_the_help_flags(name: str) -> None:
    """Each generated page documents every flag ``--help`` prints and no other, a dataclass flag with its field's
    help text and default."""
    from gradlens.cli.reference import command_page, subcommand_parser

    parser = subcommand_parser(name)
    parsers = [parser, *(p for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                         for p in a.choices.values())]
    flags = {s for p in parsers for a in p._actions for s in a.option_strings if s not in ("-h", "--help")}
    rows = {}
    for line in command_page(name).splitlines():
        if line.startswith("| `--"):
            cells = [html.unescape(c.strip().replace("\\|", "|").replace("\\*", "*"))
                     for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows.update({flag: cells for flag in re.findall(r"`(--[\w-]+)`", cells[0])})
    assert set(rows) == flags
    cls = parser.get_default(CONFIG_DEFAULT)
    for field in dataclasses.fields(cls) if cls else []:
        if field.metadata.get("cli") is not False:
            assert rows[f"--{field.name}"][3] == field.metadata["help"], field.name
    if cls is not None:
        assert rows["--max_steps" if "max_steps" in rows else "--out"][2] != ""


def test_docs_toy_accuracy_table_is_what_toy_base_saved() -> None:
    """The Worlds page's table (greedy, sampled, pass@8 of each shipped preset) equals the ``gradlens toy base``
    report saved beside each shipped model, rounded as printed."""
    from gradlens.toy.model import shipped_model_path
    from gradlens.toy_base_report import DEFAULT_K, default_n, saved_base_report
    from gradlens.toy_presets import PRESETS

    rows = {m[1]: line for line in (ROOT / "docs" / "worlds.md").read_text().splitlines()
            if (m := re.match(r"\| `(\w+)` \|", line))}
    shipped = [p for p in PRESETS if shipped_model_path(p, 0) is not None]
    assert len(shipped) >= 3 and set(shipped) <= set(rows), f"every shipped preset has a row: {shipped}"
    for preset in shipped:
        greedy, sampled, pass_k = (float(cell) for cell in rows[preset].split("|")[5:8])
        saved = saved_base_report(shipped_model_path(preset, 0))
        assert (saved["n"], saved["k"]) == (default_n(preset), DEFAULT_K), preset
        assert (round(saved["greedy"], 3), round(saved["sampled"], 3), round(saved["pass_at_k"], 3)) == (
            greedy, sampled, pass_k), preset
