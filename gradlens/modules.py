"""The one vocabulary of LoRA module names: where a module sits (layer), what role it plays (projection label),
and the one rule by which ``--modules`` and the ``modules`` selector match names.

Llama, Qwen2/3, Mistral and Gemma projections get short labels (``v_proj`` -> ``v``). Any other linear layer is
labelled by its parent and its own name (GPT-2's ``attn.c_proj`` and ``mlp.c_proj``), so a label always names one
role and tables never merge two.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gradlens.errors import GradlensError

# Projection name -> label, in the order of a Llama/Qwen2-style decoder layer.
PROJECTIONS: dict[str, str] = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate",
                               "up_proj": "up", "down_proj": "down"}
ALL_PROJECTIONS: tuple[str, ...] = tuple(PROJECTIONS)
PROJ_ORDER: tuple[str, ...] = tuple(PROJECTIONS.values())
LAYER_CONTAINERS = ("layers", "layer", "h", "blocks")

ModuleFilter = Sequence[str] | Callable[[str], bool] | None


def proj_label(name: str) -> str:
    """The role label of a module name: ``v`` for ``...self_attn.v_proj``, ``mlp.c_proj`` for GPT-2's MLP output."""
    parts = name.split(".")
    if parts[-1] in PROJECTIONS:
        return PROJECTIONS[parts[-1]]
    if len(parts) >= 2 and not parts[-2].isdigit():
        return f"{parts[-2]}.{parts[-1]}"
    return parts[-1]


def layer_index(name: str) -> int | None:
    """The decoder layer a module name sits in (``model.layers.3.mlp.up_proj`` -> 3), or None."""
    parts = name.split(".")
    return next((int(nxt) for part, nxt in zip(parts, parts[1:], strict=False)
                 if part in LAYER_CONTAINERS and nxt.isdigit()), None)


def sort_projections(labels: Sequence[str]) -> list[str]:
    """Labels in decoder-layer order (q k v o gate up down), any others after them alphabetically."""
    return sorted(labels, key=lambda p: (PROJ_ORDER.index(p) if p in PROJ_ORDER else len(PROJ_ORDER), p))


@dataclass(frozen=True)
class ModuleSpec:
    """One recorded LoRA-B weight: its name, its ``(d_out, r)`` shape and where it sits in the model."""

    name: str
    shape: tuple[int, int]
    proj: str
    layer: int | None

    @classmethod
    def from_name(cls, name: str, shape: Sequence[int]) -> ModuleSpec:
        """Derive ``proj`` and ``layer`` from a dotted module name such as ``model.layers.3.mlp.up_proj``."""
        if len(shape) != 2:
            raise GradlensError(f"{name}: lora_B shape {tuple(shape)} is not (d_out, r)")
        d_out, r = (int(n) for n in shape)
        return cls(name=name, shape=(d_out, r), proj=proj_label(name), layer=layer_index(name))

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]


def _matches(term: str, name: str) -> bool:
    return term == name or name.endswith("." + term) or term == proj_label(name)


def match_modules(names: Sequence[str], wanted: ModuleFilter) -> list[str]:
    """The names a filter keeps, in their order: ``None`` (all), a callable, or terms.

    A term is a full module name, a dotted suffix (``mlp.c_proj``, ``layers.3.self_attn.v_proj``), a projection
    name (``v_proj``) or a label (``v``). A term that matches nothing, or that names two roles (GPT-2's ``c_proj``
    is ``attn.c_proj`` and ``mlp.c_proj``), is an error naming the choices.
    """
    if wanted is None:
        return list(names)
    if callable(wanted):
        return [n for n in names if wanted(n)]
    terms = [wanted] if isinstance(wanted, str) else list(wanted)
    labels = sort_projections(list(dict.fromkeys(proj_label(n) for n in names)))
    for term in terms:
        roles = sorted({proj_label(n) for n in names if _matches(term, n)})
        if not roles:
            raise GradlensError(f"module filter {term!r} matches none of the {len(names)} LoRA modules; their roles "
                                f"are: {', '.join(labels)}")
        if len(roles) > 1 and "." not in term and term not in roles:
            raise GradlensError(f"module filter {term!r} names {len(roles)} roles ({', '.join(roles)}); "
                                "give the one you mean")
    return [n for n in names if any(_matches(t, n) for t in terms)]
