"""How far each transformer-block tensor moved during fine-tuning (Takagi §5.3).

Per tensor: the L2 distance ‖b − a‖ and the cosine similarity ⟨a, b⟩ / (‖a‖‖b‖) between the
epoch-0 weights a and the final weights b, flattened. Norms are kept too, so that a relative
distance ‖b − a‖ / ‖a‖ can be formed without reloading the checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

__all__ = ["param_changes", "BLOCK_PREFIX"]

# Where a DecisionTransformer's GPT-2 blocks live in its state dict: transformer.h.<i>.<...>.
BLOCK_PREFIX = "transformer.h."


def param_changes(
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    prefix: str = BLOCK_PREFIX,
) -> list[dict]:
    """One row per floating-point tensor whose name starts with `prefix`, in state-dict order.

    The component of the name right after `prefix` must be the block index (GPT-2 layout
    `transformer.h.<i>.attn.c_attn.weight`). Each row:
        tensor  full state-dict name
        block   int, the block index
        l2      ‖b − a‖₂ over all elements (float64 accumulation)
        cosine  ⟨a, b⟩ / (‖a‖‖b‖); NaN if either tensor is all zeros
        norm_a, norm_b  ‖a‖₂, ‖b‖₂
        numel   number of elements
    Non-floating tensors (integer or boolean buffers such as causal masks) are not parameters
    and are skipped. Raises KeyError if a selected tensor is missing from state_b and
    ValueError on a shape mismatch.
    """
    rows = []
    for name, a in state_a.items():
        if not name.startswith(prefix) or not torch.is_floating_point(a):
            continue
        if name not in state_b:
            raise KeyError(f"{name} is in the first state dict but not in the second")
        b = state_b[name]
        if a.shape != b.shape:
            raise ValueError(f"{name}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
        block = name[len(prefix) :].split(".", 1)[0]
        if not block.isdigit():
            raise ValueError(f"{name}: no block index after {prefix!r}")
        a64 = a.detach().reshape(-1).to(torch.float64)
        b64 = b.detach().reshape(-1).to(device=a64.device, dtype=torch.float64)
        norm_a, norm_b = float(a64.norm()), float(b64.norm())
        dot = float(a64 @ b64)
        rows.append(
            {
                "tensor": name,
                "block": int(block),
                "l2": float((b64 - a64).norm()),
                "cosine": dot / (norm_a * norm_b) if norm_a > 0 and norm_b > 0 else math.nan,
                "norm_a": norm_a,
                "norm_b": norm_b,
                "numel": a.numel(),
            }
        )
    return rows
