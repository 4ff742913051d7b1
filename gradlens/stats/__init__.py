"""The leaves of the statistics of recorded LoRA-B gradients: pure functions (:mod:`.core`), the exact streaming
sums (:mod:`.streaming`), their per-step update on the gradients' device (:mod:`.device`) and the shape of an update
trajectory against a random walk's (:mod:`.trajectory`). The package imports
nothing itself, so the store and the recorder, which need only the leaves, never load the analysis layer
(:mod:`gradlens.analysis`: the out-of-core driver over a run and its results).

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
