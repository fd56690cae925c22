"""Offline RL data: D4RL's HDF5 layout, dataset resolution/generation, trajectory windows.

arrays = load_dataset("hopper-medium")             # or a path, "hopper-medium-v2", "minari:..."
source = resolve_source("hopper-medium")          # the file, its sha256, origin, eval env
traj = split_trajectories(arrays)                  # flat steps + episodes + returns-to-go
sampler = WindowSampler(traj, context_len=20, batch_size=64, seed=0)
batch = sampler.sample()                           # dict of [B, K, ...] tensors
"""

from dtsweep.data.d4rl import (
    CARD_ATTR,
    D4RL_KEYS,
    DEFAULT_STEPS,
    ORIGINS,
    DatasetError,
    DatasetNotFoundError,
    DatasetSource,
    check_d4rl_file,
    d4rl_dir,
    d4rl_file_name,
    dataset_env,
    dataset_kind,
    dtsweep_dir,
    episode_bounds,
    file_sha256,
    generated_file_name,
    generators,
    load_dataset,
    make_dataset,
    minari_root,
    read_d4rl_hdf5,
    read_dataset_card,
    register_generator,
    resolve_dataset,
    resolve_source,
    write_d4rl_hdf5,
)
from dtsweep.data.generate import (
    dataset_card,
    make_random_dataset,
    rollout_dataset,
    uniform_policy,
)
from dtsweep.data.trajectories import (
    Trajectories,
    WindowSampler,
    returns_to_go,
    split_trajectories,
    window_batch,
)

__all__ = [
    "CARD_ATTR",
    "D4RL_KEYS",
    "DEFAULT_STEPS",
    "DatasetError",
    "DatasetNotFoundError",
    "DatasetSource",
    "ORIGINS",
    "Trajectories",
    "WindowSampler",
    "check_d4rl_file",
    "d4rl_dir",
    "d4rl_file_name",
    "dataset_card",
    "dataset_env",
    "dataset_kind",
    "dtsweep_dir",
    "episode_bounds",
    "file_sha256",
    "generated_file_name",
    "generators",
    "load_dataset",
    "make_dataset",
    "make_random_dataset",
    "minari_root",
    "read_d4rl_hdf5",
    "read_dataset_card",
    "register_generator",
    "resolve_dataset",
    "resolve_source",
    "returns_to_go",
    "rollout_dataset",
    "split_trajectories",
    "uniform_policy",
    "window_batch",
    "write_d4rl_hdf5",
]
