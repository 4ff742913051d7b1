"""The placement problem: with A frozen and a budget of k trainable LoRA-B entries, which k should train?

:mod:`gradlens.budget` sizes a mask (a leaf, so configs check ``--budgets`` early); :mod:`.selectors` the
informed selectors and random baselines; :mod:`.run_masks` masks from a recorded run's accumulators, one file per
selector and budget; :mod:`.probe` the short recorded run that scores entries; :mod:`.diagnose` whether random
placement will do. The masks themselves (type, file format, sparse-B training and export) are :mod:`gradlens.sparse`.
Every name loads on first use, so importing this package (or :mod:`gradlens.budget` alone) imports neither numpy nor
torch.
"""

from gradlens.lazy import lazy_exports

_LAZY = {
    "SCOPES": "gradlens.budget", "Budget": "gradlens.budget",
    "DEFAULT_PROJECTIONS": "gradlens.placement.selectors", "INFORMED": "gradlens.placement.selectors",
    "SELECTORS": "gradlens.placement.selectors", "scores": "gradlens.placement.selectors",
    "select": "gradlens.placement.selectors", "select_masks": "gradlens.placement.run_masks",
    "write_masks": "gradlens.placement.run_masks", "ProbeResult": "gradlens.placement.probe",
    "probe": "gradlens.placement.probe",
}

__all__ = list(_LAZY)


__getattr__ = lazy_exports(__name__, _LAZY)
