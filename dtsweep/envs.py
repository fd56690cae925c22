"""The MuJoCo locomotion tasks of the study: Gymnasium ids, D4RL reference scores, targets.

One table, read by the data layer (which env generates a dataset), the trainer (target
return, normalised score) and the spec (what names are allowed).

Each task has two Gymnasium ids. `gym_id` (`Hopper-v5`, ...) is the env dtsweep generates
its own datasets on. `d4rl_gym_id` (`Hopper-v4`, ...) keeps the MuJoCo models that D4RL's
data was recorded on (D4RL used gym's mujoco-py v3 envs; Gymnasium's v4 envs load the same
XML files through the `mujoco` bindings, while v5 changes them, e.g. Walker2d-v5's foot
friction). Evaluation uses the env the data came from (`dtsweep.data.DatasetSource.eval_env`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EnvInfo:
    name: str  # short name used in specs and outputs: "hopper"
    gym_id: str  # Gymnasium MuJoCo v5 env id: dtsweep generates on it and evaluates its data on it
    obs_dim: int
    act_dim: int
    ref_min_score: float  # D4RL's random-policy return (normalised score 0)
    ref_max_score: float  # D4RL's expert return (normalised score 100)
    target_return: float  # return-to-go the DT is conditioned on at evaluation (both papers)
    d4rl_gym_id: str = ""  # Gymnasium env with the MuJoCo model D4RL recorded on (v4)


ENVS: dict[str, EnvInfo] = {
    "hopper": EnvInfo("hopper", "Hopper-v5", 11, 3, -20.272305, 3234.3, 3600.0, "Hopper-v4"),
    "halfcheetah": EnvInfo("halfcheetah", "HalfCheetah-v5", 17, 6, -280.178953, 12135.0, 6000.0, "HalfCheetah-v4"),
    "walker2d": EnvInfo("walker2d", "Walker2d-v5", 17, 6, 1.629008, 4592.3, 5000.0, "Walker2d-v4"),
}

DATASET_QUALITIES = ("random", "medium", "medium-replay", "medium-expert", "expert")


def normalized_score(env: str, returns):
    """D4RL normalised score: 100 * (return - random) / (expert - random).

    `returns` is a float or array of undiscounted episode returns; the result has its shape.
    """
    info = ENVS[env]
    r = np.asarray(returns, dtype=np.float64)
    score = 100.0 * (r - info.ref_min_score) / (info.ref_max_score - info.ref_min_score)
    return float(score) if score.ndim == 0 else score


def parse_dataset(name: str) -> tuple[str, str, str | None]:
    """Split a D4RL-style dataset name into (env, quality, version).

    "hopper-medium" -> ("hopper", "medium", None); "walker2d-medium-replay-v2" ->
    ("walker2d", "medium-replay", "v2"). Raises ValueError for unknown envs or qualities.
    """
    parts = name.split("-")
    version = None
    if len(parts) > 1 and parts[-1].startswith("v") and parts[-1][1:].isdigit():
        version = parts.pop()
    env, quality = parts[0], "-".join(parts[1:])
    if env not in ENVS:
        raise ValueError(f"unknown env {env!r} in dataset {name!r}; allowed: {sorted(ENVS)}")
    if quality not in DATASET_QUALITIES:
        raise ValueError(f"unknown dataset quality {quality!r} in {name!r}; allowed: {list(DATASET_QUALITIES)}")
    return env, quality, version


def env_of_gym_id(gym_id: str) -> str | None:
    """The dtsweep env whose task a Gymnasium id names ("Walker2d-v4" -> "walker2d"), or None."""
    base = gym_id.split("/")[-1].rsplit("-v", 1)[0].lower()
    return base if base in ENVS else None


def envs_with_shape(obs_dim: int, act_dim: int) -> list[str]:
    """The dtsweep envs whose observations are [obs_dim] and actions [act_dim] (sorted).

    hopper is 11/3; halfcheetah and walker2d are both 17/6, so a 17/6 dataset is ambiguous.
    """
    return sorted(e.name for e in ENVS.values() if (e.obs_dim, e.act_dim) == (obs_dim, act_dim))
