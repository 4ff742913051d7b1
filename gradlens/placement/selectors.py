"""Selectors for the placement problem: with A frozen and a budget of k trainable B entries, which k?

Informed selectors rank entries by a score from the run's float64 accumulators (no raw shard is read):

- ``magnitude``: ``|sum_t g_t|``, the size of the summed (mean) gradient;
- ``fisher``: ``sum_t g_t^2``, the empirical Fisher diagonal (FISH-mask style);
- ``sign``: sign consistency ``|sum_t sign(g_t)| / T``, ties within one consistency level broken by magnitude;
- ``sign_magnitude``: consistency times the mean absolute gradient ``sum_t |g_t| / T``.

Baselines: ``random`` (uniform), ``random_matched`` (uniform inside each module, with a reference mask's per-module
counts, so it isolates *where within* a matrix from *which* matrices) and ``modules`` (uniform over chosen
projection types). Every selector returns exactly the budget's count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from gradlens.budget import Budget, Shapes, entry_counts
from gradlens.config import INFORMED_METHODS, PLACEMENT_METHODS
from gradlens.errors import GradlensError
from gradlens.modules import match_modules
from gradlens.sparse.masks import Mask, check_mask_fits

if TYPE_CHECKING:
    from gradlens.store import Accumulators

SELECTORS = PLACEMENT_METHODS
INFORMED = INFORMED_METHODS
DEFAULT_PROJECTIONS = ("v_proj", "o_proj", "down_proj")


def scores(method: str, accumulators: Accumulators) -> dict[str, np.ndarray]:
    """Float64 ``(d_out, r)`` scores of one informed selector, per module; higher means train it first.

    ``sign`` adds ``0.5 / T * |sum g| / max |sum g|`` (max over the adapter) to the consistency. Consistency levels
    are multiples of ``1 / T``, and the added term stays within ``[0, 0.5 / T]``, so it orders entries of one level by
    magnitude without ever lifting one above a higher level. That needs one T for all modules, as a run has.
    """
    if method not in INFORMED:
        raise GradlensError(f"selector {method!r} has no scores; the informed selectors are {', '.join(INFORMED)}")
    where = accumulators.path
    if not accumulators.modules:
        raise GradlensError(f"{where}: the accumulators hold no modules")
    for name, acc in accumulators.modules.items():
        if acc.count <= 0:
            raise GradlensError(f"{where}: the run has no recorded (finite) steps for module {name}; "
                                f"selector {method!r} needs gradient statistics")
    mods = accumulators.modules
    if method == "magnitude":
        return {name: np.abs(np.asarray(acc.sum, np.float64)) for name, acc in mods.items()}
    if method == "fisher":
        return {name: np.array(acc.sumsq, np.float64) for name, acc in mods.items()}
    if method == "sign_magnitude":
        return {name: np.abs(np.asarray(acc.sumsign, np.float64)) * np.asarray(acc.sumabs, np.float64) / acc.count**2
                for name, acc in mods.items()}
    counts = sorted({acc.count for acc in mods.values()})
    if len(counts) > 1:
        raise GradlensError(f"{where}: selector 'sign' needs one step count for all modules, found {counts[:5]}")
    t = counts[0]
    magnitude = {name: np.abs(np.asarray(acc.sum, np.float64)) for name, acc in mods.items()}
    top = max(float(m.max()) for m in magnitude.values())
    tie = 0.5 / t / top if top > 0 else 0.0
    return {name: np.abs(np.asarray(acc.sumsign, np.float64)) / t + tie * magnitude[name]
            for name, acc in mods.items()}


def _top_k(flat: np.ndarray, k: int) -> np.ndarray:
    """Bool mask of the k largest entries; among entries equal to the k-th largest, the lower index wins.

    One selection (``np.partition``) finds the k-th largest value; the tie rule makes the result a function of the
    scores alone, not of the selection algorithm's internal order.
    """
    n = flat.size
    if k == 0:
        return np.zeros(n, bool)
    kth = np.partition(flat, n - k)[n - k]
    out = flat > kth
    out[np.flatnonzero(flat == kth)[: k - int(np.count_nonzero(out))]] = True
    return out


def _split(flat: np.ndarray, shapes: Shapes) -> Mask:
    """Views of one flat array as per-module ``(d_out, r)`` arrays, in ``shapes`` order."""
    ends = np.cumsum([d * r for d, r in shapes.values()])
    return {name: part.reshape(shape) for (name, shape), part in zip(shapes.items(), np.split(flat, ends[:-1]),
                                                                     strict=True)}


def _random_global(k: int, shapes: Shapes, rng: np.random.Generator) -> Mask:
    flat = np.zeros(sum(entry_counts(shapes).values()), bool)
    flat[rng.choice(flat.size, size=k, replace=False)] = True
    return _split(flat, shapes)


def _random_per_module(counts: Mapping[str, int], shapes: Shapes, rng: np.random.Generator) -> Mask:
    mask = {}
    for name, (d, r) in shapes.items():
        flat = np.zeros(d * r, bool)
        flat[rng.choice(d * r, size=counts[name], replace=False)] = True
        mask[name] = flat.reshape(d, r)
    return mask


def _total(counts: int | dict[str, int]) -> int:
    return counts if isinstance(counts, int) else sum(counts.values())


def _informed(method: str, budget: Budget, shapes: Shapes, accumulators: Accumulators | None) -> Mask:
    if accumulators is None:
        raise GradlensError(f"selector {method!r} needs the accumulators of a recorded run")
    check_mask_fits({name: acc.sum for name, acc in accumulators.modules.items()}, shapes,
                    where=f"{accumulators.path}")
    per_module = scores(method, accumulators)
    flat = np.concatenate([per_module[name].ravel() for name in shapes])
    if not np.isfinite(flat).all():
        bad = next(name for name in shapes if not np.isfinite(per_module[name]).all())
        raise GradlensError(f"{accumulators.path}: selector {method!r} scores of module {bad} are not finite")
    if flat.size and flat.min() == flat.max():  # e.g. a run whose every gradient was 0: top-k would be index order
        raise GradlensError(f"{accumulators.path}: every entry has the same {method!r} score ({flat[0]:g}), so an "
                            "informed mask would only be the first entries in module order; the run carries no "
                            "gradient signal (check its rewards and `gradlens info`)")
    counts = budget.counts(shapes)
    if isinstance(counts, int):
        return _split(_top_k(flat, counts), shapes)
    return {name: _top_k(per_module[name].ravel(), counts[name]).reshape(shape) for name, shape in shapes.items()}


def select(method: str, budget: Budget, shapes: Shapes, *, accumulators: Accumulators | None = None, seed: int = 0,
           reference: Mapping[str, np.ndarray] | None = None,
           projections: Sequence[str] = DEFAULT_PROJECTIONS) -> Mask:
    """A mask over ``shapes`` holding exactly the budget's count (global) or each module's count (per_module).

    Informed selectors (:data:`INFORMED`) need ``accumulators`` and ignore ``seed``: they take the top scores over
    the whole adapter (global) or within each module (per_module), ties at the threshold going to the lower index
    (modules in ``shapes`` order, entries row-major). The baselines draw from ``np.random.default_rng(seed)``:
    ``random_matched`` copies each module's count from ``reference`` (whose total must equal the budget's),
    ``modules`` spreads the budget over the modules that ``projections`` names (as ``--modules`` does) (per_module: in
    proportion to their sizes).
    """
    if method not in SELECTORS:
        raise GradlensError(f"selector {method!r} is not one of {', '.join(SELECTORS)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise GradlensError(f"seed must be an integer >= 0, got {seed!r}")
    if method in INFORMED:
        return _informed(method, budget, shapes, accumulators)
    counts = budget.counts(shapes)
    rng = np.random.default_rng(seed)
    if method == "random":
        return _random_global(counts, shapes, rng) if isinstance(counts, int) else _random_per_module(counts, shapes,
                                                                                                      rng)
    if method == "random_matched":
        if reference is None:
            raise GradlensError("selector 'random_matched' needs a reference mask to copy per-module counts from")
        check_mask_fits(reference, shapes, where="reference mask")
        matched = {name: int(np.count_nonzero(reference[name])) for name in shapes}
        if sum(matched.values()) != _total(counts):
            raise GradlensError(f"selector 'random_matched': the reference mask selects {sum(matched.values())} "
                                f"entries but budget {budget} ({budget.scope}) resolves to {_total(counts)}")
        return _random_per_module(matched, shapes, rng)
    try:
        chosen = {name: shapes[name] for name in match_modules(list(shapes), list(projections))}
    except GradlensError as e:
        raise GradlensError(f"selector 'modules': {e}") from None
    room = sum(entry_counts(chosen).values())
    if _total(counts) > room:
        raise GradlensError(f"selector 'modules': budget {budget} is {_total(counts)} entries, more than the {room} "
                            f"entries of the {', '.join(projections)} modules")
    if budget.scope == "global":
        part = _random_global(_total(counts), chosen, rng)
    else:
        part = _random_per_module(Budget(k=_total(counts), scope="per_module").counts(chosen), chosen, rng)
    return {name: part[name] if name in part else np.zeros(shape, bool) for name, shape in shapes.items()}
