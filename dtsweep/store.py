"""Parquet schemas and atomic readers/writers for a sweep directory (DESIGN §3).

A sweep directory may be a local path or a URI that `pyarrow.fs` understands
(`s3://bucket/sweeps/paper`, `gs://...`, `file:///abs/path`). Every write goes to a
temporary name first and is then moved into place, so a reader never sees half a file
(on object stores, where a move is a copy, the upload of one object is atomic anyway).

Checkpoints are Parquet tables with one row per tensor — name, dtype, shape, raw bytes —
never pickle, so a checkpoint received from someone else is safe to open.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from dtsweep.schemas import TENSOR_SCHEMA

# ---- filesystem access


# Object stores whose URIs must name a bucket: `s3://` alone would otherwise open the
# account's bucket listing as if it were a sweep directory.
_BUCKET_SCHEMES = ("s3", "gs", "gcs")


def resolve(uri_or_path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a pyarrow-supported URI.

    An S3 URI goes to the endpoint in $AWS_ENDPOINT_URL when set (pyarrow's S3FileSystem reads
    it, like the AWS SDKs; checked with pyarrow 26 in tests/test_s3.py), so MinIO, Ceph or any
    S3-compatible store works as AWS does. Raises StorageError (one line) for a URI pyarrow
    cannot parse, an unknown scheme, or an object-store URI without a bucket.
    """
    s = str(uri_or_path)
    if "://" not in s:
        return pafs.LocalFileSystem(), str(Path(s).expanduser().resolve())
    scheme, _, rest = s.partition("://")
    if scheme.lower() in _BUCKET_SCHEMES and not rest.split("/", 1)[0]:
        raise StorageError(f"storage URI {s!r} names no bucket; expected {scheme}://BUCKET/PREFIX")
    try:
        fs, path = pafs.FileSystem.from_uri(s)
    except (pa.ArrowException, ValueError) as e:  # ArrowInvalid: syntax, unknown scheme
        raise StorageError(f"storage URI {s!r} is not valid: {_first_line(e)}") from None
    return fs, path


class StorageError(OSError):
    """The storage location is unusable: a malformed URI, or a directory that cannot be
    written (a user-fixable problem: one line, exit 2)."""


class Store:
    """A sweep directory: relative paths in, atomic Parquet/bytes out."""

    def __init__(self, root: str):
        self.root = str(root).rstrip("/")
        self.fs, self.base = resolve(self.root)
        # A root given as a URI (file:// included) stays a URI in everything handed to
        # other processes (Tune's storage_path, checkpoint paths), so remote and local
        # storage take the same code path and file:// tests exercise the remote one.
        self.is_local = "://" not in self.root

    def path(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def uri(self, *parts: str) -> str:
        """Location a user or another process can open: an absolute path, or a URI for a URI root."""
        return self.path(*parts) if self.is_local else "/".join([self.root, *parts])

    def resolve_rel(self, path: str) -> str:
        """A path as stored in an output table (`checkpoints.parquet`'s `path`) -> a location to open.

        Paths are stored relative to the sweep directory, so a copied or moved sweep reads its
        own files. Absolute paths and URIs written by older versions are accepted: when the
        file they name exists inside this sweep directory (same path below `checkpoints/`),
        that copy is used, otherwise the path as written.
        """
        rel = self.relative(path)
        return self.uri(rel) if rel is not None else str(path)

    def relative(self, path: str) -> str | None:
        """`path` as a path relative to this sweep directory, or None if it lies outside it.

        A relative path is returned as is; an absolute path or URI is matched on its part from
        the last `/checkpoints/` on (the only absolute paths older versions stored), and only if
        that file exists here.
        """
        s = str(path)
        if "://" not in s and not s.startswith("/"):
            return s
        for prefix in (self.uri(), self.path(), self.root):
            if s.startswith(prefix + "/"):
                return s[len(prefix) + 1 :]
        cut = s.rfind("/checkpoints/")
        if cut >= 0 and self.exists(s[cut + 1 :]):
            return s[cut + 1 :]
        return None

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def makedirs(self, *parts: str) -> None:
        self.fs.create_dir(self.path(*parts), recursive=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write-then-move so readers see the old file or the new one, never a part."""
        final = self.path(rel)
        parent = final.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{final.rsplit('/', 1)[1]}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, final)

    def upload_file(self, local_path: str | Path, rel: str) -> None:
        """Copy a local file to `rel`, streamed (datasets are up to gigabytes), write-then-move.

        On a local sweep directory a hard link stands in for the copy where the file system
        allows one (same bytes, no second copy on disk)."""
        final = self.path(rel)
        parent = final.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{final.rsplit('/', 1)[1]}"
        if isinstance(self.fs, pafs.LocalFileSystem):
            try:
                os.link(local_path, tmp)
                self.fs.move(tmp, final)
                return
            except OSError:  # another device, or links not allowed: copy below
                pass
        with open(local_path, "rb") as src, self.fs.open_output_stream(tmp) as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
        self.fs.move(tmp, final)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def write_table(self, rel: str, table: pa.Table, compression: str = "zstd") -> bytes:
        """Atomically write a Parquet file; returns the bytes written (for hashing)."""
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression=compression)
        data = sink.getvalue().to_pybytes()
        self.write_bytes(rel, data)
        return data

    def read_table(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.path(rel), filesystem=self.fs, columns=columns)

    def read_pandas(self, rel: str) -> pd.DataFrame:
        return self.read_table(rel).to_pandas()

    def list(self, rel_dir: str, suffix: str = "") -> list[str]:
        """Relative paths of the files directly under rel_dir ending in suffix (sorted)."""
        sel = pafs.FileSelector(self.path(rel_dir), allow_not_found=True)
        out = []
        for info in self.fs.get_file_info(sel):
            name = info.base_name
            if info.type == pafs.FileType.File and name.endswith(suffix) and not name.startswith(".tmp-"):
                out.append(f"{rel_dir}/{name}")
        return sorted(out)

    def list_dirs(self, rel_dir: str) -> list[str]:
        sel = pafs.FileSelector(self.path(rel_dir), allow_not_found=True)
        return sorted(i.base_name for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.Directory)

    def delete(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.delete_file(self.path(rel))

    def move(self, src: str, dst: str) -> None:
        """Rename a file inside the sweep directory (a copy and a delete on object stores)."""
        self.fs.move(self.path(src), self.path(dst))

    def set_aside(self, rel: str) -> str:
        """Rename a damaged file to `<rel>.corrupt-<UTC time>` (kept for inspection); returns the new name."""
        new = f"{rel}.corrupt-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:4]}"
        self.move(rel, new)
        return new

    def file_size(self, rel: str) -> int | None:
        info = self.fs.get_file_info(self.path(rel))
        return info.size if info.type == pafs.FileType.File else None

    def check_writable(self) -> None:
        """Raise OSError with the location if the sweep directory cannot be written."""
        probe = f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        try:
            self.makedirs()
            with self.fs.open_output_stream(self.path(probe)) as f:
                f.write(b"ok")
            self.fs.delete_file(self.path(probe))
        except (OSError, pa.ArrowException) as e:
            raise StorageError(f"storage {self.root!r} is not writable: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def table_from_rows(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows (dicts) to a table with exactly `schema`'s columns (missing values -> null)."""
    cols = {f.name: [r.get(f.name) for r in rows] for f in schema}
    return pa.Table.from_pydict(cols, schema=schema)


# ---- checkpoints: one row per tensor


def state_dict_to_table(state_dict: dict[str, torch.Tensor], metadata: dict | None = None) -> pa.Table:
    """Tensors -> Parquet table (name, dtype, shape, data = raw little-endian bytes)."""
    names, dtypes, shapes, datas = [], [], [], []
    for name, t in state_dict.items():
        t = t.detach().cpu().contiguous()
        names.append(name)
        dtypes.append(str(t.dtype).removeprefix("torch."))
        shapes.append(list(t.shape))
        # View as bytes so dtypes numpy lacks (bfloat16) round-trip exactly.
        datas.append(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    table = pa.Table.from_pydict({"name": names, "dtype": dtypes, "shape": shapes, "data": datas}, schema=TENSOR_SCHEMA)
    if metadata:
        table = table.replace_schema_metadata({"dtsweep": json.dumps(metadata)})
    return table


def write_checkpoint(store: Store, rel: str, state_dict: dict[str, torch.Tensor], metadata: dict) -> dict:
    """Write a tensor-table checkpoint atomically; returns {n_params, nbytes, sha256} of the file.

    `metadata` (JSON-able: trial_id, epoch, backbone config, ...) is stored in the Parquet
    footer so `read_checkpoint_metadata` can rebuild the model without reading the weights.
    """
    n_params = int(sum(t.numel() for t in state_dict.values()))
    table = state_dict_to_table(state_dict, {**metadata, "n_params": n_params})
    data = store.write_table(rel, table, compression="none")  # weights barely compress
    return {"n_params": n_params, "nbytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def load_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """Read a Parquet checkpoint (local path or URI) into a state_dict of CPU tensors. No pickle."""
    fs, p = resolve(path)
    table = pq.read_table(p, filesystem=fs)
    out = {}
    for name, dtype, shape, data in zip(*(table.column(c).to_pylist() for c in ("name", "dtype", "shape", "data"))):
        dt = getattr(torch, dtype)
        if not isinstance(dt, torch.dtype):
            raise ValueError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        flat = torch.frombuffer(bytearray(data), dtype=dt) if data else torch.empty(0, dtype=dt)
        out[name] = flat.reshape(shape)
    return out


def read_checkpoint_metadata(path: str) -> dict:
    """The JSON metadata stored with a checkpoint (reads only the Parquet footer)."""
    fs, p = resolve(path)
    meta = pq.read_schema(p, filesystem=fs).metadata or {}
    return json.loads(meta.get(b"dtsweep", b"{}"))


def sha256_file(path: str) -> str:
    fs, p = resolve(path)
    h = hashlib.sha256()
    with fs.open_input_stream(p) as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def to_numpy_rows(df: pd.DataFrame) -> list[dict]:
    """DataFrame rows as plain-Python dicts (NaN/NA -> None) for table_from_rows."""
    return [
        {k: (None if pd.isna(v) else (v.item() if isinstance(v, np.generic) else v)) for k, v in r.items()}
        for r in df.to_dict("records")
    ]


# ---- the run lease: one `run` at a time per sweep directory

LEASE_FILE = "lease.json"
LEASE_TTL_S = 150.0  # a lease not renewed for this long belongs to a dead driver
LEASE_RENEW_S = 30.0


class LeaseHeld(Exception):
    """Another live `run` holds the sweep directory (a user-fixable problem: one line, exit 2)."""


def read_lease(store: Store) -> dict | None:
    """The lease record in the sweep directory, or None if there is none (or it is unreadable)."""
    if not store.exists(LEASE_FILE):
        return None
    try:
        info = json.loads(store.read_bytes(LEASE_FILE))
    except (OSError, ValueError):  # cut off or garbled: nobody can prove ownership with it
        return None
    return info if isinstance(info, dict) and "run_id" in info else None


def lease_state(info: dict | None, now: float | None = None) -> str:
    """ "live", "expired" (not renewed in time) or "dead" (its driver on this host is gone); "none"."""
    if info is None:
        return "none"
    if info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1))):
        return "dead"
    return "live" if float(info.get("expires_at", 0)) > (time.time() if now is None else now) else "expired"


def describe_lease(info: dict) -> str:
    """One phrase naming the run that holds a lease: run id, host, pid and its last renewal."""
    renewed = dt.datetime.fromtimestamp(float(info.get("renewed_at", 0)), dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"run {info.get('run_id')} (host {info.get('host')}, pid {info.get('pid')}, last renewed {renewed})"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:  # a killed process its parent has not reaped yet is dead too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class Lease:
    """Exclusive use of a sweep directory by one `run`, kept alive by a heartbeat thread.

    The record (`lease.json`: run id, host, pid, renewed_at and expires_at in Unix seconds)
    is written through `Store`, so it works on object storage as on a local disk. A lease
    that was not renewed for `ttl_s` seconds, or whose driver on this same host has exited,
    is stale and may be taken over. Object stores have no create-if-absent, so after writing
    its record a driver waits `settle_s` and reads it back: of two drivers starting at once,
    the one whose record was overwritten gives way.

    ttl_s / renew_s default to $DTSWEEP_LEASE_TTL_S / $DTSWEEP_LEASE_RENEW_S, else 150 / 30.
    """

    def __init__(self, store: Store, *, ttl_s: float | None = None, renew_s: float | None = None,
                 settle_s: float = 1.0, log=print):  # fmt: skip
        self.store = store
        self.ttl_s = float(ttl_s if ttl_s is not None else os.environ.get("DTSWEEP_LEASE_TTL_S", LEASE_TTL_S))
        self.renew_s = float(renew_s if renew_s is not None else os.environ.get("DTSWEEP_LEASE_RENEW_S", LEASE_RENEW_S))
        if not 0 < self.renew_s < self.ttl_s:
            raise ValueError(f"lease renewal every {self.renew_s}s must be shorter than its duration {self.ttl_s}s")
        self.settle_s = settle_s
        self.log = log
        self.run_id = f"{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.lost_to: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self) -> dict:
        now = time.time()
        return {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                "renewed_at": now, "expires_at": now + self.ttl_s}  # fmt: skip

    def check_free(self) -> tuple[dict | None, str]:
        """Raise LeaseHeld naming the live holder, if any; else (current record, its state).

        Reads only: `run` calls it before its slower input checks, so a second `run` is
        refused at once."""
        current = read_lease(self.store)
        state = lease_state(current)
        if state == "live":
            raise LeaseHeld(f"sweep directory {self.store.uri()} is in use by {describe_lease(current)}; "
                            "wait for that run to end (a killed driver's lease expires "
                            f"{self.ttl_s:.0f}s after its last renewal)")  # fmt: skip
        return current, state

    def acquire(self) -> None:
        """Take the lease or raise LeaseHeld naming its live holder; starts the heartbeat."""
        current, state = self.check_free()
        if state in ("expired", "dead"):
            why = "expired" if state == "expired" else "its driver has exited"
            self.log(f"taking over the lease of {describe_lease(current)}: {why}")
        self.store.write_bytes(LEASE_FILE, json.dumps(self.record()).encode())
        time.sleep(self.settle_s)
        now = read_lease(self.store)
        if now is None or now["run_id"] != self.run_id:
            raise LeaseHeld(f"sweep directory {self.store.uri()} was taken at the same moment by "
                            f"{describe_lease(now) if now else 'another run'}")  # fmt: skip
        self._thread = threading.Thread(target=self._heartbeat, name="dtsweep-lease", daemon=True)
        self._thread.start()

    def renew(self) -> bool:
        """Extend the lease; False (and nothing written) if another run has taken it over."""
        current = read_lease(self.store)
        if current is not None and current["run_id"] != self.run_id:
            if self.lost_to is None:
                self.log(f"warning: the lease of this run was taken over by {describe_lease(current)}; "
                         "this run's lease had expired (driver stalled for over "
                         f"{self.ttl_s:.0f}s); both runs now write the sweep directory")  # fmt: skip
            self.lost_to = current
            return False
        self.store.write_bytes(LEASE_FILE, json.dumps(self.record()).encode())
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                self.renew()
            except (OSError, pa.ArrowException) as e:  # a storage hiccup: the next beat retries
                self.log(f"warning: could not renew the lease: {_first_line(e)}")

    def release(self) -> None:
        """Stop the heartbeat and delete the record, if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        current = read_lease(self.store)
        if current is not None and current["run_id"] == self.run_id:
            self.store.delete(LEASE_FILE)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
