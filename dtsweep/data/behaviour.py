"""Behaviour policies of the offline `medium` datasets: the shipped SAC actors, in numpy.

D4RL made its `medium` datasets by training a SAC agent, stopping it at about one third of
expert return and rolling the stochastic policy out for 1M steps. dtsweep ships such actors,
trained on Gymnasium's MuJoCo v5 envs (`dtsweep.pretrain.behaviour` trains them), and rolls
them out here:

    policy = load_behaviour_policy("hopper")  # shipped actor, numpy inference
    actions = policy(obs, rng)                # [n, S] float32 -> [n, A] in [-1, 1]
    make_medium_dataset("hopper", steps, seed, out_path)

The actor is stored as float16 safetensors (40-150 kB each) and every score in a card is
measured with the float16-rounded weights, through the same numpy code that `medium`
datasets are generated with. Shipped actors (stochastic policy, normalised score over the
card's evaluation episodes): hopper 42.5 at 200k env steps, halfcheetah 39.9 at 262.5k,
walker2d 59.5 at 262.5k; `dtsweep pretrain behaviour ENV` retrains one.
"""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
from safetensors.numpy import load_file as load_numpy_file
from threadpoolctl import threadpool_limits

from dtsweep.envs import ENVS

# Normalised D4RL score of the stochastic behaviour policy that counts as "medium" (issue 3).
MEDIUM_BANDS: dict[str, tuple[float, float]] = {
    "hopper": (40.0, 50.0),
    "halfcheetah": (38.0, 45.0),
    "walker2d": (55.0, 75.0),
}


LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


ASSETS = Path(__file__).resolve().parent.parent / "assets" / "behaviour"


def behaviour_asset_dir(env: str) -> Path:
    """Folder of the shipped behaviour actor of `env`: actor.safetensors and card.json."""
    if env not in ENVS:
        raise ValueError(f"unknown env {env!r}; allowed: {sorted(ENVS)}")
    return ASSETS / env


class NumpyPolicy:
    """The stochastic tanh-Gaussian actor in numpy, from an exported state dict.

    Called as policy(obs [n, S] float32, rng) -> actions [n, A] float32 in [-1, 1]; the noise
    comes only from `rng`, so a seeded generator gives the same actions every time.
    """

    def __init__(self, weights: dict[str, np.ndarray]):
        n_trunk = sum(1 for k in weights if k.startswith("trunk.") and k.endswith(".weight"))
        # Stored as float16 to keep the package small; computing in float32 is exact for them.
        self.layers = [
            (weights[f"trunk.{2 * i}.weight"].astype(np.float32).T, weights[f"trunk.{2 * i}.bias"].astype(np.float32))
            for i in range(n_trunk)
        ]
        self.head = (weights["head.weight"].astype(np.float32).T, weights["head.bias"].astype(np.float32))
        self.obs_dim = self.layers[0][0].shape[0]
        self.act_dim = self.head[0].shape[1] // 2

    def __call__(self, obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h = np.asarray(obs, dtype=np.float32)
        for w, b in self.layers:
            h = np.maximum(h @ w + b, 0.0)
        out = h @ self.head[0] + self.head[1]
        mean, log_std = out[:, : self.act_dim], out[:, self.act_dim :]
        log_std = np.clip(log_std, LOG_STD_MIN, LOG_STD_MAX)
        noise = rng.standard_normal(mean.shape, dtype=np.float32)
        return np.tanh(mean + np.exp(log_std) * noise)


def load_behaviour_policy(env: str, asset_dir: str | Path | None = None) -> NumpyPolicy:
    """The shipped stochastic behaviour policy of `env` (or the one saved in `asset_dir`).

    Returns a callable policy(obs [n, S] np.float32, rng: np.random.Generator) -> actions
    [n, A] np.float32 in [-1, 1], deterministic given the state of `rng`.
    """
    folder = Path(asset_dir) if asset_dir is not None else behaviour_asset_dir(env)
    path = folder / "actor.safetensors"
    if not path.exists():
        raise FileNotFoundError(
            f"no behaviour actor at {path}; train one with `dtsweep pretrain behaviour {env} --out-dir {folder}`"
        )
    policy = NumpyPolicy(load_numpy_file(str(path)))
    info = ENVS[env]
    if (policy.obs_dim, policy.act_dim) != (info.obs_dim, info.act_dim):
        raise ValueError(
            f"actor at {path} maps {policy.obs_dim} -> {policy.act_dim}, but {env} has obs {info.obs_dim}, actions {info.act_dim}"
        )
    return policy


def load_behaviour_card(env: str, asset_dir: str | Path | None = None) -> dict:
    """The JSON card saved next to the behaviour actor of `env`."""
    folder = Path(asset_dir) if asset_dir is not None else behaviour_asset_dir(env)
    return json.loads((folder / "card.json").read_text())


def evaluate_policy(env: str, policy, episodes: int, seed: int) -> np.ndarray:
    """Undiscounted returns [episodes] of `policy` (stochastic, noise from a `seed` rng).

    The episodes run side by side (one batched policy call per step); episode i resets its
    env with seed `seed + i`, and each ends at termination or Gymnasium's 1000-step limit.
    """
    envs = [gym.make(ENVS[env].gym_id) for _ in range(episodes)]
    obs = np.stack([e.reset(seed=seed + i)[0] for i, e in enumerate(envs)]).astype(np.float32)
    rng = np.random.default_rng(seed)
    returns = np.zeros(episodes)
    alive = np.ones(episodes, dtype=bool)
    with single_threaded_blas():
        while alive.any():
            idx = np.flatnonzero(alive)
            actions = policy(obs[idx], rng)
            for j, i in enumerate(idx):
                o, r, terminated, truncated, _ = envs[i].step(actions[j])
                obs[i] = o
                returns[i] += r
                alive[i] = not (terminated or truncated)
    for e in envs:
        e.close()
    return returns


def single_threaded_blas():
    """Context that keeps numpy's BLAS on one thread.

    The policy's matmuls are tiny ([n, 128] x [128, 128] for a few dozen rows); a threaded
    OpenBLAS spends more time waking its threads than computing: 20x slower per call on a
    busy 2-core machine.
    """
    return threadpool_limits(limits=1, user_api="blas")


def make_medium_dataset(
    env: str,
    steps: int,
    seed: int,
    out_path,
    num_envs: int = 8,
    asset_dir: str | Path | None = None,
) -> dict:
    """D4RL's `medium` dataset for `env`: the shipped behaviour actor, rolled out stochastically.

    Writes `steps` rows in D4RL's HDF5 layout to `out_path` (vectorised over `num_envs` envs,
    deterministic by `seed`) and returns the dataset card: episodes, return statistics,
    normalised score, and the behaviour actor's own card. The card is also stored in the file.
    `asset_dir` rolls out another actor saved by `train_behaviour` instead; an actor whose
    card is not `in_band` is refused, since its data would not be `medium`.
    """
    from dtsweep.data.d4rl import CARD_ATTR, write_d4rl_hdf5
    from dtsweep.data.generate import dataset_card, rollout_dataset

    behaviour = load_behaviour_card(env, asset_dir)
    if not behaviour["in_band"]:
        raise ValueError(
            f"the {env} behaviour actor in {asset_dir or behaviour_asset_dir(env)} scores "
            f"{behaviour['eval']['normalized_score']:.1f}, outside the medium band "
            f"{behaviour['target_band']}; retrain it: dtsweep pretrain behaviour {env}"
        )
    policy = load_behaviour_policy(env, asset_dir)
    with single_threaded_blas():
        arrays = rollout_dataset(env, policy, steps, seed, num_envs=num_envs)
    card = dataset_card(
        env,
        "medium",
        arrays,
        seed=seed,
        generator=f"{__name__}.make_medium_dataset",
        policy="SAC behaviour actor (stochastic tanh-Gaussian)",
        num_envs=num_envs,
        behaviour=behaviour,
    )
    write_d4rl_hdf5(Path(out_path), arrays, {CARD_ATTR: card})
    return card
