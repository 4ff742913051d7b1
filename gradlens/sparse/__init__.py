"""Sparse-B adapters: with A frozen, a placement mask says which entries of B train.

:mod:`.masks` (the mask type, its file format, the checks that a mask fits an adapter, where its entries sit),
:mod:`.hooks` (the gradient hooks that train only the mask's entries), :mod:`.callback` (the same in any Trainer),
:mod:`.export` (a trained sparse adapter as a standard PEFT adapter) and :mod:`.shira` (the mask as a SHiRA support).
Which entries a mask should hold is the question of :mod:`gradlens.placement`. Names load on first use.
"""

from gradlens.lazy import lazy_exports

_LAZY = {
    "Mask": "gradlens.sparse.masks", "REQUIRED_METADATA": "gradlens.sparse.masks",
    "check_mask_fits": "gradlens.sparse.masks", "load_mask": "gradlens.sparse.masks",
    "save_mask": "gradlens.sparse.masks", "shapes_of": "gradlens.sparse.masks", "specs_for": "gradlens.sparse.masks",
    "where_table": "gradlens.sparse.masks", "SparseB": "gradlens.sparse.hooks", "apply_mask": "gradlens.sparse.hooks",
    "SparseBCallback": "gradlens.sparse.callback", "MASK_FILE": "gradlens.sparse.export",
    "export_adapter": "gradlens.sparse.export", "shira_mask_fn": "gradlens.sparse.shira",
}

__all__ = list(_LAZY)


__getattr__ = lazy_exports(__name__, _LAZY)
