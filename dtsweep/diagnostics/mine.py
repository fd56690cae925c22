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
`train_critic_pairs` trains them in stacked networks: the weights of m critics live in [m, ...]
tensors and every layer is one batched matmul, so a stack of m critics costs one Python loop, not
m (stacks of 32 on CPU, where bigger ones fall out of cache; one stack on a GPU). Adam is
element-wise and the critics' losses are summed, so each critic trains exactly as it would alone,
and every stack replays the same minibatch rows. Inputs of different widths are zero-padded; padded inputs are zero and their weights never
receive gradient.

Work that does not change the estimate is not done:
- The samples are stored once per *source* (a DT's 3 × 59 token representations), not once per
  critic: critics name their (x source, y source), and a step gathers only its minibatch rows.
- The first layer is linear, W·[x; y] = W_x·x + W_y·y, so it is computed once per sample and
  side: a minibatch's joint pairs and its product-of-marginals pairs (the same x with the y of
  independently drawn rows, as in MINE) share the x projection, and the validation and
  held-out bounds project their rows once for all their cyclic shifts of y.
  (Pairing x with the minibatch's own y rolled would save the second y projection too, but on
  a trained ChibiT checkpoint its critics stopped earlier, about 0.03 nats lower on average:
  not the same estimator in practice, so it is not used.)
- Critics stop early (`patience`) and leave the stack.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["CriticResult", "estimate_mi", "estimate_mi_batched", "train_critic_pairs", "train_critics"]


def _as_matrix(a, device, dtype) -> torch.Tensor:
    t = torch.as_tensor(a).detach().to(device=device, dtype=dtype)
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2:
        raise ValueError(f"each sample matrix must be [n, d], got shape {tuple(t.shape)}")
    return t


def _stack_sources(arrays, device, dtype) -> tuple[torch.Tensor, list[int]]:
    """list of [n, d_i] (or one [m, n, d]) -> zero-padded [n, m, max d] of `dtype`, widths d_i.

    Sample-major, so that a minibatch's rows of every source are one contiguous gather.
    """
    if isinstance(arrays, (torch.Tensor, np.ndarray)) and np.ndim(arrays) == 3:
        arrays = list(arrays)
    tensors = [_as_matrix(a, device, dtype) for a in arrays]
    n = {t.shape[0] for t in tensors}
    if len(n) != 1:
        raise ValueError(f"all estimates of one batch must share the same n samples, got {sorted(n)}")
    widths = [t.shape[1] for t in tensors]
    out = torch.zeros(n.pop(), len(tensors), max(widths), device=device, dtype=dtype)
    for i, t in enumerate(tensors):
        out[:, i, : t.shape[1]] = t
    return out, widths


def _standardise_(a: torch.Tensor, train_idx: torch.Tensor) -> torch.Tensor:
    """Standardise a [n, sources, d] in place per (source, feature) with the training rows' statistics."""
    std, mean = torch.std_mean(a[train_idx], 0, keepdim=True)
    # Constant features (and zero padding) carry no information: leave them at zero.
    return a.sub_(mean).div_(torch.where(std > 1e-8, std, torch.ones_like(std)))


class _StackedCritics(torch.nn.Module):
    """m independent MLPs T_i(x, y) = MLP(W_x x + W_y y + b), evaluated with batched matmuls.

    The first layer is kept split in its x and y parts (`project`), so that callers can combine
    one projection of each side into many (x, y) pairings (`head`).
    """

    def __init__(self, x_widths: Sequence[int], y_widths: Sequence[int], dx: int, dy: int, hidden: int, layers: int, seed: int,
                 ids: Sequence[int]):  # fmt: skip
        """x_widths[i], y_widths[i]: critic i's real (unpadded) input widths; dx, dy: padded widths;
        ids[i]: critic i's index among all critics of the call (seeds its initial weights)."""
        super().__init__()
        m = len(x_widths)
        dims = [hidden] * layers + [1]
        wx, wy, b1 = torch.zeros(m, dx, hidden), torch.zeros(m, dy, hidden), torch.zeros(m, 1, hidden)
        rest_w = [torch.zeros(m, a, b) for a, b in itertools.pairwise(dims)]
        rest_b = [torch.zeros(m, 1, b) for b in dims[1:]]
        for i in range(m):
            # One generator per critic: critic i starts from the same weights whatever else is
            # in the batch. nn.Linear's default scale, with the true (unpadded) fan-in.
            g = torch.Generator().manual_seed(seed * 1_000_003 + ids[i] * 7919)
            fan_in = x_widths[i] + y_widths[i]
            bound = 1.0 / math.sqrt(fan_in)
            w = (torch.rand(fan_in, hidden, generator=g) * 2 - 1) * bound
            wx[i, : x_widths[i]], wy[i, : y_widths[i]] = w[: x_widths[i]], w[x_widths[i] :]
            b1[i] = (torch.rand(1, hidden, generator=g) * 2 - 1) * bound
            for w_k, b_k in zip(rest_w, rest_b):
                bound = 1.0 / math.sqrt(w_k.shape[1])
                w_k[i] = (torch.rand(w_k.shape[1:], generator=g) * 2 - 1) * bound
                b_k[i] = (torch.rand(b_k.shape[1:], generator=g) * 2 - 1) * bound
        self.weights = torch.nn.ParameterList([torch.nn.Parameter(w) for w in (wx, wy, *rest_w)])
        self.biases = torch.nn.ParameterList([torch.nn.Parameter(b) for b in (b1, *rest_b)])

    def project(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [m, b, dx], y [m, b2, dy] -> first-layer parts W_x x + b [m, b, hidden] and W_y y [m, b2, hidden]."""
        return torch.baddbmm(self.biases[0], x, self.weights[0]), torch.bmm(y, self.weights[1])

    def head(self, pre: torch.Tensor) -> torch.Tensor:
        """First-layer pre-activations [m, b, hidden] -> T [m, b]."""
        h = pre
        for w, b in zip(self.weights[2:-1], self.biases[1:-1]):
            h = torch.baddbmm(b, torch.relu(h), w)
        # The output layer as a product and a sum: a batched matmul with one output column runs
        # at a few GFLOPS on CPU (a quarter of a training step's time went there).
        w, b = self.weights[-1], self.biases[-1]  # [m, hidden, 1], [m, 1, 1]
        return (torch.relu(h) * w.transpose(1, 2)).sum(-1) + b[:, :, 0]


def _log_mean_exp(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.logsumexp(t, dim) - math.log(t.shape[dim])


@dataclass
class _EvalSet:
    """Rows set aside for a bound, in a random order, and the cyclic shifts of y that pair
    every x with some other row's y (shift s in 1..k−1 never pairs a row with itself)."""

    rows: torch.Tensor  # [k] indices into the n samples
    shifts: list[int]


def _eval_set(rows: torch.Tensor, shuffles: int, g: torch.Generator) -> _EvalSet:
    k = len(rows)
    order = torch.randperm(k, generator=g).to(rows.device)
    shifts = (torch.randperm(k - 1, generator=g)[:shuffles] + 1).tolist()
    return _EvalSet(rows[order], shifts)


def _dv_bound(critics: _StackedCritics, x: torch.Tensor, y: torch.Tensor, shifts: list[int]) -> torch.Tensor:
    """Donsker–Varadhan bound E_joint[T] − log E_marginal[e^T] per critic, [m].

    x [m, k, dx], y [m, k, dy]: k joint samples per critic; the marginal term averages the
    pairings (x_i, y_{i+s}) over `shifts`. The first layer is projected once; one shift at a
    time keeps memory at a few [m, k, hidden] activations.
    """
    px, py = critics.project(x, y)
    joint = critics.head(px + py).mean(1)
    lse = torch.stack([torch.logsumexp(critics.head(px + py.roll(s, 1)), 1) for s in shifts])
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


def _adam(params, lr: float) -> torch.optim.Adam:
    # The fused kernel (CPU and CUDA) does the same update in one pass over each tensor instead
    # of about ten: half of the optimiser's time in a stack of 32 critics.
    return torch.optim.Adam(params, lr=lr, fused=True)


def _compact(critics: _StackedCritics, opt: torch.optim.Adam, keep: torch.Tensor, lr: float):
    """Drop the critics not in `keep` (bool [m_active]) from the stack and from Adam's state.

    Adam is element-wise, so the remaining critics continue exactly as if nothing was dropped.
    """
    old = list(critics.parameters())
    states = [opt.state.get(p, {}) for p in old]
    for plist in (critics.weights, critics.biases):
        for i, p in enumerate(plist):
            plist[i] = torch.nn.Parameter(p.detach()[keep].clone())
    new_opt = _adam(critics.parameters(), lr)
    for p, state in zip(critics.parameters(), states):
        if state:
            new_opt.state[p] = {k: (v[keep].clone() if k != "step" else v.clone()) for k, v in state.items()}
    return new_opt


def train_critics(xs, ys, *, seed: int = 0, **kwargs) -> CriticResult:
    """MINE estimates of I(x_i; y_i) in nats for m pairs of sample matrices at once.

    xs: m matrices [n, dx_i] (a list, or one [m, n, dx] array/tensor); ys: m matrices [n, dy_i].
    Row r of xs[i] and row r of ys[i] are one joint sample; all m pairs share the same n.
    Critic i pairs xs[i] with ys[i]; see `train_critic_pairs` for the method and the options.
    """
    m = len(xs)
    if len(ys) != m:
        raise ValueError(f"xs and ys disagree on (m, n): {m} vs {len(ys)} estimates")
    return train_critic_pairs(xs, ys, [(i, i) for i in range(m)], seed=seed, **kwargs)


def train_critic_pairs(
    x_sources,
    y_sources,
    pairs: Sequence[tuple[int, int]],
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
    stack: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> CriticResult:
    """MINE estimates of I(x_sources[i]; y_sources[j]) in nats for each (i, j) of `pairs`.

    x_sources: matrices [n, dx_i] (a list, or one [S, n, dx] array/tensor); y_sources likewise
    [n, dy_j]. Row r of every source is the same joint sample, so all sources share n. A source
    shared by several critics is stored once (a DT's block output at the last state token is
    the y of 59 critics).
    A seeded permutation sets aside holdout·n rows for the estimate and `validation` of the rest
    for choosing the training step (0 disables the choice: the last step's weights are kept).
    Each critic runs up to `steps` Adam steps on minibatches of `batch_size` joint pairs and as
    many product-of-marginals pairs (x with the y of independently drawn rows); its weights at
    the validation-best multiple of `eval_every` give the DV bound on the held-out rows, whose
    marginal term averages `eval_shuffles` cyclic shifts of the held-out y.

    patience: stop a critic once its validation bound has not improved for `patience`
        evaluations in a row (None: train every critic for `steps`). A stopped critic leaves the
        stack, so the others' steps get cheaper; its kept weights are those it would have kept
        anyway if its best step is followed by no better one (the usual early-stopping bet).
    stack: how many critics train as one stacked network at a time (None: 32 on CPU, all on a
        GPU). On a CPU a stack's activations should stay in cache: one stack of a trial's 354
        critics spent more time faulting in and streaming fresh [354, 256, hidden] tensors than
        multiplying (1.5× the time of stacks of 32 while all critics train, 1.15× over a whole
        trial with early stopping). It changes no estimate: every stack replays the same split,
        evaluation rows and minibatch rows.
    Runs on `device` (default: that of the first x source if it is a tensor, else CPU) in
    `dtype` (float64 only to check results exactly); deterministic for a given seed and device,
    and each critic's result is the same whatever else is in the call (in float32 up to the
    rounding of batched matmuls of another size, which training amplifies to ~1e-2 nats).
    Returns a CriticResult with one entry per pair, in the order of `pairs`.
    """
    if device is None:
        first = x_sources[0] if not isinstance(x_sources, torch.Tensor) else x_sources
        device = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    if patience is not None and patience < 1:
        raise ValueError(f"patience must be >= 1 evaluations or None, got {patience}")
    if stack is not None and stack < 1:
        raise ValueError(f"stack must be >= 1 critics or None, got {stack}")
    if not pairs:
        raise ValueError("no (x source, y source) pairs to estimate")
    n_x, n_y = len(x_sources), len(y_sources)
    if any(not (0 <= i < n_x and 0 <= j < n_y) for i, j in pairs):
        raise ValueError(f"pairs name sources outside the {n_x} x and {n_y} y sources")
    # Only the sources some pair uses are stacked (a chunk of a DT's critics uses a few).
    used_x, used_y = sorted({i for i, _ in pairs}), sorted({j for _, j in pairs})
    x, x_widths = _stack_sources([x_sources[i] for i in used_x], device, dtype)  # [n, Sx, dx]
    y, y_widths = _stack_sources([y_sources[j] for j in used_y], device, dtype)  # [n, Sy, dy]
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"xs and ys disagree on (m, n): n = {x.shape[0]} vs {y.shape[0]}")
    x_ids = torch.tensor([used_x.index(i) for i, _ in pairs], dtype=torch.long, device=device)
    y_ids = torch.tensor([used_y.index(j) for _, j in pairs], dtype=torch.long, device=device)
    m, n = len(pairs), x.shape[0]
    n_hold = int(round(holdout * n))
    if n_hold < 2 or n - n_hold < 2:
        raise ValueError(f"n={n} with holdout={holdout} leaves too few samples to train or to estimate")

    g = torch.Generator(device="cpu").manual_seed(seed)
    perm = torch.randperm(n, generator=g).to(device)
    n_val = int(round(validation * (n - n_hold)))
    hold_idx, val_idx, train_idx = perm[:n_hold], perm[n_hold : n_hold + n_val], perm[n_hold + n_val :]
    x, y = _standardise_(x, train_idx), _standardise_(y, train_idx)  # our own copies
    val_set = _eval_set(val_idx, eval_shuffles, g) if n_val >= 2 else None
    # Drawn before training, so that how long the others train cannot change a critic's estimate.
    hold_set = _eval_set(hold_idx, eval_shuffles, g)
    data = _Samples(x, y, train_idx, val_set, hold_set)
    options = dict(steps=steps, batch_size=batch_size, lr=lr, ema_rate=ema_rate, eval_every=eval_every, patience=patience)

    stack = stack or (32 if device.type == "cpu" else m)
    minibatch_state = g.get_state()
    results = []
    for lo in range(0, m, stack):
        g.set_state(minibatch_state)  # every stack draws the same minibatch rows
        ids = list(range(lo, min(lo + stack, m)))
        critics = _StackedCritics([x_widths[i] for i in x_ids[ids].tolist()], [y_widths[j] for j in y_ids[ids].tolist()],
                                  x.shape[2], y.shape[2], hidden, layers, seed, ids).to(device=device, dtype=dtype)  # fmt: skip
        results.append(_train_stack(critics, data, x_ids[ids], y_ids[ids], g, **options))
    return CriticResult(mi=np.concatenate([r.mi for r in results]), best_step=np.concatenate([r.best_step for r in results]),
                        stop_step=np.concatenate([r.stop_step for r in results]))  # fmt: skip


@dataclass
class _Samples:
    """The standardised samples of a call and its split: x [n, Sx, dx], y [n, Sy, dy]."""

    x: torch.Tensor
    y: torch.Tensor
    train_idx: torch.Tensor
    val_set: _EvalSet | None
    hold_set: _EvalSet

    @staticmethod
    def gather(a: torch.Tensor, rows: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
        """a [n, S, d] -> [m, k, d]: rows `rows` [k] of sources `sources` [m], one contiguous copy."""
        index = (sources[:, None] + rows[None, :] * a.shape[1]).flatten()
        return a.view(-1, a.shape[2]).index_select(0, index).view(len(sources), len(rows), a.shape[2])

    def rows_of(self, rows: torch.Tensor, xi: torch.Tensor, yi: torch.Tensor):
        """The samples `rows` of each critic's sources: x [m, k, dx], y [m, k, dy]."""
        return self.gather(self.x, rows, xi), self.gather(self.y, rows, yi)


def _train_stack(
    critics: _StackedCritics,
    data: _Samples,
    x_ids: torch.Tensor,
    y_ids: torch.Tensor,
    g: torch.Generator,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    ema_rate: float,
    eval_every: int,
    patience: int | None,
) -> CriticResult:
    """Train one stack of m critics (x_ids, y_ids [m]: their sources); see train_critic_pairs."""
    device, dtype = x_ids.device, critics.weights[0].dtype
    x, y, train_idx, val_set = data.x, data.y, data.train_idx, data.val_set
    gather = data.gather
    m = len(x_ids)
    opt = _adam(critics.parameters(), lr)
    n_train = len(train_idx)

    active = torch.arange(m, device=device)  # ids of the critics still training
    best_val = torch.full((m,), -math.inf, device=device, dtype=dtype)
    best_step = np.zeros(m, dtype=np.int64)
    stop_step = np.full(m, steps, dtype=np.int64)
    since_best = torch.zeros(m, dtype=torch.long, device=device)
    best = [p.detach().clone() for p in critics.parameters()]
    log_ema = None  # log of the moving average of E_marginal[exp T], one per active critic
    for step in range(1, steps + 1):
        joint = train_idx[torch.randint(n_train, (batch_size,), generator=g).to(device)]
        other = train_idx[torch.randint(n_train, (batch_size,), generator=g).to(device)]
        xi, yi = x_ids[active], y_ids[active]
        # Joint pairs (x_i, y_i), then (x_i, y_other_i): `other` is an independent draw of rows,
        # so the second half samples the product of the marginals. The x side's projection
        # serves both; the y side of both halves is one gather and one matmul.
        px, py = critics.project(gather(x, joint, xi), gather(y, torch.cat([joint, other]), yi))
        pre = py.view(len(active), 2, batch_size, -1) + px.unsqueeze(1)
        t = critics.head(pre.flatten(1, 2))
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
        if val_set is None or not (step % eval_every == 0 or step == steps):
            continue
        with torch.no_grad():
            val = _dv_bound(critics, *data.rows_of(val_set.rows, x_ids[active], y_ids[active]), val_set.shifts)
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
        if val_set is None:  # no choice of step: the last weights of every critic
            best = [p.detach() for p in critics.parameters()]
            best_step[:] = stop_step
        n_w = len(critics.weights)
        for plist, values in ((critics.weights, best[:n_w]), (critics.biases, best[n_w:])):
            for i, v in enumerate(values):
                plist[i] = torch.nn.Parameter(v)
        mi = _dv_bound(critics, *data.rows_of(data.hold_set.rows, x_ids, y_ids), data.hold_set.shifts)
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
