"""Checks that `run` makes before it writes anything.

A sweep that would fail five minutes (or five hours) in — a dataset that is not there, a
Hugging Face model that cannot be downloaded, storage that cannot be written, a cluster
that does not answer — fails here instead, with one line that says what to do, and the
sweep directory is not created. The spec itself is validated earlier (dtsweep.spec).

    check_run(spec, address=None)      # raises PreflightError

Each check is cheap: no dataset is generated, no weights are loaded, nothing is written.
"""

from __future__ import annotations

import os
import socket

import pyarrow as pa
import pyarrow.fs as pafs
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from transformers import AutoConfig

from dtsweep.data import (
    DatasetError,
    DatasetNotFoundError,
    check_d4rl_file,
    d4rl_dir,
    d4rl_file_name,
    dataset_env,
    dataset_kind,
    generators,
    resolve_dataset,
)
from dtsweep.envs import parse_dataset
from dtsweep.models.backbones import HUB_INITS, InitError, backbone_depth
from dtsweep.spec import SweepSpec, Trial
from dtsweep.store import resolve
from dtsweep.tracking import TrackingError, check_loggers

RAY_CONNECT_TIMEOUT_S = 3.0


class PreflightError(Exception):
    """An input problem the user can fix; `str(err)` is one line saying how."""


def check_run(spec: SweepSpec, *, address: str | None = None) -> None:
    """Everything `dtsweep run` needs, checked before anything is written."""
    points = [t for study in spec.studies for t in spec.grid(study)]  # search studies too
    check_tracking(spec)
    check_inits(points)
    check_datasets(points)
    check_storage(spec.sweep_dir)
    if address:
        check_ray_address(address)


# ---- experiment tracking


def check_tracking(spec: SweepSpec) -> None:
    """Every tracking tool of `ray.loggers` can work here (package installed, store accepted)."""
    try:
        check_loggers(spec.ray.loggers)
    except TrackingError as e:
        raise PreflightError(str(e)) from None


# ---- models


def check_inits(trials: list[Trial]) -> None:
    """Every init (and swap source) resolves: a known name, a shipped asset, a local
    Hugging Face directory with a usable config.json, or a Hub model reachable from here."""
    needed = {(t.init, tuple(sorted(t.model.items()))) for t in trials}
    needed |= {(t.swap_from, ()) for t in trials if t.swap_block is not None}
    for init, overrides in sorted(needed):
        try:
            backbone_depth(init, dict(overrides) or None)  # reads config.json of directories
        except InitError as e:
            raise PreflightError(str(e)) from None
        if init in HUB_INITS:
            _check_hub_model(init, HUB_INITS[init][0])


def _check_hub_model(init: str, repo: str) -> None:
    """The model's config (and, offline, its weights) can be had from the Hub or its cache."""
    how = (
        f"on a machine with internet run `hf download {repo} --local-dir DIR`, copy DIR here "
        f"and write `init: DIR` (or `swap_from: DIR`) in the spec"
    )
    try:
        AutoConfig.from_pretrained(repo)  # a few kB; from the cache when offline
    except OSError as e:
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if hf_constants.HF_HUB_OFFLINE else _first_line(e)
        raise PreflightError(f"init {init!r}: Hugging Face model {repo!r} cannot be loaded ({why}); {how}") from None
    if hf_constants.HF_HUB_OFFLINE:
        cached = [try_to_load_from_cache(repo, f) for f in ("model.safetensors", "pytorch_model.bin")]
        if not any(isinstance(c, str) for c in cached):
            raise PreflightError(
                f"init {init!r}: the weights of Hugging Face model {repo!r} are not in the local cache "
                f"and HF_HUB_OFFLINE is set; {how}"
            )


# ---- datasets


def check_datasets(trials: list[Trial]) -> None:
    """Every dataset is on disk and usable, or is one dtsweep generates itself (unversioned
    names of a quality with a generator), or — when downloads are allowed — is fetched now.

    A file that is there (a path, D4RL's file, a converted Minari dataset) is read once:
    D4RL's keys, equal lengths, finite observations, actions and rewards, and sizes that
    match its env (`dtsweep.data.check_d4rl_file`, `dataset_env`). One line on failure.
    """
    for name, env, steps, seed in sorted({(t.dataset, t.env, t.data.steps, t.data.seed) for t in trials}):
        try:
            path = resolve_dataset(name, generate=False, steps=steps, seed=seed)
            check_d4rl_file(path)
            if dataset_kind(name) != "name":
                dataset_env(name, env)
        except DatasetNotFoundError as e:
            if dataset_kind(name) == "name":
                _, quality, version = parse_dataset(name)
                if version is None and quality in generators():
                    _check_behaviour_policy(name, env, quality)
                    continue  # `run` generates it before the first trial starts
            raise PreflightError(str(e)) from None
        except DatasetError as e:
            raise PreflightError(str(e)) from None


# The built-in `medium` generator rolls out a behaviour policy shipped per env.
MEDIUM_GENERATOR = "dtsweep.data.behaviour:make_medium_dataset"


def _check_behaviour_policy(name: str, env: str, quality: str) -> None:
    if quality != "medium" or generators()[quality] != MEDIUM_GENERATOR:
        return
    from dtsweep.data.behaviour import behaviour_asset_dir

    actor = behaviour_asset_dir(env) / "actor.safetensors"
    if not actor.is_file():
        raise PreflightError(
            f"dataset {name!r} is generated with the behaviour policy {actor}, which is missing; "
            f"train it with `dtsweep pretrain behaviour {env}` or put D4RL's "
            f"{d4rl_file_name(name)} in {d4rl_dir()}"
        )


# ---- storage


def check_storage(sweep_dir: str) -> None:
    """The sweep directory exists as a directory or can be created, without creating it.

    Walks up to the nearest existing ancestor: it must be a directory (and, locally,
    writable). On an object store this checks the URI, the credentials and the bucket.
    """
    try:
        fs, path = resolve(sweep_dir)
        probe = path.rstrip("/")
        while True:
            info = fs.get_file_info(probe)
            if info.type == pafs.FileType.Directory:
                break
            if info.type == pafs.FileType.File:
                raise PreflightError(f"storage {sweep_dir!r} is not writable: {probe} is a file, not a directory")
            parent = probe.rsplit("/", 1)[0]
            if not parent or parent == probe:
                raise PreflightError(f"storage {sweep_dir!r} is not writable: neither it nor any parent exists")
            probe = parent
    except (OSError, pa.ArrowException) as e:  # bad URI, no credentials, unreachable store
        raise PreflightError(f"storage {sweep_dir!r} cannot be used: {_first_line(e)}") from None
    if isinstance(fs, pafs.LocalFileSystem) and not os.access(probe, os.W_OK | os.X_OK):
        raise PreflightError(f"storage {sweep_dir!r} is not writable: no write permission on {probe}")


# ---- Ray


def check_ray_address(address: str, timeout_s: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """Fail in seconds when a Ray address does not answer, instead of hanging in ray.init.

    `address` is what ray.init takes: "host:port" (the head's GCS, usually port 6379),
    "ray://host:port" (Ray Client), "auto" (the cluster started on this machine with
    `ray start`) or "local" (start a new local Ray).
    """
    if address == "local":
        return
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            address = canonicalize_bootstrap_address("auto")
        except ConnectionError as e:
            raise PreflightError(f"Ray address 'auto': {_first_line(e)}") from None
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if "://" in hostport or not host or not port.isdigit():
        raise PreflightError(
            f"Ray address {address!r} is not one ray.init understands; expected host:port "
            "(e.g. 10.0.0.5:6379), ray://host:10001, auto or local"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise PreflightError(
            f"Ray address {address!r} does not answer ({_first_line(e)}); start the cluster "
            "(`ray up cluster.yaml`, see docs/cluster.md) or leave out --address/RAY_ADDRESS for a local Ray"
        ) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
