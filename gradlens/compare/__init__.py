"""The placement comparison: :mod:`.protocol` (:func:`compare` and the :class:`~.protocol.Comparison` in progress),
:mod:`.runs` (the runs, on the in-memory base model), :mod:`.tables` (rows, summary, finding) and :mod:`.plot` (the
figure)."""

from gradlens.compare.protocol import CompareResult, compare
from gradlens.compare.tables import PLACEMENT, SWEEP, findings, summarize

__all__ = ["PLACEMENT", "SWEEP", "CompareResult", "compare", "findings", "summarize"]
