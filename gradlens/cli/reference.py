"""Each subcommand's reference page in Markdown, read from the parser that ``gradlens COMMAND --help`` prints.

The docs site's CLI pages are generated from here (by the MkDocs hook ``docs/hooks/cli_pages.py``) so they cannot
drift from ``--help``: both come from the config dataclasses' fields (type, default, help). Flags that no dataclass
declares (``--config``, ``info --verify``, ``toy base``'s) are described from their argparse action.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import types
import typing
from typing import Any

from gradlens.cli.dataclass_args import CONFIG_DEFAULT
from gradlens.cli.main import SUBCOMMANDS, build_parser

_TRL_NOTE = ("Any flag not listed here is a TRL `SFTConfig`/`GRPOConfig` field (`--num_generations 8`, "
             "`--beta 0.04`), typed by TRL's own parser; `--config` YAML may hold those fields too.")


def _type_name(tp: Any) -> str:
    """``int``, ``str | None``, ``list[str]``: an annotation as a reader writes it."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def _value(value: Any) -> str:
    """A default as it would be typed on the command line (lists space-separated, booleans as true/false)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return " ".join(_value(v) for v in value) if value else "(empty)"
    if value is None:
        return "none"
    return str(value) if str(value) else '""'


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell (no column breaks, no HTML tags, no emphasis)."""
    for raw, safe in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("|", "\\|"), ("*", "\\*"), ("\n", " ")):
        text = text.replace(raw, safe)
    return text


def _flag_names(action: argparse.Action) -> str:
    return " / ".join(f"`{s}`" for s in action.option_strings)


def _action_type(action: argparse.Action) -> str:
    if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction)):
        return "bool"
    name = getattr(action.type, "__name__", "str") if action.type is not None else "str"
    return f"list[{name}]" if action.nargs in ("+", "*") else name


def _flag_row(action: argparse.Action, config: type | None) -> str:
    """One table row: the field's annotation, default and help where a dataclass declares the flag."""
    fields = {f.name: f for f in dataclasses.fields(config)} if config else {}
    field = fields.get(action.dest)
    if field is not None:
        type_text = _type_name(typing.get_type_hints(config)[field.name])
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        help_text = str(field.metadata.get("help", ""))
    else:
        type_text, default, help_text = _action_type(action), action.default, str(action.help or "")
    if action.choices:
        type_text += ": " + ", ".join(f"`{c}`" for c in action.choices)
    shown_default = "required" if default == "" and "required" in help_text else f"`{_cell(_value(default))}`"
    return (f"| {_flag_names(action)} | {_cell(type_text)} | {shown_default} | "
            f"{_cell(help_text.replace('%%', '%'))} |")


def _section(parser: argparse.ArgumentParser, title: str, level: str) -> list[str]:
    """The description, arguments, flags and epilog of one (sub)parser."""
    config = parser.get_default(CONFIG_DEFAULT)
    lines = [f"{level} `{title}`", "", parser.description or "", ""]
    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    positionals = [a for a in actions if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]
    if positionals:
        lines += ["| argument | how many | help |", "|---|---|---|"]
        lines += [f"| `{a.metavar or a.dest}` | {'one or more' if a.nargs == '+' else 'one'} | {_cell(a.help or '')} |"
                  for a in positionals]
        lines.append("")
    flags = [a for a in actions if a.option_strings]
    if flags:
        lines += ["| flag | type | default | help |", "|---|---|---|---|"]
        lines += [_flag_row(a, config) for a in flags]
        lines.append("")
    if parser.epilog:
        lines += [parser.epilog, ""]
    for sub in (a for a in actions if isinstance(a, argparse._SubParsersAction)):
        for name, sub_parser in sub.choices.items():
            lines += _section(sub_parser, f"{title} {name}", level + "#")
    return lines


def command_page(name: str) -> str:
    """The Markdown page of ``gradlens NAME``."""
    parser = subcommand_parser(name)
    lines = _section(parser, f"gradlens {name}", "#")
    config = parser.get_default(CONFIG_DEFAULT)
    forwards = getattr(importlib.import_module(SUBCOMMANDS[name][0]), "FORWARDS_UNKNOWN_FLAGS", False)
    if forwards and "TRL" not in (parser.epilog or ""):
        lines += [_TRL_NOTE, ""]
    source = f"the `{config.__name__}` dataclass (`gradlens.config`)" if config else "its argparse definition"
    lines += [f"*Generated from {source} by `gradlens.cli.reference`, the same source as "
              f"`gradlens {name} --help`; do not edit by hand.*", ""]
    return "\n".join(lines)


def subcommand_parser(name: str) -> argparse.ArgumentParser:
    """The parser of ``gradlens NAME`` (what ``gradlens NAME --help`` prints)."""
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]
