"""Offline datasets in D4RL's layout, collected with Gymnasium's MuJoCo v5 envs.

`rollout_dataset` runs any policy in a batch of environments stepped together and returns
exactly `steps` rows, deterministic by seed. `make_random_dataset` is D4RL's `random`
recipe (a uniform policy over the action box) and is the registered `random` generator of
`dtsweep.data.d4rl.resolve_dataset`; other qualities reuse `rollout_dataset` and
`dataset_card` with their own policy.

Row order: complete episodes in the order they finish (ties by env index), then the first
steps of one more episode, cut at `steps` rows with neither flag set -- D4RL's files end the
same way. Episodes never interleave, so the terminals | timeouts flags split them exactly.
The episodes still running in the other envs at the cut are dropped: at most num_envs - 1
episodes, a negligible length bias at D4RL's sizes (1M steps, episodes of at most 1000).
"""

from __future__ import annotations

import importlib.metadata
import pathlib
from collections.abc import Callable

import gymnasium as gym
import numpy as np

import dtsweep
from dtsweep.data.d4rl import CARD_ATTR, D4RL_KEYS, episode_bounds, write_d4rl_hdf5
from dtsweep.envs import ENVS, normalized_score

Policy = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def uniform_policy(act_dim: int) -> Policy:
    """Actions uniform in [-1, 1]^act_dim, independent of the observation (D4RL's random)."""

    def policy(obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return rng.uniform(-1.0, 1.0, size=(len(obs), act_dim))

    return policy


def rollout_dataset(
    env_name: str,
    policy: Policy,
    steps: int,
    seed: int,
    num_envs: int = 8,
    max_episode_steps: int = 1000,
) -> dict[str, np.ndarray]:
    """Collect `steps` rows of `policy` acting in `env_name`, in D4RL's layout.

    env_name: a dtsweep env ("hopper") or a Gymnasium id ("Hopper-v5").
    policy(obs [n, S] float64, rng) -> actions [n, A], clipped to [-1, 1] (the action box
    of the study's envs). Episodes are cut at `max_episode_steps`: `timeouts` marks the cut,
    `terminals` a real termination (if both happen at once, only `terminals`), and
    `next_observations` is always the true next observation, the final one included.
    Env seeds and the policy's generator both derive from `seed`, so a seed (with the same
    num_envs) gives the same rows.
    """
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    gym_id = ENVS[env_name].gym_id if env_name in ENVS else env_name
    env_seq, policy_seq = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.default_rng(policy_seq)

    # Autoreset is off: Gymnasium's autoreset would hide the final observation (next-step
    # mode) or move it into `info` (same-step mode); resetting by hand keeps it plain.
    envs = gym.make_vec(
        gym_id,
        num_envs=num_envs,
        vectorization_mode="sync",
        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.DISABLED},
        max_episode_steps=max_episode_steps,
    )
    # One entry per vector step, [num_envs, ...] each; episodes are cut out at the end.
    record: dict[str, list[np.ndarray]] = {k: [] for k in D4RL_KEYS}
    episode_start = np.zeros(num_envs, dtype=np.int64)  # vector step where each episode began
    finished: list[tuple[int, int, int]] = []  # (env, first step, one past last), in order
    finished_rows = 0
    try:
        low, high = envs.single_action_space.low, envs.single_action_space.high
        if not (np.all(low == -1.0) and np.all(high == 1.0)):
            raise ValueError(f"{gym_id}: expected actions in [-1, 1], got [{low}, {high}]")
        obs, _ = envs.reset(seed=[int(s) for s in env_seq.generate_state(num_envs)])
        t = 0
        while finished_rows < steps:
            action = np.clip(np.asarray(policy(obs, rng), dtype=np.float64), -1.0, 1.0)
            next_obs, reward, terminated, truncated, _ = envs.step(action)
            truncated = (truncated | (t + 1 - episode_start >= max_episode_steps)) & ~terminated
            record["observations"].append(obs.astype(np.float32))
            record["actions"].append(action.astype(np.float32))
            record["rewards"].append(reward.astype(np.float32))
            record["next_observations"].append(next_obs.astype(np.float32))
            record["terminals"].append(terminated)
            record["timeouts"].append(truncated)
            t += 1
            done = terminated | truncated
            if done.any():
                for j in np.flatnonzero(done):
                    finished.append((j, episode_start[j], t))
                    finished_rows += t - episode_start[j]
                episode_start[done] = t
                next_obs, _ = envs.reset(options={"reset_mask": done})
            obs = next_obs
    finally:
        envs.close()

    # Episodes one after another, in the order they finished, cut to exactly `steps` rows.
    time_idx = np.concatenate([np.arange(t0, t1) for _, t0, t1 in finished])[:steps]
    env_idx = np.concatenate([np.full(t1 - t0, j) for j, t0, t1 in finished])[:steps]
    return {k: np.stack(v)[time_idx, env_idx] for k, v in record.items()}


def dataset_card(env: str, quality: str, arrays: dict[str, np.ndarray], *, seed: int, generator: str, **extra) -> dict:
    """The JSON-able description of a generated dataset (stored in its file, see CARD_ATTR).

    Return statistics cover the complete episodes only (not a trailing unfinished one).
    """
    starts, lengths = episode_bounds(arrays["terminals"], arrays["timeouts"])
    complete = (arrays["terminals"] | arrays["timeouts"])[starts + lengths - 1]
    cumsum = np.concatenate([[0.0], np.cumsum(arrays["rewards"], dtype=np.float64)])
    returns = (cumsum[starts + lengths] - cumsum[starts])[complete]
    mean_return = float(returns.mean()) if len(returns) else None
    return {
        "dataset": f"{env}-{quality}",
        "env": env,
        "gym_id": ENVS[env].gym_id,
        "quality": quality,
        "steps": int(len(arrays["rewards"])),
        "seed": int(seed),
        "episodes": int(complete.sum()),
        "terminals": int(arrays["terminals"].sum()),
        "timeouts": int(arrays["timeouts"].sum()),
        "return_mean": mean_return,
        "return_std": float(returns.std()) if len(returns) else None,
        "return_min": float(returns.min()) if len(returns) else None,
        "return_max": float(returns.max()) if len(returns) else None,
        "normalized_score": None if mean_return is None else normalized_score(env, mean_return),
        "generator": generator,
        "dtsweep_version": dtsweep.__version__,
        "gymnasium_version": gym.__version__,
        "mujoco_version": importlib.metadata.version("mujoco"),
        **extra,
    }


def make_random_dataset(env: str, steps: int, seed: int, out_path, num_envs: int = 8) -> dict:
    """D4RL's `random` dataset for `env`: a uniform policy, `steps` rows, written to out_path.

    Returns the dataset card, which is also stored in the file (attribute CARD_ATTR, JSON).
    """
    policy = uniform_policy(ENVS[env].act_dim)
    arrays = rollout_dataset(env, policy, steps, seed, num_envs=num_envs)
    card = dataset_card(
        env,
        "random",
        arrays,
        seed=seed,
        generator=f"{__name__}.make_random_dataset",
        policy="uniform in [-1, 1]",
        num_envs=num_envs,
    )
    write_d4rl_hdf5(pathlib.Path(out_path), arrays, {CARD_ATTR: card})
    return card
