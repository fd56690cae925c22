"""Attention distance: how far back, in tokens, each head looks (Dosovitskiy et al., 2021).

For one head, the distance of query i is Σ_j attn[i, j]·|i − j|, the mean key offset weighted by
attention; the head's attention distance is its mean over the (valid) query positions.

The Takagi reference code averaged attention over heads before measuring (so a head looking far
back and one looking at itself blur into one medium-range head) and applied the causal mask to
the probabilities after the softmax. Here each head is measured on its own, on the model's own
softmax output (causal and padding masks applied before the softmax, as the DT computes it), and
the maps are checked: a valid query row must sum to 1 and put no weight on a future or padded
key. Padded query rows are left out of the mean (the DT's padded queries attend uniformly to
every key, which is meaningless).

With the DT's (R̂, s, a) layout three tokens make one timestep; `tokens_to_timesteps` converts.
"""

from __future__ import annotations

import torch

__all__ = ["attention_distance", "tokens_to_timesteps", "TOKENS_PER_TIMESTEP"]

TOKENS_PER_TIMESTEP = 3  # R̂_t, s_t, a_t


def attention_distance(
    attn: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    causal: bool = True,
    atol: float = 1e-4,
) -> torch.Tensor:
    """Mean attention distance per head, in tokens.

    Args:
        attn: [..., heads, T, T] attention probabilities, attn[..., h, i, j] = weight of key j
            for query i; leading dims (e.g. a batch) are kept.
        mask: [..., T] (same leading dims, or broadcastable to them), nonzero for real tokens,
            zero for padding. None: every token is real.
        causal: check that no valid query puts weight on a later key (a DT's maps must pass);
            False for maps of non-causal models.
        atol: tolerance of the checks (row sums, weight on future or padded keys).

    Returns:
        [..., heads] float64: the mean over valid query rows i of Σ_j attn[i, j]·|i − j|.
        NaN where a map has no valid query row.

    Raises:
        ValueError if a valid query row does not sum to 1 or weights a future/padded key.
    """
    attn = torch.as_tensor(attn)
    if attn.ndim < 3 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"expected [..., heads, T, T] attention maps, got shape {tuple(attn.shape)}")
    t = attn.shape[-1]
    a = attn.detach().to(torch.float64)
    if mask is None:
        valid = torch.ones(t, dtype=torch.bool, device=a.device)
    else:
        valid = torch.as_tensor(mask, device=a.device) != 0
        if valid.shape[-1] != t:
            raise ValueError(f"mask has {valid.shape[-1]} positions, the maps have {t}")
    valid = valid[..., None, :]  # [..., 1, T]: broadcasts over heads
    rows = valid  # query i is counted iff token i is real
    keys = valid[..., None, :]  # [..., 1, 1, T]

    pos = torch.arange(t, device=a.device)
    offset = pos[:, None] - pos[None, :]  # i − j
    row_ok = rows[..., :, None]  # [..., 1, T, 1]
    forbidden = ~keys
    if causal:
        forbidden = forbidden | (offset < 0)
    bad_weight = (a * (forbidden & row_ok)).amax() if a.numel() else 0.0
    if bad_weight > atol:
        raise ValueError(
            f"a valid query puts weight {float(bad_weight):.3g} on a "
            f"{'future or ' if causal else ''}padded key: not the model's masked attention"
        )
    row_sum_err = ((a.sum(-1) - 1).abs() * rows).amax() if a.numel() else 0.0
    if row_sum_err > atol:
        raise ValueError(f"valid query rows must sum to 1 (off by {float(row_sum_err):.3g})")

    per_query = (a * offset.abs()).sum(-1)  # [..., heads, T]
    n_rows = rows.sum(-1)
    return (per_query * rows).sum(-1) / n_rows


def tokens_to_timesteps(distance, tokens_per_timestep: int = TOKENS_PER_TIMESTEP):
    """Convert an attention distance in tokens into timesteps of the (R̂, s, a) layout."""
    return distance / tokens_per_timestep
