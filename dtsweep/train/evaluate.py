"""Evaluation: all episodes of an epoch at once, one batched forward per environment step.

The reference DT evaluates episodes one after another with a full forward per step; here
`n` Gymnasium MuJoCo envs step together (a synchronous vector env) and the model sees
one [n, K, ...] batch per step. Episode i is seeded `seed + i` either way, so the batched
and the one-at-a-time paths see the same initial states (tests check they agree).
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch

from dtsweep.data.trajectories import PAD_ACTION
from dtsweep.envs import ENVS


@dataclass
class EvalResult:
    returns: np.ndarray  # [n] undiscounted episode returns
    lengths: np.ndarray  # [n] episode lengths in env steps


@torch.no_grad()
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
) -> EvalResult:
    """Roll out `n_episodes` episodes of the DT in parallel, conditioned on `target_return`.

    Context handling matches training: the last `context_len` timesteps, padded on the
    left with the training padding values and masked out. Returns raw env returns.
    """
    info = ENVS[env]
    n, k, s_dim, a_dim = n_episodes, context_len, info.obs_dim, info.act_dim
    was_training = model.training
    model.eval()
    envs = gym.make_vec(info.gym_id, num_envs=n, vectorization_mode="sync")
    try:
        obs, _ = envs.reset(seed=seed)  # env i gets seed + i
        mean = np.asarray(state_mean, dtype=np.float32)
        std = np.asarray(state_std, dtype=np.float32)

        # Full histories [n, max_steps, ...]; windows are views of their last k steps.
        states = np.zeros((n, max_steps, s_dim), dtype=np.float32)
        actions = np.zeros((n, max_steps, a_dim), dtype=np.float32)
        rtg = np.zeros((n, max_steps), dtype=np.float32)
        returns = np.zeros(n, dtype=np.float64)
        lengths = np.zeros(n, dtype=np.int64)
        active = np.ones(n, dtype=bool)
        rtg_now = np.full(n, target_return / rtg_scale, dtype=np.float32)

        for t in range(max_steps):
            states[:, t] = (obs - mean) / std
            rtg[:, t] = rtg_now
            lo = max(0, t + 1 - k)
            idx = np.flatnonzero(active)
            batch = _window(states, actions, rtg, idx, lo, t + 1, k, max_ep_len, device)
            preds = model(**batch).action_preds[:, -1]
            act = preds.float().clamp(-1.0, 1.0).cpu().numpy()
            full = np.zeros((n, a_dim), dtype=np.float32)
            full[idx] = act
            actions[idx, t] = act
            obs, reward, terminated, truncated, _ = envs.step(full)
            returns[idx] += reward[idx]
            lengths[idx] += 1
            rtg_now = rtg_now - (reward / rtg_scale).astype(np.float32)
            active &= ~(terminated | truncated)
            if not active.any():
                break
    finally:
        envs.close()
        model.train(was_training)
    return EvalResult(returns=returns, lengths=lengths)


def _window(states, actions, rtg, idx, lo, hi, k, max_ep_len, device) -> dict[str, torch.Tensor]:
    """Model inputs for rows `idx`, timesteps [lo, hi), left-padded to k like training."""
    m, length = len(idx), hi - lo
    pad = k - length
    s = np.zeros((m, k, states.shape[-1]), dtype=np.float32)
    a = np.full((m, k, actions.shape[-1]), PAD_ACTION, dtype=np.float32)
    r = np.zeros((m, k, 1), dtype=np.float32)
    ts = np.zeros((m, k), dtype=np.int64)
    mask = np.zeros((m, k), dtype=np.float32)
    s[:, pad:] = states[idx, lo:hi]
    a[:, pad:] = actions[idx, lo:hi]
    r[:, pad:, 0] = rtg[idx, lo:hi]
    ts[:, pad:] = np.minimum(np.arange(lo, hi), max_ep_len - 1)
    mask[:, pad:] = 1.0
    to = lambda x: torch.from_numpy(x).to(device)  # noqa: E731
    return {
        "states": to(s),
        "actions": to(a),
        "returns_to_go": to(r),
        "timesteps": to(ts),
        "attention_mask": to(mask),
    }
