"""The placement problem: with A frozen and a budget of k trainable LoRA-B entries, which k should train?

:mod:`.budget` sizes a mask (a leaf, so configs check ``--budgets`` early); :mod:`.masks` holds the mask type, its
file format and where a mask's entries sit; :mod:`.selectors` the informed selectors and random baselines;
:mod:`.probe` the short recorded run that scores entries; :mod:`.select` masks from a recorded run;
:mod:`.sparse` sparse-B training and PEFT export. Every name loads on first use, so importing this package (or
:mod:`.budget` alone) imports neither numpy nor torch.
"""

import importlib
from typing import Any

_LAZY = {
    "SCOPES": "gradlens.budget", "Budget": "gradlens.budget",
    "REQUIRED_METADATA": "gradlens.placement.masks", "Mask": "gradlens.placement.masks",
    "check_mask_fits": "gradlens.placement.masks", "load_mask": "gradlens.placement.masks",
    "save_mask": "gradlens.placement.masks", "shapes_of": "gradlens.placement.masks",
    "specs_for": "gradlens.placement.masks", "where_table": "gradlens.placement.masks",
    "DEFAULT_PROJECTIONS": "gradlens.placement.selectors", "INFORMED": "gradlens.placement.selectors",
    "SELECTORS": "gradlens.placement.selectors", "scores": "gradlens.placement.selectors",
    "select": "gradlens.placement.selectors",
    "SparseB": "gradlens.placement.sparse", "SparseBCallback": "gradlens.placement.sparse",
    "apply_mask": "gradlens.placement.sparse", "export_adapter": "gradlens.placement.sparse",
    "shira_mask_fn": "gradlens.placement.sparse",
    "ProbeResult": "gradlens.placement.probe",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gradlens.placement' has no attribute {name!r}")
