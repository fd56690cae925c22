"""A sweep's inputs, resolved once by the driver and shared with every node through storage.

Each dataset a trial names is resolved (and, for dtsweep's generated datasets, generated
offline) exactly once per run (`prepare_datasets`). Before any trial starts, the driver
publishes each dataset file, and each local model directory named by an `init:` or
`swap_from:`, into the sweep directory, content-addressed:

    <sweep dir>/inputs/<sha256 of the file>/<file name>                  a dataset
    <sweep dir>/inputs/<digest of the tree>/manifest.json, <dir name>/... an init directory

(`publish_datasets`, `publish_inits`; an upload is skipped when the object is already there
with the same size, so reruns and sweeps sharing a dataset upload nothing). Every trial is
handed those locations and reads exactly those bytes: a worker fetches them into a
node-local cache, `$DTSWEEP_DATA_DIR/inputs/` (default `~/.cache/dtsweep/datasets/inputs/`),
and verifies every sha256 (`fetch_file`, `fetch_tree`), so a node that cannot see the
driver's files trains on the same bytes. A published copy on a local (or file://) sweep
directory is read in place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs

from dtsweep.spec import Trial
from dtsweep.store import Store, resolve

INPUTS_DIR = "inputs"
MANIFEST = "manifest.json"


def dataset_key(t: Trial) -> tuple:
    """What identifies a trial's dataset: (name, env, data.steps, data.seed, file sha256 or None)."""
    return (t.dataset, t.env, t.data.steps, t.data.seed, t.dataset_sha256)


def prepare_datasets(trials: list[Trial], log=print) -> dict[tuple, DatasetSource]:  # noqa: F821
    """Resolve (and generate offline, if needed) every dataset of `trials` once.

    Returns dataset_key(trial) -> dtsweep.data.DatasetSource (path, sha256, origin). Raises
    ValueError if a file named by path changed since the spec was loaded.
    """
    from dtsweep.data import DatasetNotFoundError, resolve_source

    out = {}
    for key in sorted({dataset_key(t) for t in trials}, key=str):
        name, env, steps, seed, sha = key
        try:
            out[key] = resolve_source(name, env=env, steps=steps, seed=seed, generate=False)
        except DatasetNotFoundError:  # a generated dataset not made yet: minutes per million steps
            log(f"dataset {name}: generating {steps:,} steps offline with seed {seed} (once; later runs reuse the file)")
            t0 = time.perf_counter()
            out[key] = resolve_source(name, env=env, steps=steps, seed=seed)
            log(f"dataset {name}: generated in {time.perf_counter() - t0:.0f}s -> {out[key].path}")
        if sha is not None and out[key].sha256 != sha:
            raise ValueError(
                f"dataset file {out[key].path} changed since the spec was loaded (sha256 {out[key].sha256}, was {sha})"
            )
    return out


# --------------------------------------------------------------------------------------
# Publishing (the driver)
# --------------------------------------------------------------------------------------


def publish_datasets(store: Store, sources: dict, log=print) -> dict:
    """Upload each dataset file of `sources` (prepare_datasets' result) to
    `inputs/<sha256>/<file name>` of the sweep directory, unless already there with the same
    size; returns the same mapping with each DatasetSource's `published` location set."""
    out = {}
    for key, src in sources.items():
        rel = f"{INPUTS_DIR}/{src.sha256}/{Path(src.path).name}"
        size = os.path.getsize(src.path)
        if store.file_size(rel) != size:
            t0 = time.perf_counter()
            store.upload_file(src.path, rel)
            log(f"dataset {src.name}: published {size / 1e6:,.1f} MB to {store.uri(rel)} in {time.perf_counter() - t0:.0f}s")
        out[key] = dataclasses.replace(src, published=store.uri(rel))
    return out


def published_dataset(store: Store, sha256, source_path) -> dict | None:
    """{"uri", "sha256"} of the dataset file `run` published for a trial, from its
    trials.parquet row (`dataset_sha256`, `dataset_source`); None when it was not published
    (a sweep from before publishing, or `inputs/` deleted)."""
    if not (isinstance(sha256, str) and isinstance(source_path, str)):
        return None
    rel = f"{INPUTS_DIR}/{sha256}/{Path(source_path).name}"
    return {"uri": store.uri(rel), "sha256": sha256} if store.exists(rel) else None


def local_init_dirs(trials: list[Trial]) -> dict[str, Path]:
    """init as written -> local directory, for every `init:`/`swap_from:` of `trials` that names
    a model directory on this machine (shipped assets and Hub names are not: every node has
    the package, and Hub models come from each node's Hugging Face cache)."""
    from dtsweep.models.backbones import ASSET_INITS, HUB_INITS, RANDOM_INITS, source_dir

    out = {}
    for t in trials:
        for init in (t.init, t.swap_from):
            if init and init not in (*RANDOM_INITS, *HUB_INITS, *ASSET_INITS) and init not in out:
                out[init] = source_dir(init)
    return out


def _tree_manifest(path: Path) -> dict:
    """{"name", "files": {relative path: {"sha256", "size"}}} of every file below `path`."""
    files = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(f, "rb") as fh:
            files[f.relative_to(path).as_posix()] = {"sha256": hashlib.file_digest(fh, "sha256").hexdigest(),
                                                     "size": f.stat().st_size}  # fmt: skip
    return {"name": path.name, "files": files}


def tree_digest(manifest: dict) -> str:
    """The content address of a directory: sha256 of its files' relative paths and sha256s."""
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()


def publish_inits(store: Store, trials: list[Trial], log=print) -> dict[str, dict]:
    """Upload each local init directory of `trials` to `inputs/<digest>/<dir name>/` with its
    manifest (written last: a directory with a manifest is complete); returns init as written ->
    {"uri", "sha256" (the tree digest), "source" (init_source on the driver)} for the jobs."""
    from dtsweep.models import init_source

    out = {}
    for init, path in local_init_dirs(trials).items():
        source = init_source(init)
        manifest = _tree_manifest(path)
        digest = tree_digest(manifest)
        base = f"{INPUTS_DIR}/{digest}"
        if not store.exists(f"{base}/{MANIFEST}"):
            t0 = time.perf_counter()
            for rel, info in manifest["files"].items():
                if store.file_size(f"{base}/{manifest['name']}/{rel}") != info["size"]:
                    store.upload_file(path / rel, f"{base}/{manifest['name']}/{rel}")
            store.write_bytes(f"{base}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
            size = sum(i["size"] for i in manifest["files"].values())
            log(f"init {init}: published {len(manifest['files'])} files ({size / 1e6:,.1f} MB) to {store.uri(base)} "
                f"in {time.perf_counter() - t0:.0f}s")  # fmt: skip
        out[init] = {"uri": store.uri(base), "sha256": digest, "source": source}
    return out


def trial_inits(t: Trial, inits: dict[str, dict]) -> dict[str, dict]:
    """The entries of publish_inits' result that trial `t` needs (its init and swap_from)."""
    return {k: inits[k] for k in (t.init, t.swap_from) if k in inits}


# --------------------------------------------------------------------------------------
# Fetching (a trial, on any node)
# --------------------------------------------------------------------------------------


class InputError(ValueError):
    """A published input is missing or has other bytes than the driver published."""


def inputs_cache() -> Path:
    """This node's cache of published inputs: $DTSWEEP_DATA_DIR/inputs (default ~/.cache/dtsweep/datasets/inputs)."""
    from dtsweep.data import dtsweep_dir

    return dtsweep_dir() / INPUTS_DIR


def _local_path(uri: str) -> Path | None:
    """The path of `uri` when it lies on this machine's file system (a local or file:// sweep)."""
    fs, path = resolve(uri)
    return Path(path) if isinstance(fs, pafs.LocalFileSystem) else None


def fetch_file(uri: str, sha256: str, cache_rel: str | None = None) -> Path:
    """A local file holding the bytes published at `uri`, verified against `sha256`.

    A local published copy is read in place; a remote one is downloaded once per node into
    `inputs_cache()/<sha256>/<file name>` (or `cache_rel` below the cache), streamed and
    hashed on the way, and moved into place only when its sha256 matches. InputError if the
    object is missing or its bytes differ.
    """
    from dtsweep.data import file_sha256

    local = _local_path(uri)
    if local is not None:
        if not local.is_file():
            raise InputError(f"published input {uri} is missing (was the sweep directory's inputs/ deleted?)")
        if file_sha256(local) != sha256:
            raise InputError(f"published input {uri} has sha256 {file_sha256(local)}, expected {sha256}")
        return local
    dest = inputs_cache() / (cache_rel or f"{sha256}/{uri.rstrip('/').rsplit('/', 1)[1]}")
    if dest.is_file() and file_sha256(dest) == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise InputError(f"published input {uri} is missing (was the sweep directory's inputs/ deleted?)")
    # A unique temporary name in the same directory: trials on this node fetching the same
    # file at once each write their own and the last rename wins (same bytes).
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".fetch-", suffix=".tmp")
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, fs.open_input_stream(path) as src:
            while chunk := src.read(1 << 24):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != sha256:
            raise InputError(f"published input {uri} has sha256 {h.hexdigest()}, expected {sha256}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def fetch_tree(entry: dict) -> Path:
    """A local directory holding the init directory published at entry["uri"] (publish_inits),
    every file verified; read in place when local, else cached as inputs_cache()/<digest>/<name>/."""
    uri, digest = entry["uri"], entry["sha256"]
    fs, base = resolve(uri)
    try:
        with fs.open_input_stream(f"{base}/{MANIFEST}") as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        raise InputError(f"published init {uri}/{MANIFEST} is missing (was the sweep directory's inputs/ deleted?)") from None
    if tree_digest(manifest) != digest:
        raise InputError(f"published init {uri}: its manifest has digest {tree_digest(manifest)}, expected {digest}")
    name = manifest["name"]
    for rel, info in manifest["files"].items():
        fetch_file(f"{uri}/{name}/{rel}", info["sha256"], cache_rel=f"{digest}/{name}/{rel}")
    local = _local_path(uri)
    return (local if local is not None else inputs_cache() / digest) / name


def fetch_inits(entries: dict[str, dict]) -> dict[str, tuple[Path, str]]:
    """init as written -> (local copy, its source as the driver recorded it), for
    `dtsweep.models.backbones.use_local_copies`."""
    return {init: (fetch_tree(e), e["source"]) for init, e in entries.items()}
