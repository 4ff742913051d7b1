"""Budgets of the placement problem: how many entries may train, as a count or a share, globally or per module.

The entries are those of the space placed over: LoRA's B (``d_out x r`` per module) or, with ``--space weight``, the
base weights W (``d_out x d_in``); a budget only sees the shapes it is given, so it counts either alike. A leaf (no
numpy, no torch), so command configs can validate ``--budgets`` at parse time.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gradlens.errors import GradlensError

SCOPES: tuple[str, ...] = ("global", "per_module")
Shapes = Mapping[str, tuple[int, int]]


def entry_counts(shapes: Shapes) -> dict[str, int]:
    """Entry count of each module, refusing an empty adapter or a non-positive dimension."""
    if not shapes:
        raise GradlensError("placement: the adapter has no modules")
    sizes = {}
    for name, shape in shapes.items():
        if len(shape) != 2 or min(int(d) for d in shape) < 1:
            raise GradlensError(f"placement: module {name} has shape {tuple(shape)}, not a positive (d_out, r) or "
                                "(d_out, d_in)")
        sizes[name] = int(shape[0]) * int(shape[1])
    return sizes


def _round(x: float) -> int:
    """Round half up, so a budget resolves the same way whatever the parity of the count (unlike ``round``)."""
    return math.floor(x + 0.5)


def _largest_remainder(k: int, sizes: dict[str, int]) -> dict[str, int]:
    """Split ``k`` in proportion to ``sizes`` so the parts sum to exactly ``k`` (ties: earlier module first).

    Integer arithmetic throughout, so the floors and remainders are exact whatever the adapter size.
    """
    total = sum(sizes.values())
    counts = {name: k * size // total for name, size in sizes.items()}
    names = list(sizes)
    by_remainder = sorted(range(len(names)), key=lambda i: -(k * sizes[names[i]] % total))
    for i in by_remainder[: k - sum(counts.values())]:
        counts[names[i]] += 1
    return counts


def _budget_problem(k: Any, fraction: Any, scope: Any) -> str | None:
    if (k is None) == (fraction is None):
        return f"give exactly one of k and fraction (got k={k!r}, fraction={fraction!r})"
    if k is not None and (isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1):
        return f"k must be an integer >= 1, got {k!r}"
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, numbers.Real)
                                 or not 0 < fraction <= 1):
        return f"fraction must be in (0, 1], got {fraction!r}"
    if scope not in SCOPES:
        return f"scope {scope!r} is not one of {', '.join(SCOPES)}"
    return None


@dataclass(frozen=True)
class Budget:
    """How many B entries may train: a count ``k`` or a ``fraction`` of the entries.

    ``scope="global"`` ranks the whole adapter at once (the selector decides where the entries go);
    ``"per_module"`` gives every matrix the same share, so only the positions inside each matrix are chosen.
    """

    k: int | None = None
    fraction: float | None = None
    scope: str = "global"

    def __post_init__(self) -> None:
        problem = _budget_problem(self.k, self.fraction, self.scope)
        if problem:
            raise GradlensError(f"budget: {problem}")
        if self.k is not None:
            object.__setattr__(self, "k", int(self.k))
        else:
            object.__setattr__(self, "fraction", float(self.fraction))

    @classmethod
    def parse(cls, text: str, scope: str = "global") -> Budget:
        """Read a ``--budget`` value: ``"1%"``, ``"0.5%"`` (percentages), ``"0.01"`` (a decimal below 1 is a
        fraction) or ``"500"``/``"k=500"`` (a count, the form ``str`` writes)."""
        s = text.strip()
        count = s.removeprefix("k=")
        try:
            if s.endswith("%"):
                kw: dict[str, Any] = {"fraction": float(s[:-1]) / 100}
            elif count.isdigit():
                kw = {"k": int(count)}
            elif 0 < float(s) < 1:
                kw = {"fraction": float(s)}
            else:
                raise ValueError
        except ValueError:
            raise GradlensError(f"budget {text!r}: not a count ('500'), a fraction below 1 ('0.01') "
                                "or a percentage ('1%')") from None
        problem = _budget_problem(kw.get("k"), kw.get("fraction"), scope)
        if problem:
            raise GradlensError(f"budget {text!r}: {problem}")
        return cls(**kw, scope=scope)

    def __str__(self) -> str:
        """The label used in tables and mask files: ``"1%"``, ``"0.5%"`` or ``"k=500"`` (``parse`` reads it back)."""
        return f"k={self.k}" if self.k is not None else f"{self.fraction * 100:g}%"

    def counts(self, shapes: Shapes) -> int | dict[str, int]:
        """Resolve against an adapter: the total count (global) or each module's count (per_module).

        A fraction rounds half up and never resolves to 0 (globally, or in any module); a count under per_module
        is split in proportion to module size with largest-remainder rounding, so the parts sum to exactly ``k``.
        """
        sizes = entry_counts(shapes)
        total = sum(sizes.values())
        if self.k is not None and self.k > total:
            raise GradlensError(f"budget k={self.k} exceeds the adapter's {total} B entries (W entries in space "
                                "weight)")
        if self.scope == "global":
            return self.k if self.k is not None else max(1, _round(self.fraction * total))
        if self.fraction is not None:
            return {name: max(1, _round(self.fraction * size)) for name, size in sizes.items()}
        return _largest_remainder(self.k, sizes)
