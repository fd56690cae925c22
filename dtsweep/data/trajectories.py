"""Trajectory windows for Decision Transformer training, prepared once per trial.

`split_trajectories` turns a D4RL-layout dict into flat per-step arrays plus episode
boundaries and returns-to-go. `WindowSampler` draws batches of K-step windows with the
semantics of the reference DT (Chen et al., `experiment.py`, `get_batch`): a start is uniform
over all timesteps of the dataset (= a trajectory drawn with probability proportional to its
length, then a uniform start within it), the window runs up to K steps from there without
crossing the episode's end, and short windows are padded on the left.

Everything is numpy index arithmetic over the flat arrays: no Python loop per sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from dtsweep.data.d4rl import episode_bounds

# Padding of the reference DT's training batches. The reference pads states with 0 before
# normalising them (so its padded states are -mean/std); we pad the normalised states with
# 0. Padded positions are masked out of attention and loss, so the value never matters.
PAD_STATE = 0.0
PAD_ACTION = -10.0
PAD_RTG = 0.0
PAD_TIMESTEP = 0


@dataclass
class Trajectories:
    """A dataset's steps, episode by episode, concatenated. N steps, E episodes.

    observations [N, S] float32, actions [N, A] float32, rewards [N] float32,
    rtg [N] float32 (undiscounted return-to-go within the episode, including r_t),
    timesteps [N] int64 (index within the episode, clipped to max_ep_len - 1),
    episode_ids [N] int64 (which episode each step belongs to),
    episode_starts / episode_lengths [E] int64, episode_returns [E] float32,
    state_mean / state_std [S] float32 (over all N states; std + 1e-6 as the reference DT).
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    rtg: np.ndarray
    timesteps: np.ndarray
    episode_ids: np.ndarray
    episode_starts: np.ndarray
    episode_lengths: np.ndarray
    episode_returns: np.ndarray
    state_mean: np.ndarray
    state_std: np.ndarray

    @property
    def num_steps(self) -> int:
        return len(self.observations)

    @property
    def num_episodes(self) -> int:
        return len(self.episode_starts)

    @property
    def state_dim(self) -> int:
        return self.observations.shape[1]

    @property
    def act_dim(self) -> int:
        return self.actions.shape[1]

    @cached_property
    def normalized_observations(self) -> np.ndarray:
        """(observations - state_mean) / state_std, [N, S] float32, computed once."""
        return ((self.observations - self.state_mean) / self.state_std).astype(np.float32)

    @cached_property
    def episode_ends(self) -> np.ndarray:
        """[N] int64: one past the last row of each step's episode."""
        return (self.episode_starts + self.episode_lengths)[self.episode_ids]


def returns_to_go(rewards: np.ndarray, episode_starts: np.ndarray, episode_lengths: np.ndarray) -> np.ndarray:
    """Undiscounted return-to-go [N] float32: rtg[t] = sum of rewards[t:end of t's episode].

    One cumulative sum over the whole array in float64: rtg[t] = C[end - 1] - C[t - 1] where C
    is the inclusive cumulative sum (float64 keeps the subtraction exact enough for 1M steps).
    """
    r = np.asarray(rewards, dtype=np.float64)
    c = np.concatenate([[0.0], np.cumsum(r)])  # c[i] = sum(r[:i])
    ends = np.repeat(episode_starts + episode_lengths, episode_lengths)
    return (c[ends] - c[: len(r)]).astype(np.float32)


def split_trajectories(arrays: dict[str, np.ndarray], max_ep_len: int = 1000) -> Trajectories:
    """Prepare a D4RL-layout dict (see dtsweep.data.d4rl) for window sampling."""
    obs = np.asarray(arrays["observations"], dtype=np.float32)
    actions = np.asarray(arrays["actions"], dtype=np.float32)
    rewards = np.asarray(arrays["rewards"], dtype=np.float32).reshape(-1)
    if len(obs) == 0:
        raise ValueError("dataset has no steps")
    starts, lengths = episode_bounds(arrays["terminals"], arrays["timeouts"])
    episode_ids = np.repeat(np.arange(len(starts), dtype=np.int64), lengths)
    timesteps = np.arange(len(obs), dtype=np.int64) - starts[episode_ids]
    rtg = returns_to_go(rewards, starts, lengths)
    return Trajectories(
        observations=obs,
        actions=actions,
        rewards=rewards,
        rtg=rtg,
        timesteps=np.minimum(timesteps, max_ep_len - 1),
        episode_ids=episode_ids,
        episode_starts=starts,
        episode_lengths=lengths,
        episode_returns=rtg[starts].copy(),
        state_mean=obs.mean(axis=0, dtype=np.float64).astype(np.float32),
        state_std=(obs.std(axis=0, dtype=np.float64) + 1e-6).astype(np.float32),
    )


def window_batch(
    traj: Trajectories,
    starts: np.ndarray,
    context_len: int,
    *,
    rtg_scale: float = 1000.0,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """The K-step windows that begin at the flat row indices `starts` [B].

    Returns tensors on `device`, with K = context_len:
      states          [B, K, S] float32  normalised with the dataset mean/std
      actions         [B, K, A] float32
      returns_to_go   [B, K, 1] float32  divided by rtg_scale
      timesteps       [B, K]    int64
      attention_mask  [B, K]    float32  1.0 for real steps, 0.0 for padding
    A window stops at its episode's end and is padded on the LEFT to K with state 0,
    action -10, return-to-go 0, timestep 0, mask 0 (the reference DT's training padding).
    """
    starts = np.asarray(starts, dtype=np.int64)
    k = int(context_len)
    length = np.minimum(traj.episode_ends[starts] - starts, k)  # [B] real steps per window
    pad = k - length
    col = np.arange(k)
    valid = col[None, :] >= pad[:, None]  # [B, K]
    # Row of column j: starts + (j - pad); padding columns read row `starts` and get
    # overwritten below, which keeps every index in range.
    rows = np.where(valid, starts[:, None] + col[None, :] - pad[:, None], starts[:, None])

    states = np.where(valid[..., None], traj.normalized_observations[rows], PAD_STATE)
    actions = np.where(valid[..., None], traj.actions[rows], PAD_ACTION)
    rtg = np.where(valid, traj.rtg[rows] / rtg_scale, PAD_RTG)[..., None]
    timesteps = np.where(valid, traj.timesteps[rows], PAD_TIMESTEP)

    def tensor(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).to(device=device, dtype=dtype)

    return {
        "states": tensor(states, torch.float32),
        "actions": tensor(actions, torch.float32),
        "returns_to_go": tensor(rtg, torch.float32),
        "timesteps": tensor(timesteps, torch.int64),
        "attention_mask": tensor(valid, torch.float32),
    }


class WindowSampler:
    """Random batches of K-step windows (see `window_batch`), seeded and reproducible.

    The same `seed` gives the same sequence of batches. `fixed_batch(n, seed)` draws a batch
    from its own generator, leaving the training sequence untouched.
    """

    def __init__(
        self,
        traj: Trajectories,
        context_len: int,
        batch_size: int,
        *,
        seed: int,
        rtg_scale: float = 1000.0,
        device: str | torch.device = "cpu",
    ):
        self.traj = traj
        self.context_len = int(context_len)
        self.batch_size = int(batch_size)
        self.rtg_scale = float(rtg_scale)
        self.device = device
        self.rng = np.random.default_rng(seed)
        _ = traj.normalized_observations  # normalise once, up front, not in the first step

    def sample_indices(self, n: int | None = None, rng: np.random.Generator | None = None):
        """[n] int64 window starts, uniform over all steps (default n = batch_size)."""
        rng = self.rng if rng is None else rng
        return rng.integers(0, self.traj.num_steps, size=self.batch_size if n is None else n)

    def batch(self, starts: np.ndarray) -> dict[str, torch.Tensor]:
        """The batch for given window starts [B]; see `window_batch` for the tensors."""
        return window_batch(self.traj, starts, self.context_len, rtg_scale=self.rtg_scale, device=self.device)

    def sample(self) -> dict[str, torch.Tensor]:
        """The next random batch of `batch_size` windows."""
        return self.batch(self.sample_indices())

    def fixed_batch(self, n: int, seed: int) -> dict[str, torch.Tensor]:
        """A batch of n windows that depends only on `seed` (for action error, diagnostics)."""
        return self.batch(self.sample_indices(n, np.random.default_rng(seed)))
