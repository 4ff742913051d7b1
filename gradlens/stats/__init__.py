"""Statistics of recorded LoRA-B gradients: pure functions (:mod:`.core`), the out-of-core driver (:mod:`.driver`),
the accumulator-only path for runs without raw shards (:mod:`.accumulated`) and their results (:mod:`.results`).

Definitions (``G_t``: one module's B-gradient at usable recorded step t, ``(d_out, r)``; ``g_t = vec(G_t)``; the
whole adapter concatenates all modules, a projection type or a layer concatenates its modules):

- step-to-step cosine at lag L: ``cos(g_t, g_{t+L})``, its mean over t and its series, L = 1..L_max; and the cosine
  of each step to the mean gradient ``cos(g_t, (1/T) sum_s g_s)``; steps with an exactly zero gradient are skipped;
- entropy effective rank (Roy & Vetterli 2007): ``exp(-sum p_i log p_i)``, ``p_i = s_i / sum_j s_j`` over the
  non-zero singular values; of the ``T x D`` trajectory (from the ``T x T`` Gram, raw and with unit rows) and of each
  ``G_t``; with the stable rank ``sum s_i^2 / s_1^2`` and the number of components holding 90% of ``sum s_i^2``;
- sign stability of an entry: ``|sum_t sign(g_t)| / n`` over its ``n`` steps with a non-zero gradient (so exactly
  zero steps, e.g. GRPO steps whose groups all had equal rewards, neither dilute it nor shift its null), with its
  mean, the share above 0.5 and 0.8 and the random-sign null ``E|S_n| / n`` averaged over the entries.
"""

from gradlens.stats.core import (
    GRAM_BLOCK,
    SignNull,
    cosine_matrix,
    cosine_to_mean,
    energy_count,
    erank,
    gram_norms,
    gram_product,
    gram_singular_values,
    histogram_edges,
    lag_cosine_means,
    lag_cosines,
    null_histogram,
    sign_null_mean,
    sign_null_pmf,
    sign_null_share,
    sign_null_table,
    sign_stability,
    spectrum_rows,
    spectrum_stats,
    stability_histogram,
    stable_rank,
    stable_share,
    step_grams,
    step_spectrum_stats,
    trajectory_stats,
    unit_gram,
)
from gradlens.stats.driver import analyze_run
from gradlens.stats.results import ACC_SOURCE, RAW_SOURCE, RunStats, ScopeStats, run_regime, stat_columns

__all__ = [
    "ACC_SOURCE", "GRAM_BLOCK", "RAW_SOURCE", "RunStats", "ScopeStats", "SignNull", "analyze_run", "cosine_matrix",
    "cosine_to_mean", "energy_count", "erank", "gram_norms", "gram_product",
    "gram_singular_values", "histogram_edges", "lag_cosine_means", "lag_cosines", "null_histogram", "run_regime",
    "sign_null_mean", "sign_null_pmf", "sign_null_share", "sign_null_table", "sign_stability", "spectrum_rows",
    "spectrum_stats", "stability_histogram", "stable_rank", "stable_share", "stat_columns", "step_grams",
    "step_spectrum_stats", "trajectory_stats", "unit_gram",
]
