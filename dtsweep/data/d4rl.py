"""D4RL's HDF5 layout: read, write, and find a dataset by name.

A dataset is a dict of flat arrays, one row per environment step, in D4RL's layout:

    observations      [N, S] float32   s_t
    next_observations [N, S] float32   s_{t+1} (the true last observation at an episode's end)
    actions           [N, A] float32   a_t
    rewards           [N]    float32   r_t
    terminals         [N]    bool      the episode really ended at this step (s_{t+1} is terminal)
    timeouts          [N]    bool      the episode was cut at this step (time limit), not ended

Episodes are stored one after another; an episode ends at a row where terminals | timeouts.
A trailing episode with neither flag set is unfinished (D4RL's files have one).

One meaning per dataset name, on every machine (`resolve_dataset(name)` -> file path):

  - An unversioned name (`hopper-medium`) ALWAYS means dtsweep's generated data: the file
    `hopper-medium_steps=N_seed=S.hdf5` in dtsweep's cache, `$DTSWEEP_DATA_DIR` or
    `~/.cache/dtsweep/datasets/`, generated offline when missing by the generator registered
    for the quality (`register_generator`; built in: `random` from dtsweep.data.generate,
    `medium` from dtsweep.data.behaviour). A D4RL file never stands in for it. A file lock
    makes concurrent callers generate once; the file appears atomically.
  - A versioned name (`hopper-medium-v2`) means D4RL's release: D4RL's cache,
    `$D4RL_DATASET_DIR` or `~/.d4rl/datasets/`, under D4RL's file name
    (`hopper_medium-v2.hdf5`); when missing, fetched by the `d4rl` package if importable
    (`gym.make(name).get_dataset()`), else from D4RL's URL. `DTSWEEP_OFFLINE=1` (or
    `download=False`) skips the fetch: no network at all.
  - A file path (contains a `/`, or ends in `.hdf5`/`.h5`) means that file's bytes. Its env
    is the study's `env:`, or the one its dtsweep card names, or the only env whose
    observation/action sizes match (hopper 11/3; halfcheetah and walker2d are both 17/6).
  - `minari:<dataset id>` means that dataset of Minari's local store
    (`$MINARI_DATASETS_PATH` or `~/.minari/datasets`), converted to this layout and cached
    in dtsweep's cache, keyed by the sha256 of Minari's files.

`resolve_source(name)` resolves the same way and says what was found (`DatasetSource`: the
file, its sha256, its origin `d4rl`/`generated`/`minari`, its env, and the Gymnasium env to
evaluate on: D4RL data on the `-v4` envs it was recorded on, generated data on the env its
card names, Minari data on the env its metadata names). `check_d4rl_file(path)` checks a
file's keys, lengths and values without keeping it in memory twice.

Anything else raises `DatasetNotFoundError`, whose message says how to get the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import pathlib
import shutil
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from dtsweep.envs import ENVS, env_of_gym_id, envs_with_shape, parse_dataset

D4RL_KEYS = ("observations", "next_observations", "actions", "rewards", "terminals", "timeouts")
REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")
D4RL_DTYPES = {
    "observations": np.float32,
    "next_observations": np.float32,
    "actions": np.float32,
    "rewards": np.float32,
    "terminals": np.bool_,
    "timeouts": np.bool_,
}
CARD_ATTR = "dtsweep_card"  # file attribute holding the JSON dataset card of generated files

# D4RL's datasets have 1M steps; a generated dataset has the same size unless asked otherwise.
DEFAULT_STEPS = 1_000_000
D4RL_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/{file}"
DOWNLOAD_TIMEOUT_S = 15.0


class DatasetNotFoundError(FileNotFoundError):
    """No file for a dataset name, and no way to make or fetch one here."""


# ---------------------------------------------------------------------------------------------
# Reading and writing the HDF5 layout


def write_d4rl_hdf5(path, arrays: dict[str, np.ndarray], attrs: dict | None = None) -> None:
    """Write `arrays` (the keys of D4RL_KEYS present in it) to `path` in D4RL's layout.

    Arrays are cast to D4RL's dtypes. `attrs` become file attributes; dict or list values are
    stored as JSON strings. The file is written to a temporary name in the same folder and
    renamed into place, so readers never see a half-written file.
    """
    path = pathlib.Path(path)
    missing = [k for k in REQUIRED_KEYS if k not in arrays]
    if missing:
        raise KeyError(f"cannot write {path}: missing D4RL keys {missing}")
    n = len(arrays["observations"])
    for key in D4RL_KEYS:
        if key in arrays and len(arrays[key]) != n:
            raise ValueError(f"cannot write {path}: {key} has {len(arrays[key])} rows, expected {n}")

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            for key in D4RL_KEYS:
                if key in arrays:
                    data = np.asarray(arrays[key], dtype=D4RL_DTYPES[key])
                    # No timestamps: the same content gives the same bytes.
                    f.create_dataset(key, data=data, track_times=False)
            for name, value in (attrs or {}).items():
                f.attrs[name] = json.dumps(value) if isinstance(value, (dict, list)) else value
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def read_d4rl_hdf5(path) -> dict[str, np.ndarray]:
    """Read a D4RL-layout HDF5 file into a dict of arrays with D4RL's dtypes.

    Required keys: observations [N, S], actions [N, A], rewards [N], terminals [N],
    timeouts [N]; next_observations [N, S] is returned when the file has it. Other datasets in
    the file (D4RL's `infos/`, `metadata/`) are ignored.
    """
    path = pathlib.Path(path)
    with h5py.File(path, "r") as f:
        missing = [k for k in REQUIRED_KEYS if k not in f]
        if missing:
            raise KeyError(f"{path} is not a D4RL dataset: missing {missing} (has {sorted(f.keys())})")
        out = {k: np.asarray(f[k][()], dtype=D4RL_DTYPES[k]) for k in D4RL_KEYS if k in f}
    n = len(out["observations"])
    for key in ("rewards", "terminals", "timeouts"):
        out[key] = out[key].reshape(-1)  # some writers store [N, 1]
    for key, value in out.items():
        if len(value) != n:
            raise ValueError(f"{path}: {key} has {len(value)} rows, observations has {n}")
    return out


def episode_bounds(terminals: np.ndarray, timeouts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Episode (starts [E], lengths [E]) int64 from the per-step end flags [N].

    An episode ends at a step where terminals | timeouts; steps after the last flag form a
    trailing unfinished episode, which is kept.
    """
    done = np.asarray(terminals, dtype=bool) | np.asarray(timeouts, dtype=bool)
    n = len(done)
    ends = np.flatnonzero(done) + 1  # one past each episode's last row
    if n and (len(ends) == 0 or ends[-1] != n):
        ends = np.append(ends, n)
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    return starts, (ends - starts).astype(np.int64)


def read_dataset_card(path) -> dict | None:
    """The JSON dataset card that dtsweep stored in a generated file, or None (e.g. D4RL's)."""
    with h5py.File(path, "r") as f:
        raw = f.attrs.get(CARD_ATTR)
    return None if raw is None else json.loads(raw)


# ---------------------------------------------------------------------------------------------
# Generators for offline datasets


# quality -> fn(env, steps, seed, out_path) -> card, or "module:function" imported on first use
# (so registering a generator that needs torch does not import torch with the data layer).
_GENERATORS: dict[str, Callable[..., dict] | str] = {
    "random": "dtsweep.data.generate:make_random_dataset",
    "medium": "dtsweep.data.behaviour:make_medium_dataset",
}


def register_generator(quality: str, fn: Callable[..., dict] | str) -> None:
    """Register the offline generator for a dataset quality ("random", "medium", ...).

    `fn(env: str, steps: int, seed: int, out_path: pathlib.Path) -> dict` writes the dataset
    with `write_d4rl_hdf5` and returns its card. `fn` may also be a "module:function" string,
    imported when first needed.
    """
    _GENERATORS[quality] = fn


def generators() -> dict[str, Callable[..., dict] | str]:
    """The registered generators, quality -> function or "module:function"."""
    return dict(_GENERATORS)


def _generator(quality: str) -> Callable[..., dict] | None:
    fn = _GENERATORS.get(quality)
    if isinstance(fn, str):
        module, _, attr = fn.partition(":")
        fn = getattr(importlib.import_module(module), attr)
    return fn


def make_dataset(name: str, *, steps: int, seed: int, out_path) -> dict:
    """Generate the unversioned dataset `name` (e.g. "hopper-random") into `out_path`.

    Returns the dataset card. This is what `dtsweep data make` runs.
    """
    env, quality, version = parse_dataset(name)
    if version is not None:
        raise ValueError(f"{name!r} names a D4RL release; generated datasets are unversioned (use {env}-{quality})")
    fn = _generator(quality)
    if fn is None:
        raise DatasetNotFoundError(f"no generator for {quality!r} datasets (have: {sorted(_GENERATORS)})")
    return fn(env, int(steps), int(seed), pathlib.Path(out_path))


# ---------------------------------------------------------------------------------------------
# Name resolution


def d4rl_dir() -> pathlib.Path:
    """D4RL's dataset cache: $D4RL_DATASET_DIR or ~/.d4rl/datasets (as the d4rl package)."""
    return pathlib.Path(os.environ.get("D4RL_DATASET_DIR", "~/.d4rl/datasets")).expanduser()


def dtsweep_dir() -> pathlib.Path:
    """dtsweep's dataset cache: $DTSWEEP_DATA_DIR or ~/.cache/dtsweep/datasets."""
    default = "~/.cache/dtsweep/datasets"
    return pathlib.Path(os.environ.get("DTSWEEP_DATA_DIR", default)).expanduser()


def d4rl_file_name(name: str) -> str:
    """D4RL's file name: "walker2d-medium-replay-v2" -> "walker2d_medium_replay-v2.hdf5".

    Unversioned names map to the v2 release.
    """
    env, quality, version = parse_dataset(name)
    return f"{env}_{quality.replace('-', '_')}-{version or 'v2'}.hdf5"


def generated_file_name(name: str, steps: int, seed: int) -> str:
    """dtsweep's cache file name for a generated dataset: "hopper-random_steps=N_seed=S.hdf5"."""
    return f"{name}_steps={int(steps)}_seed={int(seed)}.hdf5"


def offline() -> bool:
    """True when $DTSWEEP_OFFLINE is set to a true value: never touch the network."""
    return os.environ.get("DTSWEEP_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def dataset_kind(name: str) -> str:
    """ "minari" (`minari:<id>`), "file" (has a `/` or ends in .hdf5/.h5) or "name"."""
    if name.startswith("minari:"):
        return "minari"
    if "/" in name or os.sep in name or name.startswith("~") or name.endswith((".hdf5", ".h5")):
        return "file"
    return "name"


def resolve_dataset(
    name: str,
    *,
    generate: bool = True,
    steps: int | None = None,
    seed: int = 0,
    download: bool | None = None,
) -> pathlib.Path:
    """Path of the HDF5 file for dataset `name`, generating or downloading it if needed.

    The rule (one meaning per name) is in the module docstring. `steps` (default
    DEFAULT_STEPS) and `seed` only matter for generated datasets. `download=None` means
    "unless $DTSWEEP_OFFLINE is set".
    """
    if download is None:
        download = not offline()

    kind = dataset_kind(name)
    if kind == "minari":
        return _resolve_minari(name.removeprefix("minari:"), download=download)
    if kind == "file":
        path = pathlib.Path(name).expanduser().absolute()
        if not path.is_file():
            raise DatasetNotFoundError(f"dataset file {path} does not exist")
        return path

    try:
        env, quality, version = parse_dataset(name)
    except ValueError as e:
        raise DatasetNotFoundError(f"{name!r} is neither a file nor a dataset name: {e}") from e

    if version is None:
        # Unversioned: dtsweep's generated data only, never a D4RL file (one meaning per name).
        steps = DEFAULT_STEPS if steps is None else int(steps)
        out = dtsweep_dir() / generated_file_name(name, steps, seed)
        if out.is_file():
            return out
        make_cmd = f"dtsweep data make {name} --steps {steps} --seed {seed} --out {out}"
        if quality not in _GENERATORS:
            raise DatasetNotFoundError(
                f"dataset {name!r}: no offline generator for {quality!r} (have "
                f"{sorted(_GENERATORS)}); for D4RL's data name its release ({name}-v2)"
            )
        if not generate:
            raise DatasetNotFoundError(f"dataset {name!r} not generated yet; run: {make_cmd}")
        return _generate_once(name, steps, seed, out)

    d4rl_path = d4rl_dir() / d4rl_file_name(name)
    if d4rl_path.is_file():
        return d4rl_path
    why = "offline"
    if download:
        try:
            return _fetch_d4rl(name, d4rl_path)
        except OSError as e:  # no network, HTTP error, timeout, or d4rl's download failing
            why = f"download failed: {e}"
    source = f" (from {D4RL_URL.format(file=d4rl_path.name)})" if version == "v2" else ""
    raise DatasetNotFoundError(
        f"dataset {name!r} not found ({why}): put D4RL's {d4rl_path.name} in "
        f"{d4rl_path.parent}{source}, or use dtsweep's offline dataset {env}-{quality} "
        f"(dtsweep data make {env}-{quality})"
    )


# ---------------------------------------------------------------------------------------------
# What a name resolved to: provenance


ORIGINS = ("d4rl", "generated", "minari")
MINARI_ID_ATTR = "minari_id"  # attributes of a Minari dataset converted to this layout
MINARI_ENV_ATTR = "minari_env_id"
MINARI_SHA_ATTR = "minari_source_sha256"


class DatasetError(ValueError):
    """A dataset file that cannot be used; `str(err)` is one line naming the file and why."""


@dataclass(frozen=True)
class DatasetSource:
    """What a dataset name resolved to, on the machine that resolved it.

    name: as written in the spec; path: absolute path of the HDF5 file (D4RL's layout) that
    is read; sha256: hex digest of its bytes; origin: "d4rl", "generated" or "minari";
    env: the dtsweep env ("hopper", ...); eval_env: the Gymnasium id to evaluate on.
    published: where the driver published the file for every node (a local path or URI of
    `<sweep dir>/inputs/<sha256>/<file name>`, `dtsweep.inputs`), None before that.
    """

    name: str
    path: str
    sha256: str
    origin: str
    env: str
    eval_env: str
    published: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> DatasetSource:
        return DatasetSource(**d)


def file_sha256(path) -> str:
    """sha256 (hex) of a file's bytes, cached per (absolute path, size, mtime).

    The cache is a small JSON file per path under `dtsweep_dir()/sha256/`, so a 1M-step
    dataset (~0.5 GB for D4RL's) is hashed once per machine, not once per trial or spec load.
    """
    path = pathlib.Path(path).expanduser().absolute()
    st = path.stat()
    key = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    cache = dtsweep_dir() / "sha256" / (hashlib.sha1(str(path).encode()).hexdigest() + ".json")
    try:
        cached = json.loads(cache.read_text())
        if {k: cached.get(k) for k in key} == key:
            return cached["sha256"]
    except (OSError, ValueError):  # no cache entry yet, or one cut off mid-write
        pass
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({**key, "sha256": digest}, f)
        os.replace(tmp, cache)
    except OSError:  # a read-only cache only costs the next caller a re-hash
        pass
    return digest


def _file_facts(path: pathlib.Path) -> tuple[int, int, dict | None, dict]:
    """(obs_dim, act_dim, dtsweep card or None, other file attributes) without reading data."""
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("observations", "actions") if k not in f]
            if missing:
                raise DatasetError(f"dataset file {path}: not in D4RL's layout, missing {missing} (has {sorted(f.keys())})")
            obs, act = f["observations"].shape, f["actions"].shape
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    except OSError as e:
        raise DatasetError(f"dataset file {path}: not a readable HDF5 file ({str(e).splitlines()[0]})") from None
    if len(obs) != 2 or len(act) not in (1, 2):
        raise DatasetError(f"dataset file {path}: observations {obs} / actions {act} are not [N, S] / [N, A]")
    card = attrs.pop(CARD_ATTR, None)
    return obs[1], (act[1] if len(act) == 2 else 1), (None if card is None else json.loads(card)), attrs


def dataset_env(name: str, env: str | None = None) -> str:
    """The dtsweep env of dataset `name` without reading its data (shapes and attributes only).

    Names carry their env; for a file or a Minari dataset it is `env` when given (checked
    against the file's sizes and card), else what the file's card or Minari metadata names,
    else the only env with the file's observation/action sizes. Raises DatasetError or
    DatasetNotFoundError (one line) when it cannot be told.
    """
    kind = dataset_kind(name)
    if kind == "name":
        own = parse_dataset(name)[0]
        if env is not None and env != own:
            raise DatasetError(f"dataset {name!r} is a {own} dataset, not {env}")
        return own
    path = resolve_dataset(name, generate=False, download=False)
    obs_dim, act_dim, card, attrs = _file_facts(path)
    named = (card or {}).get("env") or env_of_gym_id(str(attrs.get(MINARI_ENV_ATTR, "")))
    what = f"dataset file {path}" if kind == "file" else f"dataset {name!r}"
    if env is not None:
        if env not in ENVS:
            raise DatasetError(f"{what}: unknown env {env!r}; allowed: {sorted(ENVS)}")
        if named and named != env:
            raise DatasetError(f"{what} was recorded on {named}, not {env}")
        found = env
    elif named:
        found = named
    else:
        fits = envs_with_shape(obs_dim, act_dim)
        if len(fits) != 1:
            which = f"ambiguous: {' or '.join(fits)}" if fits else "no env of the study has them"
            raise DatasetError(
                f"{what}: observation/action sizes {obs_dim}/{act_dim} do not tell the env ({which}); "
                f"give the study's env: (one of {sorted(ENVS)})"
            )
        found = fits[0]
    info = ENVS[found]
    if (obs_dim, act_dim) != (info.obs_dim, info.act_dim):
        raise DatasetError(
            f"{what}: observation/action sizes {obs_dim}/{act_dim} do not match {found} ({info.obs_dim}/{info.act_dim})"
        )
    return found


def resolve_source(
    name: str,
    *,
    env: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    generate: bool = True,
    download: bool | None = None,
) -> DatasetSource:
    """Resolve `name` (module docstring's rule), hash the file, and say what it is.

    `env`: the study's env for a file or Minari dataset (see `dataset_env`). Origin of a file
    path: "generated" if it carries a dtsweep card, "minari" if converted from Minari, else
    "d4rl" (a file in D4RL's layout from elsewhere is taken to be D4RL's data).
    """
    path = resolve_dataset(name, generate=generate, steps=steps, seed=seed, download=download)
    found = dataset_env(name, env)
    _, _, card, attrs = _file_facts(path)
    info = ENVS[found]
    if card is not None:
        origin, eval_env = "generated", card.get("gym_id") or info.gym_id
    elif MINARI_ID_ATTR in attrs:
        origin, eval_env = "minari", str(attrs.get(MINARI_ENV_ATTR) or "")
        if not eval_env:
            raise DatasetError(f"dataset {name!r}: its Minari metadata names no env to evaluate on")
    else:
        origin, eval_env = "d4rl", info.d4rl_gym_id
    if dataset_kind(name) == "name" and (origin == "d4rl") != (parse_dataset(name)[2] is not None):
        raise DatasetError(f"dataset {name!r} resolved to {path}, which holds {origin} data")
    return DatasetSource(name, str(path), file_sha256(path), origin, found, eval_env)


def check_d4rl_file(path) -> None:
    """Refuse a file a trial could not train on, with one line naming it and the problem.

    Checks: D4RL's required keys, equal lengths, at least one row, and finite observations,
    actions and rewards (one key at a time, so peak memory is one array).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"dataset file {path} does not exist")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in REQUIRED_KEYS if k not in f]
            if missing:
                raise DatasetError(f"dataset file {path}: not in D4RL's layout, missing {missing} (has {sorted(f.keys())})")
            n = len(f["observations"])
            if n == 0:
                raise DatasetError(f"dataset file {path}: no rows")
            lengths = {k: len(f[k]) for k in D4RL_KEYS if k in f}
            bad = {k: m for k, m in lengths.items() if m != n}
            if bad:
                raise DatasetError(f"dataset file {path}: lengths differ: observations has {n} rows, {bad}")
            for key in ("observations", "actions", "rewards"):
                values = np.asarray(f[key][()], dtype=np.float64)
                finite = np.isfinite(values)
                if not finite.all():
                    row = int(np.argwhere(~finite)[0][0])
                    raise DatasetError(f"dataset file {path}: {key} holds NaN or inf (first at row {row})")
    except OSError as e:
        raise DatasetError(f"dataset file {path}: not a readable HDF5 file ({str(e).splitlines()[0]})") from None


def load_dataset(name: str, **kwargs: Any) -> dict[str, np.ndarray]:
    """`read_d4rl_hdf5(resolve_dataset(name, **kwargs))`."""
    return read_d4rl_hdf5(resolve_dataset(name, **kwargs))


def _generate_once(name: str, steps: int, seed: int, out: pathlib.Path) -> pathlib.Path:
    # Many trials on one machine ask for the same dataset at once: the first generates, the
    # others wait on the lock and then find the file. The write itself is atomic anyway.
    from filelock import FileLock

    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not out.is_file():
            make_dataset(name, steps=steps, seed=seed, out_path=out)
    return out


def _fetch_d4rl(name: str, dest: pathlib.Path) -> pathlib.Path:
    """Fetch a versioned D4RL dataset into D4RL's cache (`dest`); OSError if it cannot."""
    try:
        import d4rl  # noqa: F401  (registers D4RL's envs with gym)
        import gym
    except ImportError:
        pass
    else:
        arrays = gym.make(name).get_dataset()  # d4rl downloads into its cache (= dest)
        if not dest.is_file():
            write_d4rl_hdf5(dest, {k: arrays[k] for k in D4RL_KEYS if k in arrays})
        return dest

    if parse_dataset(name)[2] != "v2":
        raise FileNotFoundError("only D4RL's v2 MuJoCo files have a known URL")
    url = D4RL_URL.format(file=dest.name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            shutil.copyfileobj(response, f, length=1 << 20)
        os.replace(tmp, dest)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def minari_root() -> pathlib.Path:
    """Minari's local store: $MINARI_DATASETS_PATH or ~/.minari/datasets (as minari)."""
    return pathlib.Path(os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")).expanduser()


def _resolve_minari(dataset_id: str, *, download: bool) -> pathlib.Path:
    try:
        import minari
    except ImportError as e:
        raise DatasetNotFoundError(
            f"dataset 'minari:{dataset_id}' needs the optional minari package: pip install minari==0.5.*"
        ) from e
    try:
        dataset = minari.load_dataset(dataset_id, download=download)
    except FileNotFoundError as e:
        raise DatasetNotFoundError(
            f"dataset 'minari:{dataset_id}' is not in Minari's local store {minari_root()}"
            + ("" if download else " (offline: downloads are off)")
        ) from e
    # The converted copy is keyed by the bytes of Minari's files, so a re-recorded dataset
    # of the same id is converted again rather than read stale.
    data = pathlib.Path(dataset.spec.data_path)
    digest = hashlib.sha256()
    for f in sorted(p for p in data.rglob("*") if p.is_file()):
        digest.update(f"{f.relative_to(data)}\0{file_sha256(f)}\n".encode())
    source_sha = digest.hexdigest()
    out = dtsweep_dir() / f"minari_{dataset_id.replace('/', '_')}_{source_sha[:16]}.hdf5"
    if out.is_file():
        return out
    # The env to evaluate on is the one the dataset's metadata names for evaluation
    # (Minari's eval_env_spec), else the one it was recorded on.
    eval_env = dataset.recover_environment(eval_env=True)
    env_id = eval_env.spec.id if eval_env.spec is not None else ""
    eval_env.close()
    attrs = {MINARI_ID_ATTR: dataset_id, MINARI_ENV_ATTR: env_id, MINARI_SHA_ATTR: source_sha}
    write_d4rl_hdf5(out, minari_to_d4rl(dataset.iterate_episodes()), attrs)
    return out


def minari_to_d4rl(episodes) -> dict[str, np.ndarray]:
    """Concatenate Minari episodes (observations [T+1, S], actions [T, A], rewards,
    terminations, truncations [T]) into D4RL's layout."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in D4RL_KEYS}
    for ep in episodes:
        obs = np.asarray(ep.observations)
        if obs.dtype == object or obs.ndim != 2:
            raise ValueError("only Minari datasets with flat array observations are supported")
        parts["observations"].append(obs[:-1])
        parts["next_observations"].append(obs[1:])
        parts["actions"].append(np.asarray(ep.actions).reshape(len(obs) - 1, -1))
        parts["rewards"].append(np.asarray(ep.rewards))
        parts["terminals"].append(np.asarray(ep.terminations))
        parts["timeouts"].append(np.asarray(ep.truncations) & ~np.asarray(ep.terminations))
    if not parts["observations"]:
        raise ValueError("Minari dataset has no episodes")
    return {k: np.concatenate(v).astype(D4RL_DTYPES[k]) for k, v in parts.items()}


__all__ = [
    "CARD_ATTR",
    "D4RL_KEYS",
    "DEFAULT_STEPS",
    "DatasetError",
    "DatasetNotFoundError",
    "DatasetSource",
    "ORIGINS",
    "check_d4rl_file",
    "d4rl_dir",
    "dataset_env",
    "dataset_kind",
    "d4rl_file_name",
    "dtsweep_dir",
    "episode_bounds",
    "file_sha256",
    "generated_file_name",
    "generators",
    "load_dataset",
    "make_dataset",
    "minari_root",
    "minari_to_d4rl",
    "read_d4rl_hdf5",
    "read_dataset_card",
    "register_generator",
    "resolve_dataset",
    "resolve_source",
    "write_d4rl_hdf5",
]
