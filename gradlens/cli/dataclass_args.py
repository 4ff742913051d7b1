"""Dataclass configs on the command line: one flag per field (help from field metadata), plus ``--config x.yaml``.

Precedence: the dataclass defaults, then the YAML file, then flags given on the command line. Flags that no field
claims (``--num_generations 8``) are collected as ``key -> value`` pairs for commands that forward them (to TRL).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import types
import typing
from pathlib import Path
from typing import Any

from gradlens.errors import GradlensError

# The parser default naming a subcommand's config dataclass (``parser.get_default(CONFIG_DEFAULT)``), so the docs
# pages and the docs tests reach the fields a command's flags come from.
CONFIG_DEFAULT = "_config"


@functools.cache
def _yaml_loader() -> type:
    """PyYAML's SafeLoader, except that exponent floats without a dot (``1e-4``, ``3E5``) load as floats, not strings.

    PyYAML follows YAML 1.1, where ``1e-4`` is a string; learning rates are written that way on command lines.
    """
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    exponent_float = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", exponent_float, list("-+0123456789"))
    return Loader


def _scalar_type(tp: Any) -> tuple[Any, bool]:
    """(element type, is_list) of a field annotation, unwrapping ``X | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _scalar_type(args[0]) if len(args) == 1 else (str, False)
    if origin in (list, tuple):
        return (typing.get_args(tp) or (str,))[0], True
    if origin is typing.Literal:
        return type(typing.get_args(tp)[0]), False
    return tp, False


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--field`` per dataclass field, with no argparse default, so only explicitly given flags are set."""
    hints = typing.get_type_hints(cls)
    takes_trl = any(f.name == "trl" for f in dataclasses.fields(cls))  # the commands that forward TRL fields
    parser.add_argument("--config", type=Path, default=None, metavar="YAML",
                        help="YAML file of settings: any flag below" + (
                            ", and any TRL SFTConfig/GRPOConfig field" if takes_trl else ""))
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli") is False:
            continue
        tp, is_list = _scalar_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = str(f.metadata.get("help", ""))
        if not re.search(r"\b(default|required)\b", help_text):  # the help may already say it
            help_text += f" (default: {default})"
        help_text = help_text.replace("%", "%%")  # argparse %-formats help strings
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = tp if tp in (int, float, str, Path) else str
            if is_list:
                kwargs["nargs"] = "+"
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(f"--{f.name}", **kwargs)
    parser.set_defaults(**{CONFIG_DEFAULT: cls})


def parse_extra_flags(extra: list[str]) -> dict[str, Any]:
    """``['--beta', '0.04', '--report_to', 'wandb', 'tensorboard', '--bf16']`` -> ``{'beta': '0.04', 'report_to':
    ['wandb', 'tensorboard'], 'bf16': 'true'}``: the values as typed, one string or a list of several, for the TRL
    parser to type (:mod:`gradlens.training.trl_fields`); a flag without a value is ``true``."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(extra):
        token = extra[i]
        if not token.startswith("--") or len(token) < 3:
            raise GradlensError(f"unexpected argument {token!r}")
        key, eq, value = token[2:].partition("=")
        values = [value] if eq else []
        while not eq and i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            values.append(extra[i + 1])
            i += 1
        out[key.replace("-", "_")] = values[0] if len(values) == 1 else values or "true"
        i += 1
    return out


def load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.load(Path(path).read_text(), Loader=_yaml_loader())
    except FileNotFoundError:
        raise GradlensError(f"config file {path} does not exist") from None
    except (OSError, yaml.YAMLError) as e:
        raise GradlensError(f"cannot read config file {path}: {e}".splitlines()[0]) from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise GradlensError(f"config file {path}: expected a mapping of settings, got {type(data).__name__}")
    return data


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}
_IS_TYPE: dict[Any, Any] = {bool: lambda v: isinstance(v, bool),
                            int: lambda v: isinstance(v, int) and not isinstance(v, bool),
                            float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                            str: lambda v: isinstance(v, str), Path: lambda v: isinstance(v, str)}


def _scalar_of(name: str, tp: Any, value: Any, where: str) -> Any:
    """One YAML scalar checked against the field's element type; a number in a text field becomes its text."""
    if tp in (str, Path) and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not _IS_TYPE.get(tp, lambda v: True)(value):
        raise GradlensError(f"{where}: {name} must be {_TYPE_NAMES.get(tp, tp)}, got {value!r}")
    return float(value) if tp is float else value


def _typed(name: str, hint: Any, value: Any, where: str) -> Any:
    """A YAML value checked against the field's annotation, so a wrong type fails here, naming the setting, instead
    of deep inside a run (YAML has no schema: ``lags: 1.5`` or ``modules: v_proj`` would otherwise get through)."""
    if value is None and type(None) in typing.get_args(hint):
        return None
    if hint is dict or typing.get_origin(hint) is dict:
        if not isinstance(value, dict):
            raise GradlensError(f"{where}: {name} must be a mapping, got {value!r}")
        return value
    tp, is_list = _scalar_type(hint)
    if is_list:
        if not isinstance(value, list):
            raise GradlensError(f"{where}: {name} must be a list of {_TYPE_NAMES.get(tp, tp)}s, got {value!r}")
        return [_scalar_of(name, tp, v, where) for v in value]
    return _scalar_of(name, tp, value, where)


def config_from_args(cls: type, args: argparse.Namespace, extra: dict[str, Any] | None = None,
                     *, extra_field: str | None = None) -> Any:
    """Build ``cls`` from YAML (``args.config``) and explicit flags; unknown keys go to ``extra_field`` or fail."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    values: dict[str, Any] = load_yaml(args.config) if getattr(args, "config", None) else {}
    hints = typing.get_type_hints(cls)
    values = {k: _typed(k, hints[k], v, f"config file {args.config}") if k in names else v for k, v in values.items()}
    leftovers = {k: values.pop(k) for k in list(values) if k not in names}
    values.update({k: v for k, v in vars(args).items() if k in names})
    leftovers.update(extra or {})
    if leftovers:
        if extra_field is None:
            raise GradlensError(f"unknown setting(s): {', '.join(sorted(leftovers))}")
        values[extra_field] = {**values.get(extra_field, {}), **leftovers}
    try:
        config = cls(**values)
    except (TypeError, ValueError) as e:
        raise GradlensError(str(e)) from e
    if values.get("dtype", "auto") != "auto" and "storage_dtype" in names:  # the one flag whose meaning changed
        print(f"gradlens: dtype {config.dtype} is the model's dtype, as TRL's --dtype (before gradlens 0.2 it set the "
              f"shard storage dtype, which is --storage_dtype now: {config.storage_dtype})")
    return config
