"""The MuJoCo locomotion tasks of the study: Gymnasium ids, D4RL reference scores, targets.

One table, read by the data layer (which env generates a dataset), the trainer (target
return, normalised score) and the spec (what names are allowed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EnvInfo:
    name: str  # short name used in specs and outputs: "hopper"
    gym_id: str  # Gymnasium MuJoCo v5 env id used for generation and evaluation
    obs_dim: int
    act_dim: int
    ref_min_score: float  # D4RL's random-policy return (normalised score 0)
    ref_max_score: float  # D4RL's expert return (normalised score 100)
    target_return: float  # return-to-go the DT is conditioned on at evaluation (both papers)


ENVS: dict[str, EnvInfo] = {
    "hopper": EnvInfo("hopper", "Hopper-v5", 11, 3, -20.272305, 3234.3, 3600.0),
    "halfcheetah": EnvInfo("halfcheetah", "HalfCheetah-v5", 17, 6, -280.178953, 12135.0, 6000.0),
    "walker2d": EnvInfo("walker2d", "Walker2d-v5", 17, 6, 1.629008, 4592.3, 5000.0),
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
        raise ValueError(
            f"unknown dataset quality {quality!r} in {name!r}; allowed: {list(DATASET_QUALITIES)}"
        )
    return env, quality, version
