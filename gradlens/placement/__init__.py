"""The placement problem: with A frozen and a budget of k trainable LoRA-B entries, which k should train?

:mod:`.masks` holds the budget, the mask type, its file format and where a mask's entries sit; :mod:`.selectors`
the informed selectors and random baselines; :mod:`.probe` the short recorded run that scores entries;
:mod:`.sparse` sparse-B training and PEFT export. Importing this package does not import torch: the names of
:mod:`.sparse` and :mod:`.probe` load on first use.
"""

import importlib
from typing import Any

from gradlens.placement.masks import (
    REQUIRED_METADATA,
    SCOPES,
    Budget,
    Mask,
    check_mask_fits,
    load_mask,
    save_mask,
    shapes_of,
    specs_for,
    where_table,
)
from gradlens.placement.selectors import DEFAULT_PROJECTIONS, INFORMED, SELECTORS, scores, select

_LAZY = {
    "SparseB": "gradlens.placement.sparse", "SparseBCallback": "gradlens.placement.sparse",
    "apply_mask": "gradlens.placement.sparse", "export_adapter": "gradlens.placement.sparse",
    "shira_mask_fn": "gradlens.placement.sparse",
    "ProbeResult": "gradlens.placement.probe",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gradlens.placement' has no attribute {name!r}")


__all__ = [*_LAZY,
    "DEFAULT_PROJECTIONS",
    "INFORMED",
    "REQUIRED_METADATA",
    "SCOPES",
    "SELECTORS",
    "Budget",
    "Mask",
    "check_mask_fits",
    "load_mask",
    "save_mask",
    "scores",
    "select",
    "shapes_of",
    "specs_for",
    "where_table",
]
