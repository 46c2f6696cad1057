"""Baseline noisy-label scores that GEX is compared with (paper §5.1, App. F.6).

* `loss_scores`: the per-example training loss of the trained model θ*. On a
  model trained to zero loss every example is memorised, so this baseline
  degrades exactly where GEX is meant to help.
* `el2n_scores`: EL2N (Paul et al., 2021), the L2 norm of the error vector
  ``p(x) − y`` of models trained for only a few epochs, averaged over
  independently initialised runs (GEX paper App. E: 20 epochs × 5 repeats).
* `gex_lin_scores`: the paper's ablation I_GEX-lin, GEX with every loss
  deviation replaced by its first-order Taylor expansion around θ*,
  ``Δ_lin(z, m) = ∇_θ ℓ(z, θ*)ᵀ (θ_m − θ*)``, computed with forward-mode
  JVPs (no per-example gradient is materialised).
* `tracin_scores`: I_TracInRP (Pruthi et al., 2020) self-influence with the
  GE members as checkpoints (paper App. F.6), ``mean_c ||Q_Rᵀ g_z^c||²``.
* `randproj_scores`: I_RandProj, the same random projection at θ* alone
  (paper §5.1; the official code's `randproj`), optionally with the
  projected empirical Fisher as curvature (influence sketching).

Randomly projected gradients ``Q_Rᵀ g_z`` use seeded Gaussian directions
(`tf.random.stateless_normal`, one per column of Q_R). While Q_R (P × R
floats) fits half of `_PER_EXAMPLE_BYTES` (512 MiB), it is materialised and
multiplies per-example gradients taken with `tf.vectorized_map`, in chunks of
rows that keep within that budget: on CPU the faster route (timings in
`docs/benchmarks.md`). Larger models take R forward-mode JVPs per batch
along directions generated on the fly, memory O(P + batch × R). Both routes
give the same scores within float32 rounding.

All return one score per example in dataset order; **higher = more suspect**,
as `NoisyLabelReport.scores`. The loss-based baselines live in
`keras_gex.baselines.loss`, the gradient-based ones in
`keras_gex.baselines.gradients`; this package re-exports them.
"""

from __future__ import annotations

from keras_gex.baselines.gradients import gex_lin_scores, randproj_scores, tracin_scores
from keras_gex.baselines.loss import el2n_scores, loss_scores

__all__ = [
    "el2n_scores",
    "gex_lin_scores",
    "loss_scores",
    "randproj_scores",
    "tracin_scores",
]
