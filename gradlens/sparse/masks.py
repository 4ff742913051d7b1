"""Placement masks: which entries of each LoRA B matrix train, the budget that sizes them, and their file format.

A :data:`Mask` maps each LoRA module name (as in ``Run.modules``, e.g. ``model.layers.0.self_attn.v_proj``) to a bool
``(d_out, r)`` array. On disk a mask is a safetensors file with one uint8 tensor per module and its provenance
(selector, budget, seed, source run) in the string metadata, so it loads without pickle and without torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import safetensors
import safetensors.numpy

from gradlens.budget import Shapes
from gradlens.errors import GradlensError
from gradlens.fsio import atomic_write, safetensors_header, safetensors_metadata
from gradlens.modules import ModuleSpec, sort_projections

Mask = dict[str, np.ndarray]
MASK_FORMAT = "1"
# Provenance every mask file carries; save_mask adds the format and the selected count itself.
REQUIRED_METADATA = ("selector", "budget", "scope", "seed", "source_run", "scoring_seconds")
SET_BY_SAVE = ("gradlens_mask_format", "k")
WHERE_COLUMNS = ["group", "key", "selected", "selected_share", "entries", "entry_share", "enrichment"]
# The adapter a mask was scored on (probe and select copy it from the recorded run's config): an entry B[i, c] pairs
# with row c of the frozen A, so a mask means something only for the rank and A seed it was scored with.
ADAPTER_METADATA = ("model", "lora_r", "lora_alpha", "lora_seed")


def shapes_of(specs: Iterable[ModuleSpec]) -> dict[str, tuple[int, int]]:
    """``{name: (d_out, r)}`` of modules such as ``Run.specs``: the adapter a mask must fit."""
    return {spec.name: spec.shape for spec in specs}


def specs_for(mask: Mapping[str, np.ndarray]) -> list[ModuleSpec]:
    """Module specs (projection type, layer) derived from a mask's names, for when no run is at hand."""
    return [ModuleSpec.from_name(name, np.shape(m)) for name, m in mask.items()]


def check_mask_fits(mask: Mapping[str, np.ndarray], shapes: Shapes, where: str = "mask") -> None:
    """Refuse a mask (or any per-module arrays) whose modules or shapes differ from the adapter's."""
    for name in shapes:
        if name not in mask:
            raise GradlensError(f"{where}: has no module {name} of the adapter ({len(mask)} modules, "
                                f"the adapter {len(shapes)})")
    for name, m in mask.items():
        if name not in shapes:
            raise GradlensError(f"{where}: module {name} is not in the adapter ({len(mask)} modules, "
                                f"the adapter {len(shapes)})")
        got, want = tuple(np.shape(m)), tuple(shapes[name])
        if got != want:
            raise GradlensError(f"{where}: module {name} has shape {got}, the adapter's is {want}")


def _int_entry(meta: Mapping[str, str], key: str, where: str) -> int | None:
    value = meta.get(key)
    if value is None or value == "null":
        return None
    try:
        return int(value)
    except ValueError:
        raise GradlensError(f"{where}: mask metadata {key} is {value!r}, not an integer") from None


def check_mask_adapter(meta: Mapping[str, str], adapter: Mapping[str, Any], where: str = "mask") -> list[str]:
    """Refuse a mask scored on a LoRA adapter of another rank or LoRA-A seed than ``adapter`` (``model``,
    ``lora_r``, ``lora_alpha``, ``lora_seed`` of the run about to train); return warnings for what only differs in
    name or scale (model, alpha) and for what the mask does not carry, so cannot be checked."""
    notes = []
    for key, flag, why in (("lora_r", "--lora_r", "B has another shape"),
                           ("lora_seed", "--seed", "each entry of B pairs with a row of the frozen A that seed drew")):
        got = _int_entry(meta, key, where)
        if got is not None and got != adapter[key]:
            raise GradlensError(f"{where}: the mask was scored on an adapter with {key}={got}, this run has {flag} "
                                f"{adapter[key]} ({why})")
    alpha = _int_entry(meta, "lora_alpha", where)
    if alpha is not None and alpha != adapter["lora_alpha"]:
        notes.append(f"{where}: the mask was scored with lora_alpha={alpha}, this run has {adapter['lora_alpha']} "
                     "(the same entries at another scale)")
    if meta.get("model") not in (None, "null") and meta["model"] != adapter["model"]:
        notes.append(f"{where}: the mask was scored on model {meta['model']!r}, this run trains {adapter['model']!r}")
    missing = [key for key in ADAPTER_METADATA if meta.get(key) in (None, "null")]
    if missing:
        notes.append(f"{where}: the mask does not record {', '.join(missing)} (written before gradlens stored them, "
                     "or scored on a run gradlens did not record): its LoRA rank and A seed cannot be checked")
    return notes


def save_mask(path: str | os.PathLike[str], mask: Mapping[str, np.ndarray], metadata: Mapping[str, Any]) -> Path:
    """Write a mask atomically as safetensors; ``metadata`` needs :data:`REQUIRED_METADATA` and may add more.

    String values are stored as they are, other values JSON-encoded; ``k`` (the selected count) and the format
    version are added here so they always describe the tensors actually written.
    """
    path = Path(path)
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise GradlensError(f"{path}: mask metadata lacks {', '.join(missing)}")
    reserved = [key for key in SET_BY_SAVE if key in metadata]
    if reserved:
        raise GradlensError(f"{path}: mask metadata may not set {', '.join(reserved)} (save_mask writes it)")
    if not mask:
        raise GradlensError(f"{path}: the mask has no modules")
    tensors = {}
    for name, m in mask.items():
        m = np.asarray(m)
        if m.dtype != np.bool_ or m.ndim != 2:
            raise GradlensError(f"{path}: mask of module {name} is {m.dtype} {m.shape}, not a 2-D bool array")
        tensors[name] = m.astype(np.uint8)
    meta = safetensors_metadata(metadata, path, "mask")
    meta.update(gradlens_mask_format=MASK_FORMAT, k=str(sum(int(t.sum()) for t in tensors.values())))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: safetensors.numpy.save_file(tensors, tmp, metadata=meta))
    return path


def load_mask(path: str | os.PathLike[str]) -> tuple[Mask, dict[str, str]]:
    """Read a mask written by :func:`save_mask`; returns the bool arrays and the metadata strings as stored.

    The framing is validated before any tensor is read, so a truncated file or a foreign one (a pickle) is refused
    without deserialising it.
    """
    path = Path(path)
    header = safetensors_header(path, "mask")
    meta = header.get("__metadata__", {})
    if meta.get("gradlens_mask_format") != MASK_FORMAT:
        raise GradlensError(f"{path}: not a gradlens mask (gradlens_mask_format is "
                            f"{meta.get('gradlens_mask_format')!r}, expected {MASK_FORMAT!r})")
    names = [key for key in header if key != "__metadata__"]
    if not names:
        raise GradlensError(f"{path}: the mask has no modules")
    for name in names:
        info = header[name]
        if info["dtype"] != "U8" or not isinstance(info["shape"], list) or len(info["shape"]) != 2:
            raise GradlensError(f"{path}: tensor {name!r} is {info['dtype']} {info['shape']}, not a 2-D U8 mask")
    try:
        tensors = safetensors.numpy.load_file(path)
    except (OSError, safetensors.SafetensorError, TypeError, ValueError) as e:
        raise GradlensError(f"{path}: cannot read mask ({e})") from None
    mask = {}
    for name in names:
        t = tensors[name]
        if t.max(initial=0) > 1:
            raise GradlensError(f"{path}: module {name} holds values other than 0 and 1")
        mask[name] = t.astype(bool)
    k = sum(int(m.sum()) for m in mask.values())
    if meta.get("k") != str(k):
        raise GradlensError(f"{path}: metadata says k={meta.get('k')!r} but the mask selects {k} entries")
    return mask, dict(meta)


def where_table(mask: Mapping[str, np.ndarray], specs: Iterable[ModuleSpec] | None = None) -> pd.DataFrame:
    """Where the selected entries sit, per projection type (``group="proj"``) and per layer (``group="layer"``).

    ``enrichment = selected_share / entry_share``: above 1, the selector favours that group beyond its size.
    Specs default to :func:`specs_for` (proj and layer parsed from the names); a module without a layer is
    keyed ``"none"``.
    """
    specs = specs_for(mask) if specs is None else list(specs)
    check_mask_fits(mask, shapes_of(specs))
    key_of = {"proj": lambda s: s.proj, "layer": lambda s: "none" if s.layer is None else str(s.layer)}
    layers = sorted({s.layer for s in specs if s.layer is not None})
    keys = {"proj": sort_projections(list(dict.fromkeys(s.proj for s in specs))),
            "layer": [str(layer) for layer in layers] + (["none"] if any(s.layer is None for s in specs) else [])}
    selected = {s.name: int(np.count_nonzero(mask[s.name])) for s in specs}
    rows = []
    for group, group_keys in keys.items():
        for key in group_keys:
            members = [s for s in specs if key_of[group](s) == key]
            rows.append({"group": group, "key": key, "selected": sum(selected[s.name] for s in members),
                         "entries": sum(s.size for s in members)})
    table = pd.DataFrame(rows)
    n_selected = sum(selected.values())
    table["selected_share"] = table["selected"] / n_selected if n_selected else np.nan
    table["entry_share"] = table["entries"] / sum(s.size for s in specs)
    table["enrichment"] = table["selected_share"] / table["entry_share"]
    return table[WHERE_COLUMNS]
