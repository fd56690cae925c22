"""Diagnostics with known answers: CKA, MINE, attention distance, parameter change, gradients."""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_faults import wait_for  # the fault tests' poll-until helper

from dtsweep.diagnostics.attention import attention_distance, tokens_to_timesteps
from dtsweep.diagnostics.cka import linear_cka, linear_cka_both
from dtsweep.diagnostics.gradients import (
    _groups,
    clip_per_sample,
    dt_action_loss,
    dt_gradient_stats,
    gradient_confusion,
    gradient_stats,
    norm_shares,
    per_sample_grads,
)
from dtsweep.diagnostics.mine import (
    estimate_mi,
    estimate_mi_batched,
    train_critic_pairs,
    train_critics,
)
from dtsweep.diagnostics.params import param_changes
from dtsweep.models import build_decision_transformer, eager_attention

torch.set_num_threads(1)

TINY = dict(n_layer=2, n_embd=32, n_head=2)
S, A, K = 5, 2, 4


def tiny_dt(seed: int = 0):
    return build_decision_transformer("random", state_dim=S, act_dim=A, seed=seed, context_len=K, overrides=TINY, max_ep_len=50)


def dt_batch(b: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random windows with some left padding, in the layout of dtsweep.data.window_batch."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, K)
    mask[0, :2] = 0
    mask[min(3, b - 1), :1] = 0
    return {
        "states": torch.randn(b, K, S, generator=g),
        "actions": (torch.rand(b, K, A, generator=g) * 2 - 1) * mask[..., None] + -10 * (1 - mask[..., None]),
        "returns_to_go": torch.randn(b, K, 1, generator=g) * mask[..., None],
        "timesteps": torch.randint(0, 50, (b, K), generator=g) * mask.long(),
        "attention_mask": mask,
    }


# ---------------------------------------------------------------------------------------------
# CKA


def _random_orthogonal(d: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_of_a_representation_with_itself_is_one(debiased):
    x = torch.randn(60, 12, generator=torch.Generator().manual_seed(0))
    assert linear_cka(x, x, debiased=debiased) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("width", [8, 300])  # n > d: feature-space route; n < d: Gram route
def test_cka_invariant_to_rotation_scaling_and_shift(debiased, width):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(100, width, generator=g, dtype=torch.float64)
    y = torch.tanh(x[:, :5] @ torch.randn(5, 7, generator=g, dtype=torch.float64)) + 0.3 * torch.randn(
        100, 7, generator=g, dtype=torch.float64
    )
    base = linear_cka(x, y, debiased=debiased)
    assert 0.05 < base < 0.95  # a value that could move
    moved = 3.7 * x @ _random_orthogonal(width, g) + torch.randn(width, generator=g, dtype=torch.float64) * 5
    assert linear_cka(moved, y, debiased=debiased) == pytest.approx(base, abs=1e-9)
    assert linear_cka(y, moved, debiased=debiased) == pytest.approx(base, abs=1e-9)


def test_cka_compares_examples_not_units():
    """Reordering units (an orthogonal map) leaves CKA at 1; reordering examples breaks it."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(80, 16, generator=g)
    assert linear_cka(x, x[:, torch.randperm(16, generator=g)]) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, x[torch.randperm(80, generator=g)]) < 0.5
    with pytest.raises(ValueError, match="same examples"):
        linear_cka(x, x[:40])


def _hsic_u_statistic(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al.'s unbiased HSIC by its definition: the mean of h over distinct index 4-tuples."""
    n = len(k)
    total, count = 0.0, 0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
        count += 1
    return total / count


@pytest.mark.parametrize("width", [3, 40])
def test_debiased_cka_matches_the_u_statistic_definition(width):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, width))
    y = x[:, :2] @ rng.standard_normal((2, 5)) + rng.standard_normal((8, 5))
    k, l = x @ x.T, y @ y.T
    expected = _hsic_u_statistic(k, l) / math.sqrt(_hsic_u_statistic(k, k) * _hsic_u_statistic(l, l))
    # Same formula, different summation order (BLAS kernels differ by CPU): float64 rounding only.
    assert linear_cka(x, y, debiased=True) == pytest.approx(expected, rel=1e-7)


def test_plug_in_cka_matches_centred_gram_formula():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((30, 6)), rng.standard_normal((30, 9))
    h = np.eye(30) - 1 / 30
    kc, lc = h @ x @ x.T @ h, h @ y @ y.T @ h
    expected = np.sum(kc * lc) / np.sqrt(np.sum(kc * kc) * np.sum(lc * lc))
    # Same quantity by another route: agreement to float64 rounding of a few hundred terms.
    assert linear_cka(x, y) == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize("width", [6, 300])  # feature-space route and Gram route
def test_cka_both_estimators_from_one_set_of_products_match_plain_formulas(width):
    """What `diagnose` calls: both estimators at once, against the centred-Gram formula and
    Song et al.'s U-statistic written out directly."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((30, width))
    y = np.tanh(x[:, :3] @ rng.standard_normal((3, 9))) + 0.5 * rng.standard_normal((30, 9))
    plug_in, debiased = linear_cka_both(x, y)
    h = np.eye(30) - 1 / 30
    kc, lc = h @ x @ x.T @ h, h @ y @ y.T @ h
    assert plug_in == pytest.approx(np.sum(kc * lc) / np.sqrt(np.sum(kc * kc) * np.sum(lc * lc)), rel=1e-7)
    k, l = x @ x.T, y @ y.T

    # The U-statistic over all 4-tuples of 30 rows is too slow in Python: use its closed form
    # (Song et al., eq. 5) on the raw Gram matrices, a route independent of the module's.
    def u(k, l):
        kt, lt = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
        n, one = len(k), np.ones(len(k))
        return (np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * one @ kt @ lt @ one) / (n * (n - 3))  # fmt: skip

    assert debiased == pytest.approx(u(k, l) / math.sqrt(u(k, k) * u(l, l)), rel=1e-7)
    assert (plug_in, debiased) == (pytest.approx(linear_cka(x, y), rel=1e-12),
                                   pytest.approx(linear_cka(x, y, debiased=True), rel=1e-12))  # fmt: skip


def test_debiased_cka_is_near_zero_for_independent_data():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(200, 50, generator=g), torch.randn(200, 50, generator=g)
    assert abs(linear_cka(x, y, debiased=True)) < 0.03
    assert linear_cka(x, y) > 0.15  # the plug-in estimate is biased up at this n/d


# ---------------------------------------------------------------------------------------------
# MINE


def correlated_gaussians(n: int, d: int, rho: float, seed: int):
    """x, y [n, d] with corr(x_k, y_k) = rho per dimension; I(x; y) = −d/2 · log(1 − rho²)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = rho * x + math.sqrt(1 - rho**2) * rng.standard_normal((n, d))
    return x.astype(np.float32), y.astype(np.float32), -0.5 * d * math.log(1 - rho**2)


FAST_MINE = dict(hidden=64, steps=300, lr=1e-3, batch_size=256)


def test_mine_batched_recovers_gaussian_mutual_information():
    # Widths differ across the batch, so zero-padding is exercised too.
    cases = [(1, 0.0), (1, 0.8), (2, 0.5), (4, 0.0)]
    xs, ys, truth = zip(*(correlated_gaussians(2000, d, r, seed=i) for i, (d, r) in enumerate(cases)))
    est = estimate_mi_batched(list(xs), list(ys), seed=0, **FAST_MINE)
    assert est.shape == (4,)
    for (d, rho), e, t in zip(cases, est, truth):
        # Held-out DV bound from 400 rows: noise of a few hundredths of a nat (5 seeds: |err| <= 0.06).
        tol = 0.03 if rho == 0 else 0.1
        assert abs(e - t) < tol, f"d={d} rho={rho}: estimate {e:.3f}, true {t:.3f}"


def test_mine_critics_of_a_batch_train_independently():
    # float64: stacks of different sizes take different float32 matmul kernels, whose rounding
    # training amplifies; in float64 any leak between critics would stand out from rounding.
    kw = dict(hidden=32, steps=40, lr=1e-3, batch_size=64, eval_every=10, dtype=torch.float64)
    xa, ya, _ = correlated_gaussians(300, 2, 0.7, seed=10)
    xb, yb, _ = correlated_gaussians(300, 2, 0.2, seed=11)
    xc, yc, _ = correlated_gaussians(300, 2, 0.9, seed=12)
    with_b = estimate_mi_batched([xa, xb], [ya, yb], seed=3, **kw)
    with_c = estimate_mi_batched([xa, xc], [ya, yc], seed=3, **kw)
    alone = estimate_mi(xa, ya, seed=3, **kw)
    assert with_b[0] == pytest.approx(with_c[0], abs=1e-9)
    assert alone == pytest.approx(with_b[0], abs=1e-9)
    assert with_b[1] != pytest.approx(with_c[1], abs=1e-3)
    # Deterministic for a seed, different for another.
    assert estimate_mi(xa, ya, seed=3, **kw) == alone
    assert estimate_mi(xa, ya, seed=4, **kw) != alone


def test_mine_with_the_job_defaults_recovers_gaussian_mutual_information():
    """The options `diagnose` uses (narrow critics, early stopping), on known answers."""
    from dtsweep.diagnostics.job import DEFAULT_OPTIONS

    names = ("hidden", "layers", "steps", "batch_size", "lr", "eval_every", "patience", "eval_shuffles")
    kw = {k: DEFAULT_OPTIONS["mine"][k] for k in names}
    cases = [(1, 0.0), (1, 0.8), (2, 0.5), (2, 0.8)]
    xs, ys, truth = zip(*(correlated_gaussians(4096, d, r, seed=30 + i) for i, (d, r) in enumerate(cases)))
    result = train_critics(list(xs), list(ys), seed=0, **kw)
    for (d, rho), e, t in zip(cases, result.mi, truth):
        # Held-out DV bound from 819 rows: noise of a few hundredths of a nat. Above ~2 nats
        # MINE underestimates more (2.2 for 2.49 nats at d=3, rho=0.9), as the DV bound does.
        tol = 0.03 if rho == 0 else 0.1
        assert abs(e - t) < tol, f"d={d} rho={rho}: estimate {e:.3f}, true {t:.3f}"
    # Early stopping ended every critic well before the cap.
    assert (result.stop_step < kw["steps"]).all() and (result.best_step < result.stop_step).all()


def test_mine_early_stopping_keeps_critics_independent():
    """Critics that stop early leave the stack; the others train on exactly as if alone."""
    kw = dict(hidden=32, steps=60, lr=3e-3, batch_size=64, eval_every=5, patience=2, dtype=torch.float64)
    xa, ya, _ = correlated_gaussians(400, 2, 0.7, seed=10)
    xb, yb, _ = correlated_gaussians(400, 2, 0.0, seed=11)  # nothing to learn: stops first
    both = train_critics([xa, xb], [ya, yb], seed=3, **kw)
    alone = train_critics([xa], [ya], seed=3, **kw)
    assert both.stop_step[1] < both.stop_step[0] <= kw["steps"]  # the stack was compacted
    # In float64 (see above) any use of another critic's Adam moments or EMA would show.
    assert both.mi[0] == pytest.approx(alone.mi[0], abs=1e-9)
    assert both.best_step[0] == alone.best_step[0] and both.stop_step[0] == alone.stop_step[0]
    # The early-stopped critic ran exactly `patience` evaluations past its best one.
    assert both.best_step[1] == both.stop_step[1] - kw["patience"] * kw["eval_every"]


def test_mine_critics_sharing_a_source_recover_gaussian_mutual_information():
    """The job's layout: many x sources against one shared y source (a block's output at the
    last state), stored once, with the job's default options; known answers per pair."""
    from dtsweep.diagnostics.job import DEFAULT_OPTIONS

    names = ("hidden", "layers", "steps", "batch_size", "lr", "eval_every", "patience", "eval_shuffles")
    kw = {k: DEFAULT_OPTIONS["mine"][k] for k in names}
    rng = np.random.default_rng(40)
    n, rhos = 4096, [0.0, 0.5, 0.8]  # up to 0.5 nats: with 15 irrelevant y dims MINE falls short above
    y = rng.standard_normal((n, 16)).astype(np.float32)  # 16 wide: most of y is irrelevant
    xs = [(r * y[:, i] + math.sqrt(1 - r**2) * rng.standard_normal(n)).astype(np.float32)[:, None]
          for i, r in enumerate(rhos)]  # fmt: skip
    truth = [-0.5 * math.log(1 - r**2) for r in rhos]
    shared = train_critic_pairs(xs, [y], [(i, 0) for i in range(len(xs))], seed=0, **kw)
    for r, e, t in zip(rhos, shared.mi, truth):
        tol = 0.03 if r == 0 else 0.1
        assert abs(e - t) < tol, f"rho={r}: estimate {e:.3f}, true {t:.3f}"
    # Sharing is storage only: the same critics given private copies of y estimate the same.
    copies = train_critics(xs, [y] * len(xs), seed=0, **kw)
    np.testing.assert_allclose(shared.mi, copies.mi, atol=1e-4)
    np.testing.assert_array_equal(shared.best_step, copies.best_step)


def test_mine_rejects_mismatched_samples():
    x, y, _ = correlated_gaussians(100, 1, 0.5, seed=0)
    with pytest.raises(ValueError, match="same n"):
        estimate_mi_batched([x, x[:50]], [y, y[:50]], steps=1)
    with pytest.raises(ValueError, match="disagree"):
        estimate_mi(x, y[:50], steps=1)


@pytest.mark.slow
def test_mine_with_the_paper_critic_recovers_gaussian_mutual_information():
    """The default estimator (3×400 ReLU critic, default steps and lr), not the fast test setup."""
    cases = [(1, 0.0), (2, 0.8)]
    xs, ys, truth = zip(*(correlated_gaussians(3000, d, r, seed=20 + i) for i, (d, r) in enumerate(cases)))
    est = estimate_mi_batched(list(xs), list(ys), seed=0)
    assert abs(est[0] - truth[0]) < 0.03
    assert abs(est[1] - truth[1]) < 0.12


# ---------------------------------------------------------------------------------------------
# Attention distance


def test_attention_distance_on_hand_made_maps():
    t = 4
    identity = torch.eye(t)  # every query attends to itself: distance 0
    first = torch.zeros(t, t)
    first[:, 0] = 1  # query i attends to token 0: distance i, mean (0+1+2+3)/4
    uniform = torch.tril(torch.ones(t, t))
    uniform = uniform / uniform.sum(1, keepdim=True)  # query i: mean of 0..i = i/2, mean 0.75
    d = attention_distance(torch.stack([identity, first, uniform]))
    assert d.tolist() == pytest.approx([0.0, 1.5, 0.75], abs=1e-6)  # float32 maps
    assert tokens_to_timesteps(d).tolist() == pytest.approx([0.0, 0.5, 0.25], abs=1e-6)


def test_attention_distance_skips_padded_queries_and_keeps_batch_dims():
    t = 4
    # Token 0 is left padding. Valid query i ∈ {1, 2, 3} attends uniformly to keys 1..i:
    # distances 0, 0.5, 1 -> mean 0.5. The padded query's row is uniform over all keys, as in
    # the DT; counting it would give (1.5 + 0 + 0.5 + 1) / 4.
    padded = torch.zeros(t, t)
    padded[0] = 1 / t
    for i in range(1, t):
        padded[i, 1 : i + 1] = 1 / i
    maps = torch.stack([torch.stack([padded, padded]), torch.stack([torch.eye(t), padded])])  # [2, 2, T, T]
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1]])
    d = attention_distance(maps, mask)
    assert d.shape == (2, 2)
    torch.testing.assert_close(d, torch.tensor([[0.5, 0.5], [0.0, 0.5]], dtype=torch.float64))
    no_valid_rows = attention_distance(torch.eye(t)[None], torch.zeros(t))
    assert math.isnan(float(no_valid_rows[0]))


def test_attention_distance_checks_the_maps():
    t = 3
    full = torch.full((1, t, t), 1 / t)
    with pytest.raises(ValueError, match="future"):
        attention_distance(full)
    # A bidirectional map is fine when declared: rows give 1, 2/3, 1.
    assert float(attention_distance(full, causal=False)[0]) == pytest.approx(8 / 9)
    with pytest.raises(ValueError, match="sum to 1"):
        attention_distance(0.5 * torch.eye(t)[None])
    onto_padding = torch.eye(t)[None].clone()
    onto_padding[0, 2] = torch.tensor([0.5, 0.0, 0.5])
    with pytest.raises(ValueError, match="padded"):
        attention_distance(onto_padding, torch.tensor([0, 1, 1]))


def test_attention_distance_of_a_real_decision_transformer():
    model = tiny_dt().eval()
    batch = dt_batch()
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
    token_mask = batch["attention_mask"].repeat_interleave(3, dim=1)
    for attn in out.attentions:  # [B, heads, 3K, 3K]
        d = attention_distance(attn, token_mask)
        assert d.shape == (6, TINY["n_head"])
        assert torch.all((d >= 0) & (d <= 3 * K - 1))
        # The per-batch mean is the batch's value; heads are never pooled.
        assert not torch.allclose(d[:, 0], d[:, 1])


# ---------------------------------------------------------------------------------------------
# Parameter change


def test_param_changes_of_known_edits():
    a = tiny_dt().state_dict()
    b = {n: t.clone() for n, t in a.items()}
    b["transformer.h.1.mlp.c_fc.weight"] *= 2  # same direction, distance = its norm
    b["transformer.h.0.attn.c_proj.weight"] *= -1  # opposite direction, distance = 2 × norm
    b["embed_state.weight"] += 1  # outside the blocks: not reported
    rows = {r["tensor"]: r for r in param_changes(a, b)}
    block_tensors = [n for n in a if n.startswith("transformer.h.")]
    assert sorted(rows) == sorted(block_tensors)
    scaled, flipped = rows["transformer.h.1.mlp.c_fc.weight"], rows["transformer.h.0.attn.c_proj.weight"]
    assert scaled["block"] == 1 and flipped["block"] == 0
    assert scaled["l2"] == pytest.approx(scaled["norm_a"]) and scaled["cosine"] == pytest.approx(1.0)
    assert flipped["l2"] == pytest.approx(2 * flipped["norm_a"]) and flipped["cosine"] == pytest.approx(-1.0)
    same = rows["transformer.h.1.ln_2.weight"]
    assert same["l2"] == 0.0 and same["cosine"] == pytest.approx(1.0) and same["numel"] == TINY["n_embd"]
    # HF initialises biases at zero: no direction, so no cosine.
    assert math.isnan(rows["transformer.h.0.attn.c_attn.bias"]["cosine"])


def test_param_changes_rejects_mismatched_states():
    a = tiny_dt().state_dict()
    b = dict(a)
    b["transformer.h.0.ln_1.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="shapes differ"):
        param_changes(a, b)
    del b["transformer.h.0.ln_1.weight"]
    with pytest.raises(KeyError):
        param_changes(a, b)


# ---------------------------------------------------------------------------------------------
# Per-sample gradients


def _loop_grads(model, batch) -> list[dict[str, torch.Tensor]]:
    """The reference: one backward pass per sample, in eval mode."""
    model.eval()
    out = []
    for i in range(len(batch["states"])):
        model.zero_grad()
        dt_action_loss(model, {k: v[i : i + 1] for k, v in batch.items()}).backward()
        out.append(
            {
                n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                for n, p in model.named_parameters()
                if p.requires_grad
            }
        )
    return out


def test_per_sample_grads_equal_a_loop_over_samples():
    model = tiny_dt().train()  # dropout on: the measurement must switch it off
    batch = dt_batch()
    with eager_attention(model.transformer):
        grads = per_sample_grads(model, dt_action_loss, batch)
    assert model.training  # mode restored
    expected = _loop_grads(model, batch)
    assert list(grads) == list(expected[0])
    for i, exp in enumerate(expected):
        for n, g in exp.items():
            torch.testing.assert_close(grads[n][i], g, rtol=1e-4, atol=1e-6)


def test_per_sample_clipping_matches_torch_clip_grad_norm():
    model = tiny_dt()
    batch = dt_batch()
    with eager_attention(model.transformer):
        grads = per_sample_grads(model, dt_action_loss, batch)
    clipped, before, after = clip_per_sample(grads, max_norm=0.25)
    params = dict(model.named_parameters())
    assert (before > 0.25).any()  # the test clips something
    for i in range(len(before)):
        for n, g in grads.items():
            params[n].grad = g[i].clone()
        total = torch.nn.utils.clip_grad_norm_([params[n] for n in grads], 0.25)
        assert float(before[i]) == pytest.approx(float(total), rel=1e-5)
        for n in grads:
            torch.testing.assert_close(clipped[n][i], params[n].grad)
        assert float(after[i]) == pytest.approx(min(float(total), 0.25), rel=1e-4)


def test_gradient_confusion_of_hand_made_gradients():
    assert gradient_confusion({"w": torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])}) == pytest.approx(-1.0)
    two = {"w": torch.tensor([[1.0, 0.0], [1.0, 0.0]]), "b": torch.tensor([[0.0], [1.0]])}
    assert gradient_confusion(two) == pytest.approx(1 / math.sqrt(2))


def test_gradient_stats_in_groups_equal_the_full_computation():
    model = tiny_dt()
    batch = dt_batch()
    with eager_attention(model.transformer):
        grads = per_sample_grads(model, dt_action_loss, batch)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    max_elements = 6 * 3000  # forces many groups on this ~30k-parameter model
    assert len(_groups(params, 6, max_elements)) > 4
    stats = dt_gradient_stats(model, batch, max_elements=max_elements)
    with eager_attention(model.transformer):
        stats_direct = gradient_stats(model, dt_action_loss, batch)  # one group

    flat = torch.cat([g.flatten(1) for g in grads.values()], 1).double()
    norm = flat.norm(dim=1)
    cos = (flat @ flat.T) / (norm[:, None] * norm[None, :])
    _, _, after = clip_per_sample(grads, 0.25)
    for s in (stats, stats_direct):
        torch.testing.assert_close(s.norm, norm, rtol=1e-5, atol=0)
        torch.testing.assert_close(s.clipped_norm, after, rtol=1e-5, atol=0)
        torch.testing.assert_close(s.cosine, cos, rtol=0, atol=1e-5)
        off = ~torch.eye(6, dtype=torch.bool)
        assert s.confusion == pytest.approx(float(cos[off].min()), abs=1e-5)
        shares = s.shares
        torch.testing.assert_close(sum(shares.values()), torch.ones(6, dtype=torch.float64))
        for n, g in grads.items():
            torch.testing.assert_close(shares[n], g.flatten(1).double().square().sum(1) / norm**2, rtol=1e-5, atol=1e-12)
    for n, share in norm_shares(grads).items():
        torch.testing.assert_close(share, stats.shares[n], rtol=1e-5, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# The Ray Data job over a real (tiny) sweep directory

JOB_SPEC = {
    "name": "diag",
    "defaults": {
        "context_len": 2,
        "data": {"steps": 3000, "seed": 0},
        "model": {"n_layer": 2, "n_embd": 16, "n_head": 2},
        "train": {"epochs": 2, "steps_per_epoch": 4, "batch_size": 8, "warmup_steps": 2},
        "eval": {"episodes": 2, "max_steps": 20, "action_error_samples": 16},
        "checkpoint_epochs": [0, 1, "final"],
    },
    "studies": [{"name": "main", "init": ["random"], "dataset": ["hopper-random"], "seed": [0, 1]}],
}
JOB_OPTIONS = {
    "cka": {"n_windows": 64},
    "mine": {"n_windows": 256, "hidden": 16, "steps": 20, "lr": 1e-3, "batch_size": 64},
    "gradients": {"n_samples": 8},
    "attention": {"n_windows": 16},
}


@pytest.fixture(scope="module")
def trained_sweep(tmp_path_factory, data_cache):
    """Two trained trials written by the real TrialRunner, ledger and compaction (no Tune)."""
    from dtsweep.spec import parse_spec
    from dtsweep.store import Store
    from dtsweep.sweepdir import Ledger, compact
    from dtsweep.train.loop import TrialRunner

    spec = parse_spec({**JOB_SPEC, "storage": str(tmp_path_factory.mktemp("runs"))})
    store = Store(spec.sweep_dir)
    trials = spec.trials()
    for trial in trials:
        TrialRunner(trial, store, device=torch.device("cpu")).run()
    Ledger(store, trials).write()
    compact(store)
    return spec.sweep_dir, trials


def test_diagnose_writes_every_kind_for_every_trial_and_resumes(trained_sweep):
    import pandas as pd
    import ray

    from dtsweep.diagnostics.job import KINDS, plan, run_diagnostics
    from dtsweep.report.inputs import DIAGNOSTIC_COLUMNS

    sweep_dir, trials = trained_sweep
    ids = {t.trial_id for t in trials}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = run_diagnostics(sweep_dir, num_cpus=2, options=JOB_OPTIONS, log=lambda _: None)
    finally:
        ray.shutdown()
    first = {k: pd.read_parquet(p) for k, p in out.items()}

    # Resumable: a rerun finds nothing to measure (and starts no workers)...
    messages = []
    assert run_diagnostics(sweep_dir, options=JOB_OPTIONS, log=messages.append) == out
    assert "0 to measure, 10 already done" in messages[-1]
    assert not ray.is_initialized()
    # ...and a lost part is due again, alone.
    tid = sorted(ids)[0]
    (Path(sweep_dir) / f"diagnostics/parts/params/{tid}.parquet").unlink()
    assert [(i["trial_id"], i["kind"]) for i in plan(sweep_dir).todo] == [(tid, "params")]

    assert set(out) == set(KINDS)
    for kind, df in first.items():
        assert set(df["trial_id"]) == ids, kind
        assert {"init", "env", "dataset", "context_len", "swap_block", "seed", *DIAGNOSTIC_COLUMNS[kind]} <= set(df.columns)

    n_layer, k, heads = 2, 2, 2
    cka = first["cka"]
    assert len(cka) == 2 * 9 * n_layer * 3
    assert cka["cka"].between(0, 1 + 1e-9).all() and (cka["n"] == 64).all()
    assert set(cka["layer"]) == {f"h.{b}.{m}" for b in range(n_layer) for m in ("ln_1", "attn.c_attn", "attn.c_proj",
        "attn.resid_dropout", "ln_2", "mlp.c_fc", "mlp.act", "mlp.c_proj", "mlp.dropout")}  # fmt: skip

    mine = first["mine"]
    assert len(mine) == 2 * 2 * 2 * (3 * k - 1)  # trials × blocks {0, 1} × {X, Y} × tokens but a_K
    assert set(mine["depth"]) == {"shallow", "middle"} and mine["mi_nats"].notna().all()
    assert not ((mine["position"] == k - 1) & (mine["token"] == "action")).any()

    params = first["params"]
    assert params["tensor"].str.startswith("transformer.h.").all()
    assert (params.groupby("trial_id")["l2"].max() > 0).all()  # training moved the weights

    grads = first["gradients"]
    samples = grads[grads["row"] == "sample"]
    assert len(samples) == 2 * 8 and (samples["grad_norm_clipped"] <= 0.25 + 1e-6).all()
    assert (samples["grad_norm_clipped"] <= samples["grad_norm"] + 1e-12).all()
    summary = grads[grads["row"] == "summary"]
    assert len(summary) == 2 and summary["confusion"].between(-1, 1).all()
    shares = grads[grads["row"] == "tensor"].groupby("trial_id")["share"].sum()
    assert np.allclose(shares, 1.0)

    att = first["attention"]
    assert len(att) == 2 * 3 * n_layer * heads  # trials × epochs {0, 1, 2} × blocks × heads
    assert (att.loc[att["epoch"] == 0, "gap_tokens"] == 0).all()
    assert att["distance_tokens"].between(0, 3 * k - 1).all()

    timings = pd.read_parquet(f"{sweep_dir}/diagnostics/timings.parquet")
    assert len(timings) == 2 * len(KINDS) and (timings["seconds"] > 0).all() and (timings["cpu_seconds"] > 0).all()


def test_gradients_of_a_frozen_trial_leave_the_frozen_backbone_out(tmp_path, data_cache):
    """The same epoch-1 weights measured as a trial that trained everything and as one whose
    backbone was frozen (train.freeze: blocks): only the tensors that trained count."""
    import pandas as pd

    from dtsweep.diagnostics.job import Context, _merge_options, measure_gradients
    from dtsweep.models import backbone_config_dict
    from dtsweep.spec import parse_spec
    from dtsweep.store import Store, write_checkpoint

    model_cfg = JOB_SPEC["defaults"]["model"]
    model = build_decision_transformer("random", state_dim=11, act_dim=3, seed=0, context_len=2, overrides=model_cfg)
    store = Store(str(tmp_path))
    meta = {"trial_id": "t", "epoch": 1, "state_dim": 11, "act_dim": 3, "backbone_config": backbone_config_dict(model)}
    write_checkpoint(store, "epoch=1.parquet", model.state_dict(), meta)
    ckpts = {1: store.uri("epoch=1.parquet")}
    ctx = Context(device=torch.device("cpu"), options=_merge_options(JOB_OPTIONS), max_grad_elements=2**27)

    rows = {}
    for freeze in ("none", "blocks"):
        defaults = {**JOB_SPEC["defaults"], "train": {**JOB_SPEC["defaults"]["train"], "freeze": freeze}}
        spec = parse_spec({**JOB_SPEC, "storage": str(tmp_path / freeze), "defaults": defaults})
        rows[freeze] = pd.DataFrame(measure_gradients(ctx, spec.trials()[0], ckpts))
    tensors = {f: set(df.loc[df["row"] == "tensor", "tensor"]) for f, df in rows.items()}
    backbone = {t for t in tensors["none"] if t.startswith("transformer.")}
    assert backbone  # the unfrozen trial does count the backbone
    assert tensors["blocks"] == tensors["none"] - backbone
    frozen = rows["blocks"]
    assert frozen.loc[frozen["row"] == "tensor", "share"].sum() == pytest.approx(1.0)
    # Same weights, same windows: leaving tensors out can only shorten each sample's gradient.
    norms = {f: df.loc[df["row"] == "sample", "grad_norm"].to_numpy() for f, df in rows.items()}
    assert (norms["blocks"] < norms["none"]).all()


def test_plan_costs_diagnostics_from_the_measured_figures():
    """`plan`'s diagnostics estimate (dtsweep.costs) uses the job's own settings and scales with size."""
    from dtsweep.costs import (
        DIAGNOSTICS_CPU_SECONDS,
        MINE_HIDDEN,
        diagnostics_estimate,
        estimate,
    )
    from dtsweep.diagnostics.job import DEFAULT_OPTIONS, KINDS
    from dtsweep.spec import load_spec

    assert MINE_HIDDEN == DEFAULT_OPTIONS["mine"]["hidden"] and set(DIAGNOSTICS_CPU_SECONDS) == set(KINDS)
    root = Path(__file__).resolve().parents[1]
    trial = load_spec(root / "sweeps/quickstart.yaml").trials()[0]  # the reference shape itself
    est = diagnostics_estimate(trial)
    assert est == pytest.approx(DIAGNOSTICS_CPU_SECONDS)
    assert estimate(trial).diagnostics_cpu_hours == pytest.approx(sum(est.values()) / 3600)
    wider = dataclasses.replace(trial, model={**trial.model, "n_embd": 256})
    assert all(diagnostics_estimate(wider)[k] > est[k] for k in KINDS)
    # No epoch-1 checkpoint: no gradients to measure, and nothing to cost for them.
    no_epoch_1 = dataclasses.replace(trial, checkpoint_epochs=(0, trial.epochs))
    assert set(diagnostics_estimate(no_epoch_1)) == set(KINDS) - {"gradients"}


def _diagnose_in_background(sweep_dir: str, address: str, **kwargs):
    """run_diagnostics in a thread (nodes can only be added from the main thread); returns
    (thread, log lines, outcome dict filled with "out" or "error")."""
    import threading

    from dtsweep.diagnostics.job import run_diagnostics

    lines, outcome = [], {}

    def target():
        try:
            outcome["out"] = run_diagnostics(sweep_dir, address=address, log=lines.append, **kwargs)
        except Exception as e:  # reported by the test's own assertion
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, lines, outcome


def test_diagnose_pool_grows_onto_a_node_that_joins(trained_sweep, tmp_path):
    """The worker pool starts with what the cluster fits (one CPU) and takes on a node that
    joins while the job runs, as an autoscaler's would."""
    import shutil

    import pandas as pd
    from ray.cluster_utils import Cluster

    sweep_dir = str(tmp_path / "sweep")
    shutil.copytree(trained_sweep[0], sweep_dir, ignore=shutil.ignore_patterns("diagnostics"))  # none measured yet
    # MINE items (measured first, the longest kind) slow enough, ~25 s each on an idle 2-core
    # machine, that the first worker is still busy with them when the new node's worker has
    # started (~10 s; the remaining items then have two workers).
    options = {**JOB_OPTIONS, "mine": {**JOB_OPTIONS["mine"], "steps": 10000, "patience": None}}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        thread, lines, outcome = _diagnose_in_background(sweep_dir, cluster.address, options=options)
        wait_for(lambda: any("worker(s) on CPU" in line for line in lines) or not thread.is_alive(), 180, "the pool")
        assert any("1 worker(s) on CPU, up to 10" in line for line in lines), (outcome, lines)
        node = cluster.add_node(num_cpus=1)
        assert thread.is_alive() and not any("/10 " in line for line in lines), f"the job ended before the node joined: {lines}"
        thread.join(timeout=300)
        assert not thread.is_alive() and "error" not in outcome, (outcome, lines)
    finally:
        cluster.shutdown()
    timings = pd.read_parquet(f"{sweep_dir}/diagnostics/timings.parquet")
    assert len(timings) == 10
    assert node.node_id in set(timings["node_id"]), f"no item ran on the node that joined: {timings}"
    assert timings["node_id"].nunique() == 2


def test_diagnose_gpu_on_waits_for_a_gpu_node(trained_sweep, tmp_path):
    """`--gpu on` on a cluster without GPUs: the workers ask for a GPU each and run once a GPU
    node joins (here a node that declares one; torch finds no CUDA there, so they measure on
    CPU). `auto` on the same cluster runs on its CPUs and says so."""
    import shutil
    import time

    import pandas as pd
    from ray.cluster_utils import Cluster

    from dtsweep.cluster import ray_session
    from dtsweep.diagnostics.job import worker_pool

    sweep_dir = str(tmp_path / "sweep")
    shutil.copytree(trained_sweep[0], sweep_dir, ignore=shutil.ignore_patterns("diagnostics"))  # none measured yet
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        with ray_session(cluster.address):
            auto_lines = []
            _, per_actor = worker_pool(4, "auto", log=auto_lines.append)
            assert per_actor == {"num_cpus": 1} and "workers run on CPUs" in auto_lines[0]
        thread, lines, outcome = _diagnose_in_background(sweep_dir, cluster.address, kinds=["params"], gpu="on")
        wait_for(lambda: any("wait for GPU nodes" in line for line in lines), 120, "the job to start")
        time.sleep(3)
        assert thread.is_alive() and not any("1/2" in line for line in lines), "measured without a GPU"
        node = cluster.add_node(num_cpus=1, num_gpus=1)
        thread.join(timeout=180)
        assert not thread.is_alive() and "error" not in outcome, (outcome, lines)
    finally:
        cluster.shutdown()
    timings = pd.read_parquet(f"{sweep_dir}/diagnostics/timings.parquet")
    assert set(timings["node_id"]) == {node.node_id} and (timings["device"] == "cpu").all()
