"""The two passes of the out-of-core driver (:mod:`.driver`) over a run's shards, with bounded memory.

1. The *step pass* (:class:`StepSums`) reads every module of one shard at a time. Reading all of a step before
   using any of it finds the non-finite steps (flagged in the manifest or not) before they touch a statistic, so
   nothing is ever undone. It takes what needs one step at a time (per-entry counts of positive and negative signs
   for the whole run and the leading window, the per-step spectra, which steps are exactly zero); when the whole
   run fits the budget it also copies every usable step into float32 buffers, and the run is read once.
2. Otherwise the *Gram pass* (:func:`gram_pass`) reads the modules in groups (:func:`plan_groups`): as many as fit
   the budget with all their usable steps (float32) plus their ``T x T`` Gram matrices. A module too large for the
   budget on its own is processed in panels of steps: pass ``a`` holds panel ``a`` and multiplies it with every
   later step as it streams past, which fills the Gram block by block (one extra read per extra panel).

Both read one shard ahead on a thread (:func:`prefetch`, :func:`read_ahead`), so the disk works while the CPU does.
Grams are float64 (:func:`gradlens.stats.core.gram_product`; the steps are cast a block at a time as they are
copied, never whole), on one BLAS thread per worker (:func:`one_blas_thread`).
"""

from __future__ import annotations

import ctypes
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from gradlens.analysis.run_stats import STEP_KEYS, SignAgg
from gradlens.stats import core

PAGE = 4096
_DONE = object()
Mapper = Callable[..., Iterator[Any]]  # builtins.map or ThreadPoolExecutor.map: results in order
GATHER_BYTES = 4 * 2**20  # the float64 buffer a whole group's module gathers column blocks of its steps into


@lru_cache(maxsize=1)
def _openblas_threads() -> list[tuple[Callable[[], int], Callable[[int], None]]]:
    """(get, set) of the number of threads of every OpenBLAS loaded in this process (numpy's wheels bundle one, as
    ``scipy_openblas``); empty where there is none or no ``/proc`` (another BLAS, another OS: left alone)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    found = []
    for path in dict.fromkeys(line.split()[-1] for line in maps.splitlines() if "openblas" in line.split("/")[-1]):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        names = [(f"{p}_get_num_threads{s}", f"{p}_set_num_threads{s}") for p in ("scipy_openblas", "openblas")
                 for s in ("64_", "")]
        found += [(getattr(lib, get), getattr(lib, put)) for get, put in names
                  if hasattr(lib, get) and hasattr(lib, put)][:1]
    return found


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run BLAS on one thread inside (restored after): the analysis makes thousands of small products (a ``T x T``
    block from 512 columns, a 16 x 16 step Gram, eigenvalues of ``T x T``), and waking OpenBLAS's threads for each
    costs more than they gain: 5-10x slower on a shared 2-core machine (``benchmarks/bench_analysis.py``). The
    parallelism comes from the reading thread and the per-module workers instead."""
    libs = _openblas_threads()
    before = [get() for get, _ in libs]
    for _, put in libs:
        put(1)
    try:
        yield
    finally:
        for (_, put), n in zip(libs, before, strict=True):
            put(n)


class _Raised:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(items: Iterator[Any], ahead: int = 1) -> Iterator[Any]:
    """Yield ``items``, produced on a thread at most ``ahead`` items beyond the one in use (bounded memory).

    An error of the producer is raised here; closing the generator stops the producer after its current item.
    """
    slots, out, stop = threading.Semaphore(ahead), queue.SimpleQueue(), threading.Event()

    def produce() -> None:
        try:
            while slots.acquire() and not stop.is_set():
                item = next(items, _DONE)
                out.put(item)
                if item is _DONE:
                    return
        except BaseException as e:  # handed to the consumer, which raises it
            out.put(_Raised(e))

    thread = threading.Thread(target=produce, name="gradlens-prefetch", daemon=True)
    thread.start()
    try:
        while (item := out.get()) is not _DONE:
            if isinstance(item, _Raised):
                raise item.error
            slots.release()
            yield item
    finally:
        stop.set()
        slots.release()
        thread.join()


def read_ahead(chunks: Iterator[tuple[list[int], list[np.ndarray]]], tag: Any = None) -> Iterator[Any]:
    """Fault in every page of each array on the calling (prefetch) thread: a reader's float32 arrays may be lazy
    views of the shard file, whose first touch is the actual read (a no-op for arrays already in memory)."""
    for steps, arrays in chunks:
        for a in arrays:
            flat = a.reshape(-1).view(np.uint8)
            if flat.size:
                flat[::PAGE].max()
        yield (steps, arrays) if tag is None else (tag, steps, arrays)


@dataclass
class ModuleSteps:
    """One module's step-pass results over the usable steps: sign statistics (whole run, window) and spectra."""

    sign: SignAgg
    sign_w: SignAgg | None
    spectra: dict[str, np.ndarray]


def _signs(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-entry counts of the positive and the negative values over the steps of ``block``, summed in uint8 below
    256 steps (a quarter of the memory traffic of int32 sums)."""
    dtype = np.uint8 if len(block) < 256 else np.uint32
    return (np.add.reduce((block > 0).view(np.uint8), axis=0, dtype=dtype),
            np.add.reduce((block < 0).view(np.uint8), axis=0, dtype=dtype))


@dataclass
class _Sweep:
    """One module's share of one shard, held until every module of the shard is known to be finite."""

    gram: np.ndarray  # (rows, k, k) step Grams, their traces the squared norms
    norms: np.ndarray
    signs: tuple[np.ndarray, np.ndarray] | None = None  # None: a non-finite step, the shard is taken again
    signs_w: tuple[np.ndarray, np.ndarray] | None = None
    spectra: dict[str, np.ndarray] | None = None


class StepSums:
    """The step pass: fed every module of one shard at a time (:meth:`add`), in step order.

    ``fused``: module index -> float32 ``(candidate steps, size)`` buffer receiving that module's usable steps.
    """

    def __init__(self, specs: Sequence[Any], candidates: Sequence[int], window: int | None,
                 fused: dict[int, np.ndarray], parallel: Mapper = map) -> None:
        self.parallel = parallel
        self.candidates = set(candidates)
        self.window = window
        self.fused = fused
        self.usable: list[int] = []
        self.bad: list[int] = []
        self.zero: list[int] = []
        dtype = np.uint16 if len(candidates) < 2**16 else np.uint32
        self.pos = [np.zeros(s.shape, dtype) for s in specs]
        self.neg = [np.zeros(s.shape, dtype) for s in specs]
        self.pos_w = [np.zeros(s.shape, dtype) for s in specs] if window is not None else []
        self.neg_w = [np.zeros(s.shape, dtype) for s in specs] if window is not None else []
        self.spectra: list[dict[str, list[np.ndarray]]] = [{k: [] for k in STEP_KEYS} for _ in specs]

    def add(self, steps: list[int], arrays: list[np.ndarray]) -> None:
        """One shard: ``arrays[i]`` is module i's float32 ``(len(steps), d_out, r)`` block.

        Each module is taken whole while its block is in cache, but added only once every module of the shard is
        known to be finite; a shard with a non-finite step is taken again over its finite steps (nothing to undo).
        """
        rows = [k for k, s in enumerate(steps) if s in self.candidates]
        if not rows:
            return
        blocks = [a if len(rows) == len(steps) else a[rows] for a in arrays]
        start = len(self.usable)
        sweeps = list(self.parallel(lambda i: self._sweep(i, blocks[i], None, start), range(len(blocks))))
        norms = np.stack([s.norms for s in sweeps])
        finite = np.isfinite(norms).all(axis=0)
        self.bad += [steps[rows[k]] for k in np.flatnonzero(~finite)]
        if not finite.any():
            return
        if not finite.all():
            sweeps = [self._sweep(i, b[finite], s.gram[finite], start)
                      for i, (b, s) in enumerate(zip(blocks, sweeps, strict=True))]
            norms = norms[:, finite]
        kept = [steps[rows[k]] for k in np.flatnonzero(finite)]
        self.usable += kept
        for i, sweep in enumerate(sweeps):
            self._commit(i, sweep)
        self.zero += [s for s, nz in zip(kept, (norms > 0).any(axis=0), strict=True) if not nz]

    def _sweep(self, i: int, block: np.ndarray, gram: np.ndarray | None, start: int) -> _Sweep:
        """Module i over these steps (usable from position ``start`` if all are finite): step Grams, sign counts,
        spectra and the copy into its fused buffer."""
        gram = core.step_grams(block) if gram is None else gram
        out = _Sweep(gram, np.trace(gram, axis1=1, axis2=2))
        if not np.isfinite(out.norms).all():
            return out
        out.signs, out.spectra = _signs(block), core.step_spectrum_stats(block, gram)
        if self.window is not None and start < self.window:
            out.signs_w = _signs(block[: self.window - start])
        if i in self.fused:
            self.fused[i][start:start + len(block)] = block.reshape(len(block), -1)
        return out

    def _commit(self, i: int, sweep: _Sweep) -> None:
        np.add(self.pos[i], sweep.signs[0], out=self.pos[i])
        np.add(self.neg[i], sweep.signs[1], out=self.neg[i])
        if sweep.signs_w is not None:
            np.add(self.pos_w[i], sweep.signs_w[0], out=self.pos_w[i])
            np.add(self.neg_w[i], sweep.signs_w[1], out=self.neg_w[i])
        for key, values in sweep.spectra.items():
            self.spectra[i][key].append(values)

    def finish(self, window: int | None, bins: int) -> list[ModuleSteps]:
        """Per module: sign statistics over the usable steps (and the first ``window``), spectra as arrays."""
        out = []
        for i in range(len(self.pos)):
            pos, neg = self.pos[i].astype(np.int32), self.neg[i].astype(np.int32)
            sign = SignAgg(len(self.usable), bins)
            sign.add(pos - neg, pos + neg)
            sign_w = None
            if window is not None:
                pos, neg = self.pos_w[i].astype(np.int32), self.neg_w[i].astype(np.int32)
                sign_w = SignAgg(window, bins)
                sign_w.add(pos - neg, pos + neg)
            spectra = {k: np.concatenate(v) if v else np.zeros(0) for k, v in self.spectra[i].items()}
            out.append(ModuleSteps(sign, sign_w, spectra))
        return out


def plan_groups(sizes: Sequence[int], steps: int, budget: int) -> list[tuple[list[int], int]]:
    """Pack modules (positions in ``sizes``, in order) into groups of ``(positions, panel_steps)`` within ``budget``.

    A module costs ``4 T D`` (its steps in float32) plus ``8 T^2`` (its Gram). One that alone exceeds the budget
    forms its own group with panels of as many steps as fit.
    """
    gram_bytes = 8 * steps * steps
    groups: list[tuple[list[int], int]] = []
    current: list[int] = []
    used = 0
    for i, size in enumerate(sizes):
        cost = 4 * steps * size + gram_bytes
        if current and (cost > budget or used + cost > budget):
            groups.append((current, steps))
            current, used = [], 0
        if cost > budget:
            avail = max(budget - gram_bytes, budget // 4)
            groups.append(([i], max(1, min(steps, avail // (4 * size)))))
            continue
        current.append(i)
        used += cost
    if current:
        groups.append((current, steps))
    return groups


def buffers(arena: np.ndarray, sizes: Sequence[int], rows: int) -> list[np.ndarray]:
    """Views ``(rows, size)`` of the one float32 allocation that every group reuses (no fresh pages per group)."""
    out, offset = [], 0
    for size in sizes:
        out.append(arena[offset:offset + rows * size].reshape(rows, size))
        offset += rows * size
    return out


def gram_pass(run: Any, pos: dict[int, int], groups: list[tuple[list[int], int]], bar: Any,
              parallel: Mapper = map) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(module index, its T x T Gram over the usable steps)`` for every module of ``groups``.

    Every group reads its modules from every shard once per panel, one shard ahead on a thread; ``parallel`` maps
    the products of a group's modules. A whole group (all T steps fit) keeps the arrays it read (at most the
    budget, never copied whole) and takes each Gram from column blocks gathered into a small float64 buffer
    (:func:`_gathered_gram`). A panel group copies its panel's steps into a buffer and
    multiplies the later steps with them as they stream past.
    """
    T, specs = len(pos), run.specs
    passes = [(g, lo, min(T, lo + panel)) for g, (_, panel) in enumerate(groups) for lo in range(0, T, panel)]
    arena = np.empty(max([panel * specs[g[0]].size for g, panel in groups if panel < T] + [0]), np.float32)
    chunks = prefetch(item for k, (g, _, _) in enumerate(passes)
                      for item in read_ahead(run.iter_steps([specs[i].name for i in groups[g][0]]), k))
    grams: dict[int, np.ndarray] = {}
    current, held, buf = -1, [], []
    for k, steps, arrays in chunks:
        if k != current:
            if current >= 0:
                yield from _finish(groups, passes[current], held, buf, grams, T, parallel)
            current, (g, lo, hi), held = k, passes[k], []
            if groups[g][1] < T:
                buf = buffers(arena, [specs[groups[g][0][0]].size], hi - lo)
                grams.update({i: np.zeros((T, T)) for i in groups[g][0] if lo == 0})
        if bar is not None:
            bar.update(1)
        if groups[g][1] >= T:
            rows = [k for k, s in enumerate(steps) if s in pos]
            index = slice(rows[0], rows[-1] + 1) if rows and rows[-1] - rows[0] == len(rows) - 1 else rows
            held.append((index, [a.reshape(len(steps), -1) for a in arrays]))
        else:
            _fill_panel(steps, arrays, pos, lo, hi, buf, [grams[i] for i in groups[g][0]])
    if current >= 0:
        yield from _finish(groups, passes[current], held, buf, grams, T, parallel)


def _finish(groups: list[tuple[list[int], int]], panel: tuple[int, int, int], held: list[tuple[Any, list]],
            buf: list[np.ndarray], grams: dict[int, np.ndarray], T: int,
            parallel: Mapper) -> Iterator[tuple[int, np.ndarray]]:
    """The end of one read of a group: its whole Grams, or the panel's block of them."""
    members = groups[panel[0]][0]
    if groups[panel[0]][1] >= T:
        yield from zip(members, parallel(lambda m: _gathered_gram([(arrays[m], rows) for rows, arrays in held], T),
                                         range(len(members))), strict=True)
    else:
        yield from _close_panel(groups, panel, buf, grams, T, parallel)


def _gathered_gram(parts: list[tuple[Any, np.ndarray]], T: int) -> np.ndarray:
    """The Gram of the rows ``flat[rows]`` of every part, stacked in order (T in all), by column blocks gathered
    into one float64 buffer of about :data:`GATHER_BYTES` (the gather is the cast: no float32 copy in between)."""
    size = parts[0][0].shape[1]
    width = max(1, GATHER_BYTES // (8 * T * core.GRAM_BLOCK)) * core.GRAM_BLOCK
    hot = np.empty((T, min(width, size)))
    out = np.zeros((T, T))
    for lo in range(0, size, width):
        block, r = hot[:, :min(width, size - lo)], 0
        for flat, rows in parts:
            part = flat[rows, lo:lo + block.shape[1]]
            block[r:r + len(part)] = part
            r += len(part)
        out += core.gram_product(block)
    return out


def _fill_panel(steps: list[int], arrays: list[np.ndarray], pos: dict[int, int], lo: int, hi: int,
                buf: list[np.ndarray], grams: list[np.ndarray]) -> None:
    """One shard of a panel pass: copy the steps of rows ``lo:hi`` into ``buf`` and multiply later steps with them."""
    rows = [k for k, s in enumerate(steps) if pos.get(s, -1) >= lo]
    if not rows:
        return
    idx = np.array([pos[steps[k]] for k in rows])
    inside, after = idx < hi, idx >= hi
    for b, gram, arr in zip(buf, grams, arrays, strict=True):
        flat = arr.reshape(len(steps), -1)
        if inside.any():  # usable steps of one shard have consecutive positions
            first = int(idx[inside][0]) - lo
            np.take(flat, np.asarray(rows)[inside], axis=0, out=b[first:first + int(inside.sum())])
        if after.any():  # steps arrive in order, so the panel's rows are all in buf by now
            gram[lo:hi, idx[after]] += core.gram_product(b, flat[np.asarray(rows)[after]])


def _close_panel(groups: list[tuple[list[int], int]], panel: tuple[int, int, int], buf: list[np.ndarray],
                 grams: dict[int, np.ndarray], T: int, parallel: Mapper) -> Iterator[tuple[int, np.ndarray]]:
    """Add the panel's own block to its module's Gram; yield it, complete, after its last panel."""
    g, lo, hi = panel
    for i, block in zip(groups[g][0], parallel(core.gram_product, buf), strict=True):
        grams[i][lo:hi, lo:hi] += block
        if hi == T:
            gram = grams.pop(i)
            yield i, np.triu(gram) + np.triu(gram, 1).T
