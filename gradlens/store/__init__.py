"""The on-disk store of recorded LoRA-B gradients: :mod:`.format` (the run-directory format), :mod:`.writer`
(``RunWriter``, ``AsyncRunWriter``) and :mod:`.reader` (``open_run``, ``Run``). Names load on first use, so
reading a run (:mod:`.reader`) never imports torch unless a bf16 shard needs it."""

from gradlens.lazy import lazy_exports

_LAZY = {
    "ModuleSpec": "gradlens.modules", "Accumulators": "gradlens.stats.streaming",
    "ModuleAccumulator": "gradlens.stats.streaming", "DTYPES": "gradlens.store.format",
    "MANIFEST": "gradlens.store.format", "Manifest": "gradlens.store.format",
    "writer_leftovers_only": "gradlens.store.format", "verify_run": "gradlens.store.reader",
    "Run": "gradlens.store.reader", "open_run": "gradlens.store.reader", "AsyncRunWriter": "gradlens.store.background",
    "RunWriter": "gradlens.store.writer", "default_steps_per_shard": "gradlens.store.writer",
}

__all__ = list(_LAZY)


__getattr__ = lazy_exports(__name__, _LAZY)
