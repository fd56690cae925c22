"""The analyses of Takagi (2022), measured on every trial of a sweep (DESIGN §4).

    linear_cka(x, y, debiased=False)          cka.py        representation similarity of n examples
    linear_cka_both(x, y)                     cka.py        (plug-in, debiased) from one set of products
    estimate_mi(x, y) / estimate_mi_batched   mine.py       MINE mutual information, nats
    train_critic_pairs(x_srcs, y_srcs, pairs) mine.py       MINE for (x source, y source) pairs, sources stored once
    param_changes(state_a, state_b)           params.py     per-tensor L2 distance and cosine
    per_sample_grads / gradient_stats         gradients.py  per-sample gradient norms, confusion, shares
    attention_distance(attn, mask)            attention.py  mean attended distance per head, tokens
    run_diagnostics(sweep_dir, kinds)         job.py        all of them as a Ray Data job -> Parquet
    estimated_seconds(kind, n_layer, ...)     costs.py      CPU seconds per trial and kind, for plans

Where the released reference code got an analysis wrong, and what is done here instead:
- CKA sliced the feature axis: here the rows compared are examples (tokens), never units;
- attention distance averaged over heads and masked after the softmax: here each head is
  measured on the model's own masked softmax, and padded queries are left out.
"""

from dtsweep.diagnostics.attention import attention_distance, tokens_to_timesteps
from dtsweep.diagnostics.cka import linear_cka, linear_cka_both
from dtsweep.diagnostics.gradients import (
    GradientStats,
    clip_per_sample,
    dt_action_loss,
    dt_gradient_stats,
    gradient_confusion,
    gradient_stats,
    norm_shares,
    per_sample_grads,
)
from dtsweep.diagnostics.job import estimated_seconds
from dtsweep.diagnostics.mine import CriticResult, estimate_mi, estimate_mi_batched, train_critic_pairs, train_critics
from dtsweep.diagnostics.params import param_changes

__all__ = [
    "CriticResult",
    "estimated_seconds",
    "train_critic_pairs",
    "train_critics",
    "GradientStats",
    "attention_distance",
    "clip_per_sample",
    "dt_action_loss",
    "dt_gradient_stats",
    "estimate_mi",
    "estimate_mi_batched",
    "gradient_confusion",
    "gradient_stats",
    "linear_cka",
    "linear_cka_both",
    "norm_shares",
    "param_changes",
    "per_sample_grads",
    "tokens_to_timesteps",
]
