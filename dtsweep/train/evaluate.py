"""Evaluation: all episodes of an epoch at once, one batched forward per environment step.

The reference DT evaluates episodes one after another with a full forward per step; here
`n` Gymnasium MuJoCo envs run side by side and the model sees one [m, K, ...] batch per step,
m = the episodes still running. Only those envs are stepped: an episode that has ended costs
nothing more (a Gymnasium vector env would keep stepping and auto-resetting it). Episode i is
seeded `seed + i` either way, so the batched and the one-at-a-time paths see the same initial
states and feed the model the same windows (tests/test_evaluate.py; benchmarks/ times both).
Their actions agree up to float rounding (batch shapes round differently), which the chaotic
dynamics of a long HalfCheetah episode can amplify into visibly different returns.

A DT without position embeddings (the reference's choice, dtsweep's default) computes the same
outputs for the valid tokens whether or not masked padding precedes them, so while the episodes
are shorter than the context the padding is left out rather than computed and masked. With
position embeddings the padding shifts every token's position, so it is kept, as in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch

from dtsweep.data.trajectories import PAD_ACTION, PAD_RTG, PAD_STATE, PAD_TIMESTEP
from dtsweep.envs import ENVS
from dtsweep.models import DecisionTransformer


@dataclass
class EvalResult:
    returns: np.ndarray  # [n] undiscounted episode returns
    lengths: np.ndarray  # [n] episode lengths in env steps


def make_envs(env: str, n: int, gym_id: str | None = None) -> list[gym.Env]:
    """n Gymnasium envs of the dtsweep env `env`, for `evaluate_episodes(envs=...)` to reuse.

    `gym_id`: the Gymnasium id to make, the env the trial's data came from
    (`DatasetSource.eval_env`: `Walker2d-v4` for D4RL's data, the generating `-v5` env for
    dtsweep's); None: `ENVS[env].gym_id` (v5). It must be a task of `env` (same observation
    and action sizes); an id Gymnasium cannot make raises, never falls back to another.
    Making a MuJoCo env compiles its model; a trial evaluates every epoch, so it keeps its envs.
    """
    info = ENVS[env]
    gym_id = gym_id or info.gym_id
    envs = [gym.make(gym_id) for _ in range(n)]
    obs, act = envs[0].observation_space.shape, envs[0].action_space.shape
    if (obs, act) != ((info.obs_dim,), (info.act_dim,)):
        for e in envs:
            e.close()
        raise ValueError(f"{gym_id} has observations {obs} and actions {act}, not {env}'s ({info.obs_dim},)/({info.act_dim},)")
    return envs


@torch.inference_mode()
def evaluate_episodes(
    model: torch.nn.Module,
    env: str,
    *,
    n_episodes: int,
    seed: int,
    target_return: float,
    state_mean: np.ndarray,
    state_std: np.ndarray,
    context_len: int,
    rtg_scale: float = 1000.0,
    max_steps: int = 1000,
    max_ep_len: int = 1000,
    device: str | torch.device = "cpu",
    envs: list[gym.Env] | None = None,
    gym_id: str | None = None,
) -> EvalResult:
    """Roll out `n_episodes` episodes of the DT in parallel, conditioned on `target_return`.

    Context handling matches training: the last `context_len` timesteps, padded on the left
    with the training padding values and masked out. The action slot of the current step holds
    0 (the causal mask hides it from the state token that predicts it). Observations are
    normalised in float32 with `state_mean` / `state_std` [S]. `envs`: envs of `env` to reuse
    (see `make_envs`; the first n_episodes are reset and used, the caller keeps them); by
    default n_episodes envs of `gym_id` (see `make_envs`) are made and closed here. Returns raw env returns and episode
    lengths, each [n_episodes].
    """
    info = ENVS[env]
    n, k, s_dim, a_dim = n_episodes, context_len, info.obs_dim, info.act_dim
    was_training = model.training
    model.eval()
    owned = envs is None
    if owned:
        envs = make_envs(env, n, gym_id)
    elif len(envs) < n:
        raise ValueError(f"{len(envs)} envs given for {n} episodes")
    envs = envs[:n]
    trim = isinstance(model, DecisionTransformer) and not model.position_embeddings
    try:
        obs = np.stack([e.reset(seed=seed + i)[0] for i, e in enumerate(envs)]).astype(np.float32)
        mean = np.asarray(state_mean, dtype=np.float32)
        std = np.asarray(state_std, dtype=np.float32)

        # Histories [n, k - 1 + max_steps, ...] that start with k - 1 steps of training padding:
        # step t lives in column t + k - 1, and its window is columns [t, t + k).
        pad, cols = k - 1, k - 1 + max_steps
        states = np.full((n, cols, s_dim), PAD_STATE, dtype=np.float32)
        actions = np.zeros((n, cols, a_dim), dtype=np.float32)
        actions[:, :pad] = PAD_ACTION
        rtg = np.full((n, cols, 1), PAD_RTG, dtype=np.float32)
        steps = np.minimum(np.arange(max_steps), max_ep_len - 1)
        timesteps = torch.from_numpy(np.concatenate([np.full(pad, PAD_TIMESTEP), steps])).to(device)
        mask = torch.cat([torch.zeros(pad), torch.ones(max_steps)]).to(device)

        returns = np.zeros(n, dtype=np.float64)
        lengths = np.zeros(n, dtype=np.int64)
        rtg_now = np.full(n, target_return / rtg_scale, dtype=np.float32)
        active = np.arange(n)  # episodes still running

        for t in range(max_steps):
            col = t + pad
            states[active, col] = (obs[active] - mean) / std
            rtg[active, col, 0] = rtg_now[active]
            lo = max(t, pad) if trim else t  # first column of the window
            m, w = len(active), t + k - lo
            preds = model(
                states=torch.from_numpy(states[active, lo : t + k]).to(device),
                actions=torch.from_numpy(actions[active, lo : t + k]).to(device),
                returns_to_go=torch.from_numpy(rtg[active, lo : t + k]).to(device),
                timesteps=timesteps[lo : t + k].expand(m, w),
                attention_mask=mask[lo : t + k].expand(m, w),
            ).action_preds[:, -1]
            act = preds.float().clamp(-1.0, 1.0).cpu().numpy()
            actions[active, col] = act
            done = np.zeros(m, dtype=bool)
            for j, i in enumerate(active):
                o, reward, terminated, truncated, _ = envs[i].step(act[j])
                obs[i] = o
                returns[i] += reward
                lengths[i] += 1
                rtg_now[i] -= np.float32(reward / rtg_scale)  # float32, as the reference's torch tensor
                done[j] = terminated or truncated
            active = active[~done]
            if len(active) == 0:
                break
    finally:
        if owned:
            for e in envs:
                e.close()
        model.train(was_training)
    return EvalResult(returns=returns, lengths=lengths)
