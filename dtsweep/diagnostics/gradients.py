"""Per-sample gradients, their norms after clipping, gradient confusion and norm shares
(Takagi §5.4).

For each of B training samples, g_i = ∇θ loss_i is computed with `torch.func` (vmap of grad of
a `functional_call`), not by B backward passes. From these:

- norm_i = ‖g_i‖ over all differentiated tensors, and the norm after clipping at `max_norm`
  (0.25 in both papers), with `torch.nn.utils.clip_grad_norm_`'s rule:
  g_i · min(1, max_norm / (‖g_i‖ + 1e-6)).
- gradient confusion (Sankararaman et al., 2020) = min over pairs i ≠ j of cos(g_i, g_j).
  Clipping multiplies each g_i by a positive number, so the cosines, and therefore the
  confusion, are the same before and after clipping; only the norms change.
- each tensor's share of a sample's squared gradient norm, ‖g_i[tensor]‖² / ‖g_i‖² (shares sum
  to 1 per sample and, for the same reason, do not change under clipping).

A GPT-2-sized DT has ~10⁸ parameters, so B per-sample copies of the whole gradient do not fit in
memory. `gradient_stats` therefore differentiates a group of tensors at a time (B × group size
≤ `max_elements`) and keeps only what the statistics need: per-tensor squared norms [B] and
the Gram matrix of the gradients [B, B], summed over groups. Each group costs one vmapped
forward/backward over the batch.

The measurement needs a deterministic model: dropout off. The functions switch the model to
eval mode for the measurement and restore its mode afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from dtsweep.models.dt import DecisionTransformer, eager_attention

__all__ = [
    "per_sample_grads",
    "clip_per_sample",
    "gradient_confusion",
    "norm_shares",
    "gradient_stats",
    "GradientStats",
    "dt_action_loss",
    "dt_gradient_stats",
    "CLIP_NORM",
]

CLIP_NORM = 0.25  # the gradient-norm clip of Reid et al. and Takagi

# loss_fn(forward, batch) -> scalar: `forward(*args, **kwargs)` runs the model; `batch` holds
# tensors with a leading batch dimension (of 1, for one sample).
LossFn = Callable[[Callable, Mapping[str, torch.Tensor]], torch.Tensor]


@contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def dt_action_loss(forward: Callable, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The DT's training loss: mean squared action error over the unpadded timesteps.

    batch: states [B, K, S], actions [B, K, A], returns_to_go [B, K, 1], timesteps [B, K],
    attention_mask [B, K] (1 real, 0 padding), as `dtsweep.data.window_batch` makes them.
    Written as a masked sum rather than boolean indexing so that it runs under vmap; equal to
    ((preds − actions)²)[mask].mean() of the training loop.
    """
    preds = forward(
        batch["states"],
        batch["actions"],
        batch["returns_to_go"],
        batch["timesteps"],
        batch["attention_mask"],
    ).action_preds
    mask = batch["attention_mask"].to(preds.dtype)[..., None]  # [B, K, 1]
    return ((preds - batch["actions"]).square() * mask).sum() / (mask.sum() * preds.shape[-1])


def _trainable(model: nn.Module, names: Iterable[str] | None) -> dict[str, torch.Tensor]:
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if names is None:
        return params
    names = list(names)
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"not trainable parameters of the model: {missing}")
    return {n: params[n] for n in names}


def per_sample_grads(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Mapping[str, torch.Tensor],
    *,
    names: Iterable[str] | None = None,
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """∇θ loss_fn for each sample of `batch` separately, in eval mode (no dropout).

    Args:
        model: any nn.Module.
        loss_fn: loss_fn(forward, sample_batch) -> scalar, where forward(*args, **kwargs) calls
            the model and sample_batch has the tensors of one sample with a batch dim of 1.
        batch: name -> tensor [B, ...]; sample i is every tensor's row i.
        names: the parameters to differentiate (default: every parameter with requires_grad);
            the others are held fixed.
        chunk_size: samples per vmapped chunk (bounds activation memory; None: all at once).

    Returns:
        name -> [B, *param.shape] per-sample gradients, in the order of `names`.
    """
    params = _trainable(model, names)
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in params}
    fixed.update(model.named_buffers())

    def sample_loss(p: dict, sample: dict) -> torch.Tensor:
        one = {k: v.unsqueeze(0) for k, v in sample.items()}
        return loss_fn(lambda *a, **kw: functional_call(model, (p, fixed), a, kw), one)

    with _eval_mode(model):
        return vmap(grad(sample_loss), in_dims=(None, 0), chunk_size=chunk_size)(params, dict(batch))


def clip_per_sample(
    grads: Mapping[str, torch.Tensor], max_norm: float = CLIP_NORM
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Clip each sample's gradient (name -> [B, ...]) to global norm ≤ max_norm.

    Returns (clipped grads, norms before [B], norms after [B]); the rule is that of
    torch.nn.utils.clip_grad_norm_ applied to one sample at a time.
    """
    sq = sum(g.flatten(1).double().square().sum(1) for g in grads.values())
    norm = sq.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    clipped = {n: g * scale.to(g.dtype).view(-1, *[1] * (g.ndim - 1)) for n, g in grads.items()}
    return clipped, norm, norm * scale


def _cosines_from_gram(gram: torch.Tensor) -> torch.Tensor:
    norm = gram.diagonal().sqrt()
    return gram / (norm[:, None] * norm[None, :])


def _min_off_diagonal(cos: torch.Tensor) -> float:
    b = cos.shape[0]
    if b < 2:
        raise ValueError("gradient confusion needs at least 2 samples")
    off = ~torch.eye(b, dtype=torch.bool, device=cos.device)
    return float(cos[off].min())


def gradient_confusion(grads: Mapping[str, torch.Tensor]) -> float:
    """Minimum pairwise cosine similarity of per-sample gradients (name -> [B, ...]), B ≥ 2."""
    flat = torch.cat([g.flatten(1).double() for g in grads.values()], 1)
    return _min_off_diagonal(_cosines_from_gram(flat @ flat.T))


def norm_shares(grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """name -> [B]: each tensor's share of each sample's squared gradient norm (sums to 1)."""
    sq = {n: g.flatten(1).double().square().sum(1) for n, g in grads.items()}
    total = sum(sq.values())
    return {n: s / total for n, s in sq.items()}


@dataclass
class GradientStats:
    """Per-sample gradient statistics of one batch of B samples (see `gradient_stats`).

    norm:         [B] ‖g_i‖ before clipping.
    clipped_norm: [B] ‖g_i‖ after clipping at max_norm.
    cosine:       [B, B] pairwise cosine similarities (the same before and after clipping).
    confusion:    min off-diagonal cosine: the gradient confusion.
    sq_norms:     name -> [B] ‖g_i[name]‖² before clipping.
    """

    norm: torch.Tensor
    clipped_norm: torch.Tensor
    cosine: torch.Tensor
    confusion: float
    sq_norms: dict[str, torch.Tensor]

    @property
    def shares(self) -> dict[str, torch.Tensor]:
        """name -> [B]: share of each sample's squared norm (unchanged by clipping)."""
        total = self.norm.square()
        return {n: s / total for n, s in self.sq_norms.items()}


def _groups(params: Mapping[str, torch.Tensor], batch_size: int, max_elements: int) -> list[list[str]]:
    """Consecutive tensors packed so that batch_size × group numel ≤ max_elements (≥ 1 tensor)."""
    groups, current, size = [], [], 0
    for n, p in params.items():
        if current and batch_size * (size + p.numel()) > max_elements:
            groups.append(current)
            current, size = [], 0
        current.append(n)
        size += p.numel()
    if current:
        groups.append(current)
    return groups


def gradient_stats(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Mapping[str, torch.Tensor],
    *,
    max_norm: float = CLIP_NORM,
    names: Iterable[str] | None = None,
    max_elements: int = 2**27,
    chunk_size: int | None = None,
) -> GradientStats:
    """Per-sample gradient norms (before/after clipping), confusion and norm shares, in bounded memory.

    Same arguments as `per_sample_grads`; `max_elements` bounds the per-sample gradients held
    at once (2**27 float32 elements = 512 MiB), and the tensors are differentiated in groups
    that fit (one vmapped forward/backward per group). Statistics are accumulated in float64.
    """
    params = _trainable(model, names)
    b = next(iter(batch.values())).shape[0]
    gram = None
    sq_norms: dict[str, torch.Tensor] = {}
    for group in _groups(params, b, max_elements):
        grads = per_sample_grads(model, loss_fn, batch, names=group, chunk_size=chunk_size)
        flat = torch.cat([grads[n].flatten(1) for n in group], 1)
        g = (flat @ flat.T).double()
        gram = g if gram is None else gram + g
        for n in group:
            sq_norms[n] = grads[n].flatten(1).double().square().sum(1)
        del grads, flat
    norm = sum(sq_norms.values()).sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    cosine = gram / (norm[:, None] * norm[None, :])
    return GradientStats(
        norm=norm,
        clipped_norm=norm * scale,
        cosine=cosine,
        confusion=_min_off_diagonal(cosine),
        sq_norms=sq_norms,
    )


def dt_gradient_stats(model: DecisionTransformer, batch: Mapping[str, torch.Tensor], **kwargs) -> GradientStats:
    """`gradient_stats` of a DecisionTransformer's action loss on a window batch.

    batch: as `dt_action_loss` takes it ([B, K, ...] windows). kwargs: those of gradient_stats
    (max_norm, names, max_elements, chunk_size). The backbone runs with eager attention here:
    transformers builds the SDPA mask with a branch on the mask's values, which vmap cannot
    trace; eager attention computes the same function.
    """
    with eager_attention(model.transformer):
        return gradient_stats(model, dt_action_loss, batch, **kwargs)
