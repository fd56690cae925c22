"""Batched evaluation and the training loop's fast paths compute what the slow ones compute.

Real MuJoCo hopper episodes, real tiny DTs, a real generated dataset; no timing assertions
(benchmarks/run.py measures speed). The sequential references are dtsweep's own evaluation run
one episode at a time and the reference-style code the benchmarks time (benchmarks/reference.py).
The last test covers `plan`'s cost model (dtsweep/costs.py), whose CPU figures the benchmarks make.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dtsweep.data import WindowSampler, load_dataset, split_trajectories
from dtsweep.envs import ENVS
from dtsweep.models import build_decision_transformer
from dtsweep.train import TrialRunner, evaluate_episodes
from dtsweep.train.evaluate import make_envs
from dtsweep.train.loop import use_fused_gelu

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not a package
from benchmarks.reference import ReferenceBatcher, as_released, reference_evaluate  # noqa: E402

torch.set_num_threads(1)

TINY = {"n_layer": 2, "n_embd": 32, "n_head": 2}
K = 5  # short context: the 40-step episodes below fill it and then slide it
INFO = ENVS["hopper"]


def tiny_dt(seed: int = 0, **kwargs):
    return build_decision_transformer(
        "random", state_dim=INFO.obs_dim, act_dim=INFO.act_dim, seed=seed, context_len=K, overrides=TINY, **kwargs
    )


@pytest.fixture(scope="module")
def data(data_cache):
    """A generated hopper-random dataset: (arrays, trajectories)."""
    arrays = load_dataset("hopper-random", steps=3000, seed=0)
    return arrays, split_trajectories(arrays)


def eval_kwargs(traj, **changes):
    kw = dict(
        seed=7,
        target_return=INFO.target_return,
        state_mean=traj.state_mean,
        state_std=traj.state_std,
        context_len=K,
        max_steps=40,
    )
    return {**kw, **changes}


def assert_same_episodes(batched, sequential_returns, sequential_lengths):
    np.testing.assert_array_equal(batched.lengths, sequential_lengths)
    # The same actions up to float rounding of differently shaped matmuls (returns then differ
    # by ~3e-7 here); conditioning on a 1 % different return-to-go moves them by ~2e-5.
    np.testing.assert_allclose(batched.returns, sequential_returns, rtol=0, atol=3e-6)


# ---- batched evaluation vs one episode at a time


def test_batched_evaluation_equals_one_episode_at_a_time(data):
    _, traj = data
    model = tiny_dt()
    n = 5
    batched = evaluate_episodes(model, "hopper", n_episodes=n, **eval_kwargs(traj))
    one = [evaluate_episodes(model, "hopper", n_episodes=1, **eval_kwargs(traj, seed=7 + i)) for i in range(n)]
    assert_same_episodes(batched, [r.returns[0] for r in one], [r.lengths[0] for r in one])
    # The episodes end at different steps (so the batch shrinks) and run past the context.
    assert len(set(batched.lengths.tolist())) > 1 and batched.lengths.min() > K
    assert len(set(np.round(batched.returns, 6).tolist())) == n  # distinct seeds, distinct episodes


def test_batched_evaluation_equals_the_reference_loop(data):
    """Against the released code's loop: padded windows, histories grown with torch.cat, a
    forward of one window per step, eager attention and unfused GELU."""
    _, traj = data
    model = tiny_dt(seed=1)
    use_fused_gelu(model)  # as a trial runs it; as_released undoes it for the reference
    n = 4
    batched = evaluate_episodes(model, "hopper", n_episodes=n, **eval_kwargs(traj))
    ref = reference_evaluate(as_released(model), "hopper", n_episodes=n, **eval_kwargs(traj))
    assert_same_episodes(batched, ref.returns, ref.lengths)


def record_windows(model) -> list[dict]:
    """Every forward's inputs (valid timesteps only, per row), in call order."""
    calls = []
    names = ("states", "actions", "returns_to_go", "timesteps", "attention_mask")

    def hook(_module, args, kwargs):
        inputs = {**dict(zip(names, args)), **kwargs}
        valid = inputs["attention_mask"].bool()
        calls.append([{key: inputs[key][row][valid[row]].clone() for key in names[:4]} for row in range(len(valid))])

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def test_batched_evaluation_feeds_the_reference_windows(data):
    """Step by step, each episode's window (its valid timesteps) is the reference loop's."""
    _, traj = data
    model = tiny_dt(seed=1)
    reference = as_released(model)
    batched_calls, reference_calls = record_windows(model), record_windows(reference)
    n = 4
    batched = evaluate_episodes(model, "hopper", n_episodes=n, **eval_kwargs(traj))
    reference_evaluate(reference, "hopper", n_episodes=n, **eval_kwargs(traj))
    lengths = batched.lengths
    assert len(reference_calls) == lengths.sum() and len(batched_calls) == lengths.max()
    ref_iter = iter(reference_calls)
    ref = {i: [next(ref_iter)[0] for _ in range(lengths[i])] for i in range(n)}  # episode after episode
    for t, rows in enumerate(batched_calls):
        running = [i for i in range(n) if lengths[i] > t]  # the batch holds these, in order
        assert len(rows) == len(running)
        for window, i in zip(rows, running):
            want = ref[i][t]
            assert len(window["states"]) == len(want["states"]) == min(t + 1, K)
            torch.testing.assert_close(window["timesteps"], want["timesteps"], rtol=0, atol=0)
            for key in ("states", "returns_to_go", "actions"):
                torch.testing.assert_close(window[key], want[key], rtol=1e-6, atol=1e-6)


def test_with_position_embeddings_the_padding_is_kept(data):
    """With position embeddings, padding shifts positions, so evaluation must pad like training."""
    _, traj = data
    model = tiny_dt(seed=2, position_embeddings=True)
    n = 3
    batched = evaluate_episodes(model, "hopper", n_episodes=n, **eval_kwargs(traj))
    ref = reference_evaluate(as_released(model), "hopper", n_episodes=n, **eval_kwargs(traj))
    assert_same_episodes(batched, ref.returns, ref.lengths)


@pytest.mark.parametrize("position_embeddings", [False, True])
def test_left_padding_changes_outputs_only_with_position_embeddings(data, position_embeddings):
    """The premise of leaving padding out of short evaluation windows."""
    _, traj = data
    model = tiny_dt(seed=3, position_embeddings=position_embeddings).eval()
    sampler = WindowSampler(traj, K, 8, seed=0)
    full = sampler.fixed_batch(8, seed=0)
    keep = 2  # the last 2 timesteps, alone vs behind K - 2 steps of masked padding
    short = {key: v[:, -keep:] for key, v in full.items()}
    padded = {key: v.clone() for key, v in full.items()}
    padded["attention_mask"][:, :-keep] = 0.0
    padded["states"][:, :-keep] = 0.0
    padded["actions"][:, :-keep] = -10.0
    padded["returns_to_go"][:, :-keep] = 0.0
    padded["timesteps"][:, :-keep] = 0
    with torch.no_grad():
        a = model(**short).action_preds[:, -1]
        b = model(**padded).action_preds[:, -1]
    if position_embeddings:
        assert (a - b).abs().max() > 1e-3
    else:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_reused_envs_give_the_same_episodes(data):
    _, traj = data
    model = tiny_dt()
    fresh = evaluate_episodes(model, "hopper", n_episodes=3, **eval_kwargs(traj))
    envs = make_envs("hopper", 4)  # one more than needed: the first three are used
    first = evaluate_episodes(model, "hopper", n_episodes=3, envs=envs, **eval_kwargs(traj))
    again = evaluate_episodes(model, "hopper", n_episodes=3, envs=envs, **eval_kwargs(traj))
    for r in (first, again):
        np.testing.assert_array_equal(r.lengths, fresh.lengths)
        # Same inputs in the same process: equal up to rounding (1e-9 relative); a reset that
        # leaked state from the previous episodes moves the returns by whole units.
        np.testing.assert_allclose(r.returns, fresh.returns, rtol=1e-9)
    with pytest.raises(ValueError, match="2 envs given for 3 episodes"):
        evaluate_episodes(model, "hopper", n_episodes=3, envs=envs[:2], **eval_kwargs(traj))


def test_evaluation_leaves_the_model_as_it_found_it(data):
    _, traj = data
    model = tiny_dt().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate_episodes(model, "hopper", n_episodes=2, **eval_kwargs(traj, max_steps=5))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---- the training loop's fast paths


def test_masked_sum_loss_equals_the_boolean_index_mean(data):
    _, traj = data
    model = tiny_dt().eval()
    # Windows near episode ends are padded, so the mask matters.
    batch = WindowSampler(traj, K, 64, seed=0).sample()
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        preds = model(**batch).action_preds
        want = ((preds - batch["actions"]) ** 2)[batch["attention_mask"].bool()].mean()
        got = TrialRunner._action_loss(model, batch)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_fused_gelu_computes_the_same_function(data):
    _, traj = data
    model = tiny_dt().eval()
    fused = tiny_dt().eval()
    use_fused_gelu(fused)
    assert all(isinstance(b.mlp.act, torch.nn.GELU) for b in fused.transformer.h)
    assert fused.state_dict().keys() == model.state_dict().keys()
    batch = WindowSampler(traj, K, 32, seed=1).sample()
    with torch.no_grad():
        torch.testing.assert_close(fused(**batch).action_preds, model(**batch).action_preds, rtol=0, atol=1e-5)


def test_reference_batches_hold_the_same_windows(data):
    """The benchmark's reference batcher builds dtsweep's windows, the slow way."""
    arrays, traj = data
    sampler = WindowSampler(traj, K, 64, seed=0)
    ref = ReferenceBatcher(arrays, K, 64, state_mean=traj.state_mean, state_std=traj.state_std, seed=0)
    starts = np.random.default_rng(0).integers(0, traj.num_steps, 64)
    episodes = traj.episode_ids[starts]
    ours = sampler.batch(starts)
    theirs = ref.get_batch(list(zip(episodes.tolist(), (starts - traj.episode_starts[episodes]).tolist())))
    torch.testing.assert_close(theirs["attention_mask"], ours["attention_mask"])
    valid = ours["attention_mask"].bool()
    assert not valid.all()
    for key in ("states", "actions", "returns_to_go", "timesteps"):
        torch.testing.assert_close(theirs[key][valid], ours[key][valid], rtol=1e-5, atol=1e-5)


# ---- the cost model that `plan` prints (its CPU figures come from the benchmarks)


def test_plan_costs_trials_on_the_device_they_ask_for():
    import dataclasses

    from dtsweep.costs import CPU, GPU, estimate
    from dtsweep.spec import load_spec

    trial = load_spec(Path(__file__).resolve().parents[1] / "sweeps" / "quickstart.yaml").trials()[0]
    on_cpu = estimate(trial)
    assert trial.resources.gpu == 0 and on_cpu.device == CPU.name
    on_gpu = estimate(dataclasses.replace(trial, resources=dataclasses.replace(trial.resources, gpu=0.5)))
    assert on_gpu.device == GPU.name and on_gpu.hours < on_cpu.hours
    assert on_gpu.gpu_hours == pytest.approx(0.5 * on_gpu.hours)
    # Twice the training steps: more than the evaluation-only time, less than twice the total.
    longer = dataclasses.replace(trial, train=dataclasses.replace(trial.train, steps_per_epoch=2 * trial.train.steps_per_epoch))
    assert on_cpu.hours < estimate(longer).hours < 2 * on_cpu.hours
    assert on_cpu.storage_bytes == estimate(longer).storage_bytes
