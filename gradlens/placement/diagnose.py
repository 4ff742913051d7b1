"""Will random placement do? A prediction per budget from a probe's (or any run's) streaming statistics alone.

Notation: steps t = 1..T (the accumulated, finite steps), B entries i = 1..N of the whole adapter, ``g_ti`` the
recorded (post-clip) gradient, ``n_i`` the steps where ``g_ti != 0`` (``nonzero``; a zero step carries no
information, e.g. a GRPO group with equal rewards), ``S_i = sum_t g_ti`` (``sum``), ``Q_i = sum_t g_ti^2`` (``sumsq``),
``T'`` the steps with a non-zero adapter gradient (from ``sqnorm``). Per entry:

- signal-to-noise ``rho_i = |S_i| / sqrt(n_i Q_i)`` in [0, 1] (Cauchy-Schwarz): 1 when every step has one value,
  about ``1/sqrt(n_i)`` for sign-symmetric noise (``E rho_i^2 = 1/n_i``);
- drift fraction ``phi_i = (S_i^2 - Q_i) / ((n_i - 1) Q_i) = (n_i rho_i^2 - 1) / (n_i - 1)`` (0 when n_i <= 1): the
  cross-step products ``sum_{s != t} g_si g_ti`` over their largest value. For steps with mean mu and variance sigma^2
  (independent), ``E[S^2 - Q] = n(n-1) mu^2`` and ``E Q = n (mu^2 + sigma^2)``, so phi estimates
  ``mu^2 / (mu^2 + sigma^2)``, the share of the entry's gradient energy that is a consistent drift, with mean 0 under
  pure noise: the noise floor ``1/n_i`` of rho^2 is removed.

Per set of entries E (a placement; ``g_t,E`` the step restricted to E):

- coherence ``C(E) = ||sum_t g_t,E||^2 / sum_t ||g_t,E||^2 = sum_E S_i^2 / sum_E Q_i`` in [0, T']: T' for
  identical steps, about 1 for orthogonal ones; normalized ``kappa(E) = (C(E) - 1) / (T' - 1)``, the
  energy-weighted mean cross-step cosine (1: identical steps, ~0: orthogonal); 0 for a set that never had a gradient;
- energy share ``sum_E S_i^2 / sum_all S_i^2``: the set's share of the squared summed gradient, the first-order loss
  decrease of plain gradient descent;
- drift ``mean_E phi_i`` and SNR ``mean_E rho_i``.

A uniformly random placement of k entries (global) includes each entry with probability k/N, so it holds exactly
``k/N`` of any share-of-sum signal in expectation; per module with counts k_m it is ``sum_m k_m/N_m sum_{i in m} x_i``.
For ratios (C, kappa, means) the random value is the ratio of these exact expectations (its own expectation differs
by O(1/k)). The informed placement is the mask :func:`gradlens.placement.selectors.select` gives (``scores``' top-k).

Selection bias: a top-k picked for consistent signs shows a high drift even on pure noise, the more so the shorter
the probe. ``drift_null`` is the same selector's top-k drift on a simulated sign-flip null of the run: each entry's
n_i non-zero steps keep their magnitudes (``A_i = sum_t |g_ti|``, ``Q_i``) and get fair independent signs, sign count
``m_i = 2 Bin(n_i, 1/2) - n_i``. Given m_i, over the orders in which the magnitudes can meet the signs (sampling
without replacement), ``E[S_i | m_i] = (m_i/n_i) A_i`` and ``Var[S_i | m_i] = (1 - (m_i/n_i)^2) (n_i Q_i - A_i^2) /
(n_i - 1)``; the null's S_i is drawn from a normal with these moments (an approximation: the magnitudes themselves are
not stored), so its drift is right on average and a selector's tie-break on |S_i| is simulated too. Equal magnitudes
give a null drift of ``(m_i^2/n_i - 1) / (n_i - 1)``; heavy-tailed ones less, as a few large steps decide the sum.

The prediction (a heuristic model, not a measurement). Take each entry's step as a drift plus noise, the loss as
locally quadratic with the Fisher diagonal ``E g_i^2`` as its curvature (the Gauss-Newton reading), and every trained
entry stepped at its best rate (AdamW divides by each entry's RMS gradient; ``compare`` sweeps the rate per
placement). Over H steps entry i then lowers the loss by ``psi(phi_i, H) = H phi_i / (H phi_i + 1 - phi_i)`` times a
constant common to all entries, and entries add: an entry's gradient scale drops out, what counts is whether its
steps add up (drift) or cancel (noise). Hence two readings of what random placement recovers of an informed one:

- ``recovery = max(drift_random, 0) / drift_top``: the ratio at H = 1 (``psi = phi``), and at any H the ratio when
  each set's drift sits in fully consistent entries (``psi(phi) >= phi``, equal at phi = 0 and 1);
- ``recovery_run = psi(drift_random, H) / psi(drift_top, H)`` with H = ``train_steps`` (the run the placement is
  for): the ratio when each set's drift is spread evenly over its entries (psi is concave, so psi of the mean bounds
  the mean of psi). Random's most hopeful reading: over a long run even a weak drift, one a short probe cannot tell
  from noise (its resolution in phi is about 1/n), adds up.

Neither sees saturation (a task that k random entries already solve), interactions between entries, or statistics
that change after the probe; ``drift_top`` includes the selection bias that ``drift_null`` sizes. The magnitude-
weighted view (coherence, energy share) stands next to it, and ``gradlens compare`` measures the real thing. In a
perfectly coherent run every phi_i is 1 and both readings are 1; with the signal in k entries (one sign there, random
signs elsewhere) ``recovery`` is about k/N.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradlens.budget import Budget, Shapes
from gradlens.config import DIAGNOSE_METHODS
from gradlens.errors import GradlensError
from gradlens.fsio import atomic_write, check_unused_out, json_dump
from gradlens.placement.diagnose_check import MEASURED, accuracy_line
from gradlens.placement.probe import PROBE_FILE, read_probe
from gradlens.placement.selectors import scores, select
from gradlens.provenance import package_versions
from gradlens.stats.streaming import Accumulators, ModuleAccumulator
from gradlens.store.runstate import announce, run_space

CSV_FILE = "diagnose.csv"
JSON_FILE = "diagnose.json"
SET_STATS = ("drift", "snr", "coherence", "coherence_norm", "energy_share")
COLUMNS = ("budget", "scope", "k", "entries", "method", "recovery", "recovery_run", "train_steps", "drift_null",
           *(f"{s}_{side}" for s in SET_STATS for side in ("top", "random")))
HEURISTIC = ("heuristic, not a measurement: a placement is taken to gain in proportion to the drift of the entries "
             "it trains, their gradient scale removed by AdamW and a per-placement learning rate; saturation, "
             "interactions and statistics that change after the probe are not seen; gradlens compare measures it")


@dataclass(frozen=True)
class DiagnoseResult:
    """The numbers behind the prediction: one row per (budget, method) with :data:`COLUMNS`, and the adapter's."""

    path: Path
    run: Path
    probe: dict[str, Any] | None
    scope: str
    methods: list[str]
    seed: int
    steps: list[int]
    zero_steps: list[int]
    nonfinite_steps: list[int]
    train_steps: int | None
    adapter: dict[str, Any]
    rows: list[dict[str, Any]]
    run_meta: dict[str, Any]


def entry_statistics(acc: Accumulators, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Flat float64 per-entry ``sum``, ``sumsq``, ``nonzero``, ``snr`` (rho) and ``drift`` (phi), modules in
    ``names`` order, rows within a module row-major (the order of the selectors' masks)."""
    s = np.concatenate([np.asarray(acc[n].sum, np.float64).ravel() for n in names])
    q = np.concatenate([np.asarray(acc[n].sumsq, np.float64).ravel() for n in names])
    n = np.concatenate([np.asarray(acc[n].nonzero, np.float64).ravel() for n in names])
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(n * q > 0, np.abs(s) / np.sqrt(n * q), 0.0)
        drift = np.where((n > 1) & (q > 0), (s * s - q) / ((n - 1) * q), 0.0)
    return {"sum": s, "sumsq": q, "nonzero": n, "snr": snr, "drift": drift}


def null_moments(sumsign: np.ndarray, nonzero: np.ndarray, sumabs: np.ndarray,
                 sumsq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of ``S = sum_t g_t`` over the orders in which the kept magnitudes can meet the signs, given
    the sign count (sampling without replacement; see the module docstring)."""
    n = np.asarray(nonzero, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(n > 0, sumsign / n, 0.0)
        spread = np.where(n > 1, (n * sumsq - sumabs * sumabs) / (n - 1), 0.0)
    return share * sumabs, (1 - share * share) * np.maximum(spread, 0.0)


def sign_flip_null(acc: Accumulators, rng: np.random.Generator) -> Accumulators:
    """The run with its signal removed: fair random signs on each entry's non-zero steps, magnitudes kept.

    ``sumsign`` is drawn exactly (``2 Bin(n, 1/2) - n``), ``sum`` from a normal with the :func:`null_moments` of that
    sign count (so a selector's tie-break on ``|sum|`` sees the spread it would see); ``sumabs``, ``sumsq`` and
    ``nonzero`` are the run's.
    """
    modules = {}
    for name, m in acc.modules.items():
        signs = (2 * rng.binomial(m.nonzero, 0.5) - m.nonzero).astype(np.float64)
        mean, var = null_moments(signs, m.nonzero, m.sumabs, m.sumsq)
        modules[name] = ModuleAccumulator(count=m.count, sum=mean + np.sqrt(var) * rng.standard_normal(mean.shape),
                                          sumsq=m.sumsq, sumabs=m.sumabs, sumsign=signs, nonzero=m.nonzero,
                                          sqnorm=m.sqnorm, dot_prev=m.dot_prev)
    return Accumulators(path=acc.path, steps=acc.steps, modules=modules)


def inclusion(budget: Budget, shapes: Shapes) -> np.ndarray:
    """Each entry's probability of being in a uniformly random placement of the budget (flat, ``shapes`` order)."""
    counts = budget.counts(shapes)
    sizes = [d * r for d, r in shapes.values()]
    if isinstance(counts, int):
        return np.full(sum(sizes), counts / sum(sizes))
    return np.concatenate([np.full(size, counts[name] / size) for name, size in zip(shapes, sizes, strict=True)])


def set_statistics(weights: np.ndarray, st: dict[str, np.ndarray], steps_with_gradient: int) -> dict[str, float]:
    """:data:`SET_STATS` of a placement given as per-entry weights: a 0/1 mask, or inclusion probabilities (then each
    sum is its exact expectation over random placements)."""
    k = float(weights.sum())
    s2 = st["sum"] ** 2
    energy = float(weights @ st["sumsq"])
    total = float(s2.sum())
    coherence = float(weights @ s2) / energy if energy > 0 else 0.0
    norm = (coherence - 1) / (steps_with_gradient - 1) if energy > 0 else 0.0
    return {"drift": float(weights @ st["drift"]) / k, "snr": float(weights @ st["snr"]) / k,
            "coherence": coherence, "coherence_norm": norm,
            "energy_share": float(weights @ s2) / total if total > 0 else 0.0}


def _flat(mask: dict[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    return np.concatenate([mask[n].ravel() for n in names]).astype(np.float64)


def lag1_cosine(acc: Accumulators) -> float | None:
    """Mean cosine of consecutive accumulated steps of the whole adapter (pairs with a zero step left out)."""
    sq = np.sum([np.asarray(m.sqnorm, np.float64) for m in acc.modules.values()], axis=0)
    dot = np.sum([np.asarray(m.dot_prev, np.float64) for m in acc.modules.values()], axis=0)
    ok = (sq[1:] > 0) & (sq[:-1] > 0)
    return float(np.mean(dot[1:][ok] / np.sqrt(sq[1:][ok] * sq[:-1][ok]))) if ok.any() else None


def horizon_gain(drift: float, steps: int) -> float:
    """``psi(phi, H) = H phi / (H phi + 1 - phi)``: the loss decrease of an entry of drift fraction phi over H steps,
    relative to a fully consistent one (phi clipped to [0, 1])."""
    phi = min(max(drift, 0.0), 1.0)
    return steps * phi / (steps * phi + 1 - phi)


def locate_run(path: Path) -> tuple[Path, dict[str, Any] | None]:
    """The run directory of ``path`` (itself, or ``path/run`` of a probe directory) and the probe's record."""
    if (path / PROBE_FILE).is_file():
        info = read_probe(path)
        if not isinstance(info, dict):
            raise GradlensError(f"{path / PROBE_FILE}: not a probe record (expected a JSON object)")
        config = info.get("config") if isinstance(info.get("config"), dict) else {}
        return path / "run", {"path": str(path), "config": config, "steps": info.get("steps")}
    return path, None


def _check_ranks(acc: Accumulators, methods: Sequence[str], where: Path) -> None:
    """Refuse statistics in which a selector cannot rank: every entry's score the same."""
    for method in methods:
        flat = np.concatenate([s.ravel() for s in scores(method, acc).values()])
        if flat.size and flat.max() == flat.min():
            raise GradlensError(f"{where}: every entry has the same {method!r} score ({flat.max():g}), e.g. all "
                                "gradients were zero; the statistics cannot say where to place entries")


def _steps(acc: Accumulators, where: Path) -> tuple[list[int], list[int]]:
    """(all accumulated steps, the all-zero ones); refuses a run without steps."""
    counts = {m.count for m in acc.modules.values()}
    if not acc.modules or counts == {0} or not len(acc.steps):
        raise GradlensError(f"{where}: the run holds no recorded (finite) steps, so there is nothing to diagnose")
    sq = np.sum([np.asarray(m.sqnorm, np.float64) for m in acc.modules.values()], axis=0)
    steps = [int(s) for s in acc.steps]
    return steps, [s for s, v in zip(steps, sq, strict=True) if v == 0]


def _row(budget: Budget, k: int, n: int, method: str, sets: dict[str, dict[str, float]],
         train_steps: int | None) -> dict[str, Any]:
    """One table row from the informed (``top``), random (``random``) and null (``null``) set statistics."""
    top, rand = sets["top"], sets["random"]
    run = None
    if train_steps is not None and horizon_gain(top["drift"], train_steps) > 0:
        run = horizon_gain(rand["drift"], train_steps) / horizon_gain(top["drift"], train_steps)
    row: dict[str, Any] = {"budget": str(budget), "scope": budget.scope, "k": k, "entries": n, "method": method,
                           "recovery": max(rand["drift"], 0.0) / top["drift"] if top["drift"] > 0 else None,
                           "recovery_run": run, "train_steps": train_steps, "drift_null": sets["null"]["drift"]}
    for s in SET_STATS:
        row[f"{s}_top"], row[f"{s}_random"] = top[s], rand[s]
    return row


def diagnose(path: str | Path, budgets: Sequence[str | Budget], scope: str = "global", *,
             methods: Sequence[str] = DIAGNOSE_METHODS, seed: int = 0,
             train_steps: int | None = None) -> DiagnoseResult:
    """Predict, per budget and informed method, what random placement recovers of it (see the module docstring).

    ``path`` is a run directory or a probe directory (its ``run``); ``seed`` draws the sign-flip null;
    ``train_steps`` (default: the probe's ``train_steps``, if it has one) is the horizon H of ``recovery_run``.
    """
    from gradlens.store import open_run

    path = Path(path)
    run_dir, probe = locate_run(path)
    if train_steps is None and probe is not None and isinstance(probe["config"].get("train_steps"), int):
        train_steps = probe["config"]["train_steps"]
    if train_steps is not None and train_steps < 1:
        raise GradlensError(f"train_steps must be >= 1, got {train_steps}")
    run = open_run(run_dir)
    acc = run.accumulators()
    steps, zero = _steps(acc, run_dir)
    _check_ranks(acc, methods, run_dir)
    if len(steps) - len(zero) < 2:
        raise GradlensError(f"{run_dir}: only {len(steps) - len(zero)} of {len(steps)} steps have a non-zero "
                            "gradient; consistency across steps needs at least 2")
    shapes = {s.name: s.shape for s in run.specs}
    names = list(shapes)
    st = entry_statistics(acc, names)
    null_acc = sign_flip_null(acc, np.random.default_rng(seed))
    null_st = entry_statistics(null_acc, names)
    t_grad = len(steps) - len(zero)
    n = st["sum"].size
    whole = set_statistics(np.ones(n), st, t_grad)
    adapter = {"entries": n, "steps": len(steps), "steps_with_gradient": t_grad,
               **{key: whole[key] for key in ("drift", "snr", "coherence", "coherence_norm")},
               "lag1_cosine": lag1_cosine(acc), "drift_entries": float(st["drift"].sum()),
               "entries_without_gradient": int(np.count_nonzero(st["nonzero"] == 0))}
    rows = []
    for text in budgets:
        budget = text if isinstance(text, Budget) else Budget.parse(str(text), scope)
        rand = set_statistics(inclusion(budget, shapes), st, t_grad)
        for method in methods:
            mask = _flat(select(method, budget, shapes, accumulators=acc), names)
            null_mask = _flat(select(method, budget, shapes, accumulators=null_acc), names)
            sets = {"top": set_statistics(mask, st, t_grad), "random": rand,
                    "null": set_statistics(null_mask, null_st, t_grad)}
            rows.append(_row(budget, int(mask.sum()), n, method, sets, train_steps))
    meta = {key: run.meta.get(key) for key in ("config", "seed", "versions", "complete")}
    meta.update(announce(run.meta, str(run_dir), doing="diagnosing"))  # a stopped run or a trained A, said
    return DiagnoseResult(path=path, run=run_dir, probe=probe, scope=scope, methods=list(methods), seed=seed,
                          steps=steps, zero_steps=zero, nonfinite_steps=list(run.meta.get("nonfinite_steps") or []),
                          train_steps=train_steps, adapter=adapter, rows=rows, run_meta=meta)


def _share(value: float | None, method: str, top_drift: float) -> str:
    if value is not None:
        return f"about {100 * value:.0f}% of what {method} placement recovers"
    return f"at least what {method} placement recovers (its top-k shows no drift: {top_drift:.3f})"


def _budget_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The sentence of one budget, and the numbers behind it on a second line."""
    first = rows[0]
    parts, drifts = [], []
    for r in rows:
        part = _share(r["recovery"], r["method"], r["drift_top"])
        if r["recovery_run"] is not None:
            part += f" (up to {100 * r['recovery_run']:.0f}% over a {r['train_steps']}-step run)"
        parts.append(part)
        drift = f"{r['method']} {r['drift_top']:.3f} (no-signal probe: {r['drift_null']:.3f}"
        noise = 0 < r["drift_top"] <= 2 * r["drift_null"]
        drifts.append(drift + (", so mostly selection noise)" if noise else ")"))
    sentence = (f"at k = {first['budget']} ({first['k']:,} of {first['entries']:,} entries, {first['scope']}), "
                f"the heuristic puts random placement at {'; '.join(parts)}.")
    numbers = (f"  drift fraction per entry: random {first['drift_random']:.3f}, {', '.join(drifts)}; coherence: "
               f"random {first['coherence_random']:.2f}, "
               + ", ".join(f"{r['method']} {r['coherence_top']:.2f}" for r in rows))
    return [sentence, numbers]


def describe(result: DiagnoseResult) -> str:
    """Console text: the adapter's coherence, one sentence per budget (numbers below it), what is heuristic."""
    a = result.adapter
    lag1 = "n/a" if a["lag1_cosine"] is None else f"{a['lag1_cosine']:.3f}"
    letter = "W" if run_space(result.run_meta) == "weight" else "B"
    lines = [f"gradlens diagnose: {result.run}: {a['steps']} steps ({a['steps_with_gradient']} with a gradient), "
             f"{a['entries']:,} {letter} entries; coherence {a['coherence']:.2f} of at most "
             f"{a['steps_with_gradient']} (normalized {a['coherence_norm']:.3f}, lag-1 cosine {lag1}); drift "
             f"fraction {a['drift']:.4f} per entry, worth about {max(a['drift_entries'], 0):,.0f} fully consistent "
             "entries"]
    if result.zero_steps:
        lines.append(f"note: {len(result.zero_steps)} step(s) had an all-zero gradient (e.g. GRPO groups with equal "
                     f"rewards) and count nowhere: {result.zero_steps[:10]}")
    if result.nonfinite_steps:
        lines.append(f"note: non-finite step(s) {result.nonfinite_steps[:10]} are excluded from the statistics")
    for budget in dict.fromkeys(r["budget"] for r in result.rows):
        lines += _budget_lines([r for r in result.rows if r["budget"] == budget])
    lines.append(f"({HEURISTIC})")
    lines.append(f"({accuracy_line()})")
    return "\n".join(lines)


def save(result: DiagnoseResult, out: str | Path, config: Any = None) -> list[Path]:
    """Write ``OUT/diagnose.csv`` (the rows) and ``OUT/diagnose.json`` (rows, adapter, provenance); returns them."""
    out = Path(out)
    check_unused_out(out, bool(getattr(config, "overwrite", False)))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GradlensError(f"{out}: cannot create the output directory ({e.strerror})") from None
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(result.rows)
    atomic_write(out / CSV_FILE, lambda tmp: tmp.write_text(buf.getvalue()))
    cfg = asdict(config) if is_dataclass(config) else {"scope": result.scope, "methods": result.methods,
                                                       "seed": result.seed}
    json_dump({"tool": "gradlens diagnose", "input": str(result.path), "run": str(result.run), "probe": result.probe,
               "config": cfg, "train_steps": result.train_steps, "steps": result.steps,
               "zero_gradient_steps": result.zero_steps,
               "nonfinite_steps_excluded": result.nonfinite_steps, "adapter": result.adapter, "rows": result.rows,
               "heuristic": HEURISTIC, "measured_accuracy": MEASURED, "run_meta": result.run_meta,
               "versions": package_versions(),
               "files": [CSV_FILE, JSON_FILE]}, out / JSON_FILE)
    return [out / CSV_FILE, out / JSON_FILE]
