"""Is ``gradlens diagnose`` right where it was not tuned? Leave one world out.

The diagnose was built and judged on the same 36 ``toy:small``/``toy:wide`` points. Given a table with one row per
measured point, ``world``, ``cell``, ``budget``, probe statistics (``diagnose``'s columns, e.g. ``recovery``,
``drift_top``) and the measured ``gap`` (informed minus random accuracy, paired over seeds),
:func:`leave_one_world_out` chooses the predictor on one world (the statistic, and its direction, with the
largest Spearman rank correlation with the gap there) and reports its Spearman with the gap on each other world: a
number the choice never saw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from gradlens.errors import GradlensError

CHECK_CSV = "diagnose_check.csv"
CHECK_JSON = "diagnose_check.json"
KEYS = ("world", "cell", "budget")
TARGET = "gap"
COLUMNS = ("train_world", "test_world", "predictor", "direction", "rho_train", "p_train", "n_train", "rho_test",
           "p_test", "n_test")
# What the committed findings measured of diagnose's ``recovery`` against the measured recovery (docs/findings.md,
# section 8; scripts/findings_tables.py): 36 points of toy:small (60 and 240 steps) and toy:wide, both regimes.
MEASURED = {"spearman": 0.32, "p": 0.054, "points": 36, "wrong": 26, "where": "docs/findings.md section 8"}


def accuracy_line() -> str:
    """The diagnose's measured accuracy in one sentence, said wherever its prediction is printed."""
    m = MEASURED
    return (f"measured accuracy of this heuristic on the toy worlds: Spearman {m['spearman']:.2f} (p {m['p']:.3f}) "
            f"with the measured recovery over {m['points']} points, on the wrong side of 50% in {m['wrong']} of "
            f"them, and not checked outside the points it was built on ({m['where']}); read it as a ranking of "
            "budgets within one run, not as a level")


def _spearman(x: pd.Series, y: pd.Series) -> tuple[float, float, int]:
    """(rho, two-sided p, n) over the rows where both are finite; NaN where fewer than 3 or one is constant."""
    from scipy import stats

    ok = x.notna() & y.notna()
    n = int(ok.sum())
    if n < 3 or x[ok].nunique() < 2 or y[ok].nunique() < 2:
        return math.nan, math.nan, n
    rho, p = stats.spearmanr(x[ok], y[ok])
    return float(rho), float(p), n


def check_table(table: pd.DataFrame, predictors: Sequence[str], where: str = "table") -> None:
    """Refuse a table without the key and gap columns, a predictor it lacks, or fewer than two worlds."""
    missing = [c for c in (*KEYS, TARGET, *predictors) if c not in table]
    if missing:
        raise GradlensError(f"{where}: lacks column(s) {', '.join(missing)} (needs {', '.join(KEYS)}, {TARGET} and "
                            "the predictors)")
    if not predictors:
        raise GradlensError(f"{where}: no predictor column to choose from")
    if table["world"].nunique() < 2:
        raise GradlensError(f"{where}: holds {table['world'].nunique()} world(s); leaving one out needs at least two")


def leave_one_world_out(table: pd.DataFrame, predictors: Sequence[str], where: str = "table") -> pd.DataFrame:
    """For every ordered pair of worlds (train, test): the predictor chosen on train (largest |Spearman| with the
    gap; its sign is the direction, so a statistic that falls as the gap grows counts as well as one that rises), its
    Spearman on train, and the Spearman of ``direction * predictor`` with the gap on test. Ties: the earlier
    predictor in ``predictors``."""
    check_table(table, predictors, where)
    worlds = list(dict.fromkeys(table["world"]))
    rows = []
    for train in worlds:
        fit = table[table["world"] == train]
        scored = [(name, *_spearman(fit[name], fit[TARGET])) for name in predictors]
        usable = [s for s in scored if math.isfinite(s[1])]
        if not usable:
            raise GradlensError(f"{where}: no predictor has a rank correlation with the gap on world {train!r} "
                                "(fewer than 3 points, or constant columns)")
        name, rho, p, n = max(usable, key=lambda s: abs(s[1]))
        direction = 1 if rho >= 0 else -1
        for test in (w for w in worlds if w != train):
            held = table[table["world"] == test]
            rho_test, p_test, n_test = _spearman(direction * held[name], held[TARGET])
            rows.append({"train_world": train, "test_world": test, "predictor": name, "direction": direction,
                         "rho_train": abs(rho), "p_train": p, "n_train": n, "rho_test": rho_test, "p_test": p_test,
                         "n_test": n_test})
    return pd.DataFrame(rows, columns=list(COLUMNS))


def verdict(result: pd.DataFrame, alpha: float = 0.05) -> str:
    """One sentence: does a predictor chosen on one world rank the gap on the others (positive and significant in
    every direction)?"""
    held = result["rho_test"].notna() & (result["rho_test"] > 0) & (result["p_test"] < alpha)
    if len(result) and bool(held.all()):
        return f"the chosen predictor ranks the gap on every held-out world (Spearman > 0, p < {alpha:g})"
    fails = ", ".join(f"{r.train_world} -> {r.test_world}" for r in result[~held].itertuples())
    return (f"no probe statistic predicts the gap across worlds: chosen on one world, it does not rank the gap on "
            f"the other (Spearman <= 0 or p >= {alpha:g}) for {fails}; the diagnose is a heuristic")


def describe(result: pd.DataFrame) -> str:
    """Console text: one line per direction, then the verdict."""
    lines = ["gradlens diagnose --check: predictor chosen on one world, rank correlation with the measured gap on "
             "the other (leave one world out)"]
    for r in result.itertuples():
        sign = "" if r.direction > 0 else "minus "
        lines.append(f"  {r.train_world} -> {r.test_world}: {sign}{r.predictor} (Spearman {r.rho_train:.2f} on "
                     f"{r.n_train} points of {r.train_world}) ranks the gap with Spearman {r.rho_test:.2f} "
                     f"(p {r.p_test:.3g}, {r.n_test} points of {r.test_world})")
    lines.append(verdict(result))
    return "\n".join(lines)


def read_table(path: str | Path) -> pd.DataFrame:
    """The CSV of ``--check``, or a one-line error naming the file."""
    try:
        return pd.read_csv(path, dtype={"world": str, "cell": str, "budget": str})
    except (OSError, ValueError) as e:
        raise GradlensError(f"{path}: cannot read the table ({e})".splitlines()[0]) from None


def run_check(path: str | Path, predictors: Sequence[str] | None, out: str | Path | None) -> str:
    """``gradlens diagnose --check``: the leave-one-world-out table, printed and, with ``out``, written as
    ``OUT/diagnose_check.csv`` and ``OUT/diagnose_check.json`` (with provenance)."""
    from gradlens.fsio import atomic_write, json_dump
    from gradlens.provenance import package_versions

    table = read_table(path)
    if predictors is None:
        predictors = [c for c in table.select_dtypes("number").columns if c not in (*KEYS, TARGET)]
    result = leave_one_world_out(table, list(predictors), str(path))
    text = describe(result)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / CHECK_CSV, lambda tmp: result.to_csv(tmp, index=False))
        json_dump({"tool": "gradlens diagnose --check", "table": str(path), "predictors": list(predictors),
                   "rows": result.to_dict("records"), "verdict": verdict(result), "measured_accuracy": MEASURED,
                   "versions": package_versions()}, out / CHECK_JSON)
        text += f"\ngradlens diagnose: wrote {out / CHECK_CSV}, {out / CHECK_JSON}"
    return text
