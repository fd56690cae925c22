"""Linear centered kernel alignment (CKA) between two sets of activations.

CKA compares two representations of the *same n inputs*: x[i] and y[i] are the activations of
input i in two networks (here: one DT checkpoint at epoch 0 and at the final epoch). The rows are
the examples (tokens) and the columns the units. The Takagi reference code sliced the unit axis
instead of the example axis, which compares units with units and is not CKA; here rows are always
examples.

With linear kernels K = X Xᵀ and L = Y Yᵀ (Kornblith et al., 2019),

    CKA(X, Y) = HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L)).

`debiased=False` uses the plug-in HSIC of the centered Gram matrices; `debiased=True` uses the
unbiased HSIC U-statistic of Song et al. (2012), as proposed for CKA by Nguyen, Raghu & Kornblith
(2021): the plug-in estimate is biased towards 1 when n is small relative to the width, the
unbiased one is centred on the population value (≈ 0 for independent data).

The traces come from d×d feature products or n×n Gram matrices, whichever is cheaper
(tr(K L) = ‖Xᵀ Y‖²_F), and the debiased terms from O(n·d) sums, so wide layers with few
examples and narrow layers with many are both cheap.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["linear_cka", "linear_cka_both"]


def _as_float64(a) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a)
    if t.ndim != 2:
        raise ValueError(f"expected a 2-D [n, d] activation matrix, got shape {tuple(t.shape)}")
    # Sums of squared products of activations lose digits quickly in float32.
    return t.detach().to(torch.float64)


def _products(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tr(KL), tr(KK), tr(LL)) for K = X Xᵀ, L = Y Yᵀ, through whichever side is cheaper.

    tr(K L) = ‖Xᵀ Y‖²_F: with n examples and widths d1, d2, the Gram route costs n²(d1 + d2)
    and the feature route n(d1·d2 + d1² + d2²).
    """
    n, d1 = x.shape
    d2 = y.shape[1]
    if n * (d1 + d2) < d1 * d2 + d1 * d1 + d2 * d2:
        k, l = x @ x.T, y @ y.T
        return (k * l).sum(), k.square().sum(), l.square().sum()
    return (x.T @ y).square().sum(), (x.T @ x).square().sum(), (y.T @ y).square().sum()


def _unbiased_hsic(tr_kl: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Song et al.'s U-statistic from tr(KL) and the features, times n(n − 3).

    With K̃, L̃ = Gram matrices with zero diagonal:
        tr(K̃ L̃) + (1ᵀK̃1)(1ᵀL̃1) / ((n − 1)(n − 2)) − 2/(n − 2) · 1ᵀK̃L̃1,
    all from O(n·d) quantities once tr(KL) is known.
    """
    n = x.shape[0]
    kd, ld = x.square().sum(1), y.square().sum(1)  # diagonals of K and L
    k1 = x @ x.sum(0) - kd  # K̃ 1
    l1 = y @ y.sum(0) - ld  # L̃ 1
    return tr_kl - kd @ ld + k1.sum() * l1.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (k1 @ l1)


def linear_cka_both(x, y) -> tuple[float, float]:
    """(plug-in, debiased) linear CKA between x [n, d1] and y [n, d2], n ≥ 4, from one set of products.

    Both estimators need the same three traces tr(KL), tr(KK), tr(LL); the debiased one adds
    only O(n·d) terms. Computing them once halves the cost of asking for both (`diagnose`
    reports both for every activation). Each value is what `linear_cka` returns for it.
    """
    x, y = _prepare(x, y, 4)
    xy, xx, yy = _products(x, y)
    plug_in = _ratio(xy, xx, yy)
    debiased = _ratio(_unbiased_hsic(xy, x, y), _unbiased_hsic(xx, x, x), _unbiased_hsic(yy, y, y))
    return plug_in, debiased


def _prepare(x, y, min_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sides as centred float64 [n, d] tensors on x's device, checked."""
    x, y = _as_float64(x), _as_float64(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same examples: {x.shape[0]} vs {y.shape[0]} rows")
    n = x.shape[0]
    if n < min_n:
        raise ValueError(f"need at least {min_n} examples, got {n}")
    y = y.to(x.device)
    # The U-statistic is already shift-invariant; centring it too only improves rounding.
    return x - x.mean(0), y - y.mean(0)


def _ratio(xy: torch.Tensor, xx: torch.Tensor, yy: torch.Tensor) -> float:
    # Both estimators are HSIC(K, L) up to a factor that depends on n only, which cancels.
    denom = torch.sqrt(xx * yy)
    if denom == 0:
        return float("nan")
    return float(xy / denom)


def linear_cka(x, y, debiased: bool = False) -> float:
    """Linear CKA between x [n, d1] and y [n, d2] (rows = the same n examples, e.g. tokens).

    Returns a float in [0, 1] for the plug-in estimator (the debiased one can fall slightly below
    0 or, for tiny n, above 1). Invariant to orthogonal transforms of either feature space, to
    isotropic scaling and to a shift of the features. NaN if either side is constant across the
    n examples (no variance to align). Accepts numpy arrays or torch tensors on any device.
    """
    x, y = _prepare(x, y, 4 if debiased else 2)
    xy, xx, yy = _products(x, y)
    if debiased:
        xy, xx, yy = _unbiased_hsic(xy, x, y), _unbiased_hsic(xx, x, x), _unbiased_hsic(yy, y, y)
    return _ratio(xy, xx, yy)
