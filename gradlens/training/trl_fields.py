"""TRL fields typed as TRL types them: every ``SFTConfig``/``GRPOConfig`` field a user sets (a command-line string or a
YAML value) is parsed by ``HfArgumentParser`` on the regime's config class, the parser TRL's own scripts use, so
``--max_grad_norm abc``, ``--bf16 maybe`` or ``--per_device_train_batch_size 2.5`` are one-line errors naming the
field and the expected type before anything loads, never tracebacks from inside training.

Two departures from a plain ``HfArgumentParser``: a field whose declared type includes a list (``report_to``) takes
several values, each parsed alone; ``none``/``null`` set an optional non-text field to None. Mappings (the
``*_kwargs`` fields) pass through as given. The reporters named in ``report_to`` must be installed: transformers
would otherwise fail with a traceback when the Trainer is built.
"""

from __future__ import annotations

import functools
import re
import types
import typing
from collections.abc import Mapping
from typing import Any

from gradlens.errors import GradlensError

_NONE_WORDS = ("none", "null")


@functools.cache
def _parser(config_class: type) -> Any:
    """An ``HfArgumentParser`` over ``config_class`` whose errors are :class:`GradlensError` (argparse would print
    its usage and exit)."""
    from transformers import HfArgumentParser

    class OneLineParser(HfArgumentParser):
        def error(self, message: str) -> typing.NoReturn:
            raise GradlensError(message)

    return OneLineParser(config_class)


@functools.cache
def _shapes(config_class: type) -> dict[str, tuple[bool, bool, bool]]:
    """``field -> (takes a list, may be None, is text)`` from the declared types."""
    out = {}
    for name, hint in typing.get_type_hints(config_class).items():
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        is_list = any(typing.get_origin(a) is list for a in args)
        out[name] = (is_list, type(None) in args, str in args or hint is str)
    return out


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _parse_one(config_class: type, name: str, value: Any) -> Any:
    is_list, optional, is_text = _shapes(config_class).get(name, (False, False, False))
    text = _text(value)
    if optional and not is_text and text.lower() in _NONE_WORDS:
        return None
    try:
        parsed = getattr(_parser(config_class).parse_args([f"--{name}", text]), name)
    except GradlensError as e:
        reason = re.sub(r"^argument [^:]*: ", "", str(e))
        raise GradlensError(f"{config_class.__name__} field {name}: {reason}") from None
    return parsed[0] if isinstance(parsed, list) and len(parsed) == 1 else parsed


def typed_trl_fields(config_class: type, fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` with every value parsed to its declared type (see the module docstring); an unknown field, a value
    of the wrong type or several values for a one-value field is a one-line error."""
    known = set(_shapes(config_class))
    unknown = sorted(set(fields) - known)
    if unknown:
        raise GradlensError(f"unknown {config_class.__name__} field(s): {', '.join(unknown)}")
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if value is None or isinstance(value, Mapping):
            out[name] = value
            continue
        values = list(value) if isinstance(value, list | tuple) else [value]
        is_list = _shapes(config_class)[name][0]
        if len(values) != 1 and not is_list:
            raise GradlensError(f"{config_class.__name__} field {name} takes one value, got {len(values)}: "
                                f"{' '.join(map(_text, values))}")
        parsed = [_parse_one(config_class, name, v) for v in values]
        out[name] = parsed if is_list and (len(parsed) > 1 or isinstance(value, list | tuple)) else parsed[0]
    return out


def check_reporters(report_to: Any) -> None:
    """``report_to`` names only installed reporters, and ``none`` stands alone."""
    from transformers.integrations import get_available_reporting_integrations

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if "none" in names and len(names) > 1:
        raise GradlensError(f"report_to none cannot be combined with other reporters (got {' '.join(names)})")
    available = set(get_available_reporting_integrations())
    for name in names:
        if name not in ("none", "all") and name not in available:
            raise GradlensError(f"report_to {name}: the {name} package is not installed (pip install "
                                f"{name.replace('_', '-')}), or choose another reporter")
