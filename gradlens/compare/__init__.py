"""The placement comparison: :mod:`.runner` (the protocol, :func:`compare`), :mod:`.training` (the runs),
:mod:`.tables` (rows, summary, finding) and :mod:`.plot` (the figure)."""

from gradlens.compare.runner import CompareResult, compare
from gradlens.compare.tables import PLACEMENT, SWEEP, findings, summarize

__all__ = ["PLACEMENT", "SWEEP", "CompareResult", "compare", "findings", "summarize"]
