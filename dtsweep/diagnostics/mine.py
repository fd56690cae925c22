"""Mutual information neural estimation (MINE, Belghazi et al., 2018), many critics at once.

The estimator is the Donsker–Varadhan (DV) lower bound

    I(X; Y) ≥ E_{p(x,y)}[T(x, y)] − log E_{p(x)p(y)}[exp T(x, y)],

maximised over a statistics network T (here 3 hidden layers of 400 ReLU units, as in Takagi et
al.). Training follows MINE proper, not MINE-f: the gradient of the log-denominator is
bias-corrected with an exponential moving average of E[exp T] over minibatches (kept in log space
so that large T cannot overflow).

The samples are split three ways. The critic trains on one part; every `eval_every` steps its DV
bound on a validation part decides which weights to keep (a 3×400 network memorises a few
thousand pairs within a few hundred steps, after which the bound on unseen pairs falls); the
number reported is the DV bound of the kept weights on a held-out part used for nothing else. A
critic that memorised its training pairs therefore cannot inflate the estimate, and choosing the
step cannot either. The held-out estimate is a sample mean: with k held-out rows its noise is of
order std(T)/√k, a few hundredths of a nat for k in the hundreds.

Inputs are standardised per feature with training-split statistics (an invertible per-feature
affine map does not change MI and keeps the critic's inputs well scaled across layers).

A DT checkpoint needs hundreds of estimates (every token position × 3 blocks × I(X;T), I(Y;T)).
`estimate_mi_batched` trains them as one stacked network: the weights of m critics live in
[m, ...] tensors and every layer is one batched matmul, so m critics cost one Python loop, not m.
Adam is element-wise and the critics' losses are summed, so each critic trains exactly as it would
alone. Inputs of different widths are zero-padded; padded inputs are zero and their weights never
receive gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

__all__ = ["CriticResult", "estimate_mi", "estimate_mi_batched", "train_critics"]


def _stack_padded(arrays, device) -> tuple[torch.Tensor, list[int]]:
    """list of [n, d_i] (or [m, n, d]) -> zero-padded float32 [m, n, max d], widths d_i."""
    if isinstance(arrays, (torch.Tensor, np.ndarray)) and np.ndim(arrays) == 3:
        arrays = list(arrays)
    tensors = []
    for a in arrays:
        t = torch.as_tensor(a).detach().to(device=device, dtype=torch.float32)
        if t.ndim == 1:
            t = t[:, None]
        if t.ndim != 2:
            raise ValueError(f"each sample matrix must be [n, d], got shape {tuple(t.shape)}")
        tensors.append(t)
    n = {t.shape[0] for t in tensors}
    if len(n) != 1:
        raise ValueError(f"all estimates of one batch must share the same n samples, got {sorted(n)}")
    widths = [t.shape[1] for t in tensors]
    out = torch.zeros(len(tensors), n.pop(), max(widths), device=device)
    for i, t in enumerate(tensors):
        out[i, :, : t.shape[1]] = t
    return out, widths


def _standardise(a: torch.Tensor, train_idx: torch.Tensor) -> torch.Tensor:
    mean = a[:, train_idx].mean(1, keepdim=True)
    std = a[:, train_idx].std(1, keepdim=True)
    # Constant features (and zero padding) carry no information: leave them at zero.
    return (a - mean) / torch.where(std > 1e-8, std, torch.ones_like(std))


class _StackedCritics(torch.nn.Module):
    """m independent MLPs T_i: R^(dx_i + dy_i) -> R, evaluated with batched matmuls."""

    def __init__(self, input_rows: Sequence[torch.Tensor], in_dim: int, hidden: int, layers: int, seed: int):
        """input_rows[i]: indices of critic i's real (unpadded) inputs among the in_dim columns."""
        super().__init__()
        m = len(input_rows)
        dims = [in_dim] + [hidden] * layers + [1]
        self.weights = torch.nn.ParameterList()
        self.biases = torch.nn.ParameterList()
        for k, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])):
            w = torch.zeros(m, fan_in, fan_out)
            b = torch.zeros(m, 1, fan_out)
            for i in range(m):
                # One generator per critic: critic i starts from the same weights whatever else is
                # in the batch. nn.Linear's default scale, with the true (unpadded) fan-in.
                g = torch.Generator().manual_seed(seed * 1_000_003 + i * 7919 + k)
                rows = input_rows[i] if k == 0 else torch.arange(fan_in)
                bound = 1.0 / math.sqrt(len(rows))
                w[i, rows] = (torch.rand(len(rows), fan_out, generator=g) * 2 - 1) * bound
                b[i] = (torch.rand(1, fan_out, generator=g) * 2 - 1) * bound
            self.weights.append(torch.nn.Parameter(w))
            self.biases.append(torch.nn.Parameter(b))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs [m, b, in_dim] -> T [m, b]."""
        h = inputs
        last = len(self.weights) - 1
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b, h, w)
            if k < last:
                h = torch.relu(h)
        return h.squeeze(-1)


def _log_mean_exp(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.logsumexp(t, dim) - math.log(t.shape[dim])


def _marginal_shifts(x: torch.Tensor, y: torch.Tensor, shuffles: int, g: torch.Generator):
    """Put k samples [m, k, d] in a random order and pick `shuffles` cyclic shifts of y.

    Rolling y by a shift in 1..k−1 pairs every x with some other sample's y, never its own, so
    (x, y.roll(s)) is a draw from the product of marginals.
    """
    k = x.shape[1]
    order = torch.randperm(k, generator=g).to(x.device)
    shifts = (torch.randperm(k - 1, generator=g)[:shuffles] + 1).tolist()
    return x[:, order], y[:, order], shifts


def _dv_bound(critics: "_StackedCritics", x: torch.Tensor, y: torch.Tensor, shifts: list[int]) -> torch.Tensor:
    """Donsker–Varadhan bound E_joint[T] − log E_marginal[e^T] per critic, [m].

    One shift at a time, so that memory stays at one [m, k, hidden] activation.
    """
    joint = critics(torch.cat([x, y], -1)).mean(1)
    lse = torch.stack([torch.logsumexp(critics(torch.cat([x, y.roll(s, 1)], -1)), 1) for s in shifts])
    return joint - (torch.logsumexp(lse, 0) - math.log(len(shifts) * x.shape[1]))


@dataclass
class CriticResult:
    """What `train_critics` measured for m critics (all arrays [m]).

    mi:         held-out DV bound of the kept weights, nats (float64).
    best_step:  the training step whose weights were kept (0: the initial weights).
    stop_step:  the step at which the critic stopped training (early stop or `steps`).
    """

    mi: np.ndarray
    best_step: np.ndarray
    stop_step: np.ndarray


def _compact(critics: "_StackedCritics", opt: torch.optim.Adam, keep: torch.Tensor, lr: float):
    """Drop the critics not in `keep` (bool [m_active]) from the stack and from Adam's state.

    Adam is element-wise, so the remaining critics continue exactly as if nothing was dropped.
    """
    old = list(critics.parameters())
    states = [opt.state.get(p, {}) for p in old]
    for plist in (critics.weights, critics.biases):
        for i, p in enumerate(plist):
            plist[i] = torch.nn.Parameter(p.detach()[keep].clone())
    new_opt = torch.optim.Adam(critics.parameters(), lr=lr)
    for p, state in zip(critics.parameters(), states):
        if state:
            new_opt.state[p] = {k: (v[keep].clone() if k != "step" else v.clone()) for k, v in state.items()}
    return new_opt


def train_critics(
    xs,
    ys,
    *,
    seed: int = 0,
    hidden: int = 400,
    layers: int = 3,
    steps: int = 1000,
    batch_size: int = 256,
    lr: float = 1e-4,
    ema_rate: float = 0.01,
    holdout: float = 0.2,
    validation: float = 0.2,
    eval_every: int = 50,
    eval_shuffles: int = 16,
    patience: int | None = None,
    device: str | torch.device | None = None,
) -> CriticResult:
    """MINE estimates of I(x_i; y_i) in nats for m pairs of sample matrices at once.

    xs: m matrices [n, dx_i] (a list, or one [m, n, dx] array/tensor); ys: m matrices [n, dy_i].
    Row r of xs[i] and row r of ys[i] are one joint sample; all m pairs share the same n.
    A seeded permutation sets aside holdout·n rows for the estimate and `validation` of the rest
    for choosing the training step (0 disables the choice: the last step's weights are kept).
    Each critic runs up to `steps` Adam steps on minibatches of `batch_size` joint pairs and as
    many independently drawn product-of-marginals pairs; its weights at the validation-best
    multiple of `eval_every` give the DV bound on the held-out rows, whose marginal term averages
    `eval_shuffles` cyclic shifts of the held-out y.

    patience: stop a critic once its validation bound has not improved for `patience`
        evaluations in a row (None: train every critic for `steps`). A stopped critic leaves the
        stack, so the others' steps get cheaper; its kept weights are those it would have kept
        anyway if its best step is followed by no better one (the usual early-stopping bet).
    Runs on `device` (default: that of xs[0] if it is a tensor, else CPU); deterministic for a
    given seed and device, and each critic's result is the same whatever else is in the batch.
    """
    if device is None:
        first = xs[0] if not isinstance(xs, torch.Tensor) else xs
        device = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
    if patience is not None and patience < 1:
        raise ValueError(f"patience must be >= 1 evaluations or None, got {patience}")
    x, x_widths = _stack_padded(xs, device)
    y, y_widths = _stack_padded(ys, device)
    if x.shape[:2] != y.shape[:2]:
        raise ValueError(f"xs and ys disagree on (m, n): {tuple(x.shape[:2])} vs {tuple(y.shape[:2])}")
    m, n, _ = x.shape
    n_hold = int(round(holdout * n))
    if n_hold < 2 or n - n_hold < 2:
        raise ValueError(f"n={n} with holdout={holdout} leaves too few samples to train or to estimate")

    g = torch.Generator(device="cpu").manual_seed(seed)
    perm = torch.randperm(n, generator=g).to(device)
    n_val = int(round(validation * (n - n_hold)))
    hold_idx, val_idx, train_idx = perm[:n_hold], perm[n_hold : n_hold + n_val], perm[n_hold + n_val :]
    x, y = _standardise(x, train_idx), _standardise(y, train_idx)

    dx_max = x.shape[2]
    rows = [torch.cat([torch.arange(dx), dx_max + torch.arange(dy)]) for dx, dy in zip(x_widths, y_widths)]
    critics = _StackedCritics(rows, dx_max + y.shape[2], hidden, layers, seed).to(device)
    opt = torch.optim.Adam(critics.parameters(), lr=lr)
    xt, yt = x[:, train_idx], y[:, train_idx]
    n_train = xt.shape[1]
    val_x, val_y, val_shifts = _marginal_shifts(x[:, val_idx], y[:, val_idx], eval_shuffles, g) if n_val >= 2 else (None,) * 3
    # Drawn before training, so that how long the others train cannot change a critic's estimate.
    hold_set = _marginal_shifts(x[:, hold_idx], y[:, hold_idx], eval_shuffles, g)

    active = torch.arange(m, device=device)  # global ids of the critics still training
    best_val = torch.full((m,), -math.inf, device=device)
    best_step = np.zeros(m, dtype=np.int64)
    stop_step = np.full(m, steps, dtype=np.int64)
    since_best = torch.zeros(m, dtype=torch.long, device=device)
    best = [p.detach().clone() for p in critics.parameters()]
    log_ema = None  # log of the moving average of E_marginal[exp T], one per active critic
    for step in range(1, steps + 1):
        joint = torch.randint(n_train, (batch_size,), generator=g).to(device)
        other = torch.randint(n_train, (batch_size,), generator=g).to(device)
        xa, ya = xt[active], yt[active]
        pairs = torch.cat(
            [torch.cat([xa[:, joint], ya[:, joint]], -1), torch.cat([xa[:, joint], ya[:, other]], -1)], 1
        )
        t = critics(pairs)
        t_joint, t_marg = t[:, :batch_size], t[:, batch_size:]
        with torch.no_grad():
            lme = _log_mean_exp(t_marg)
            if log_ema is None:
                log_ema = lme
            else:
                log_ema = torch.logaddexp(log_ema + math.log1p(-ema_rate), lme + math.log(ema_rate))
        # d/dθ of mean(exp(T_marg − log_ema)) is ∇E[e^T] / EMA(E[e^T]): MINE's corrected gradient
        # of log E[e^T]. Summing over critics keeps their gradients separate.
        loss = (t_marg - log_ema[:, None]).exp().mean(1) - t_joint.mean(1)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        if val_x is None or not (step % eval_every == 0 or step == steps):
            continue
        with torch.no_grad():
            val = _dv_bound(critics, val_x[active], val_y[active], val_shifts)
            better = val > best_val[active]
            ids = active[better]
            best_val[ids] = val[better]
            best_step[ids.cpu().numpy()] = step
            for keep, p in zip(best, critics.parameters()):
                keep[ids] = p[better]
            since_best[active] = torch.where(better, 0, since_best[active] + 1)
        if patience is None:
            continue
        done = since_best[active] >= patience
        if bool(done.any()):
            stop_step[active[done].cpu().numpy()] = step
            keep_mask = ~done
            if not bool(keep_mask.any()):
                break
            active = active[keep_mask]
            log_ema = log_ema[keep_mask]
            opt = _compact(critics, opt, keep_mask, lr)

    with torch.no_grad():
        if val_x is None:  # no choice of step: the last weights of every critic
            best = [p.detach() for p in critics.parameters()]
            best_step[:] = stop_step
        n_w = len(critics.weights)
        for plist, values in ((critics.weights, best[:n_w]), (critics.biases, best[n_w:])):
            for i, v in enumerate(values):
                plist[i] = torch.nn.Parameter(v)
        mi = _dv_bound(critics, *hold_set)
    return CriticResult(mi=mi.double().cpu().numpy(), best_step=best_step, stop_step=stop_step)


def estimate_mi_batched(xs, ys, *, seed: int = 0, **kwargs) -> np.ndarray:
    """MINE estimates of I(x_i; y_i) in nats, float64 numpy [m]: `train_critics(...).mi`.

    xs: m matrices [n, dx_i]; ys: m matrices [n, dy_i]; see `train_critics` for the options.
    """
    return train_critics(xs, ys, seed=seed, **kwargs).mi


def estimate_mi(x, y, *, seed: int = 0, **kwargs) -> float:
    """MINE estimate of I(X; Y) in nats from x [n, dx] and y [n, dy] (rows are joint samples).

    A batch of one for `estimate_mi_batched`; see it for the options and the method.
    """
    return float(estimate_mi_batched([x], [y], seed=seed, **kwargs)[0])
