"""Parquet schemas and atomic readers/writers for a sweep directory (DESIGN §3).

A sweep directory may be a local path or a URI that `pyarrow.fs` understands
(`s3://bucket/sweeps/paper`, `gs://...`, `file:///abs/path`). Every write goes to a
temporary name first and is then moved into place, so a reader never sees half a file
(on object stores, where a move is a copy, the upload of one object is atomic anyway).

Checkpoints are Parquet tables with one row per tensor — name, dtype, shape, raw bytes —
never pickle, so a checkpoint received from someone else is safe to open.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

# ---- schemas: the public output contract (documented column by column in docs/outputs.md)

TRIAL_COLUMNS = [
    ("trial_id", pa.string()),
    ("study", pa.string()),
    ("init", pa.string()),
    ("env", pa.string()),
    ("dataset", pa.string()),
    ("context_len", pa.int64()),
    ("swap_block", pa.int64()),
    ("seed", pa.int64()),
]

TRIALS_SCHEMA = pa.schema(
    TRIAL_COLUMNS
    + [
        ("epochs", pa.int64()),
        ("status", pa.string()),  # pending | running | finished | failed
        ("epochs_done", pa.int64()),
        ("error", pa.string()),
        ("updated_at", pa.timestamp("s", tz="UTC")),
        ("config_json", pa.string()),
        # Provenance (DESIGN §7): what the trial read, where it was evaluated, what its init is.
        ("dataset_source", pa.string()),  # path of the HDF5 file read
        ("dataset_sha256", pa.string()),  # sha256 of that file's bytes
        ("dataset_origin", pa.string()),  # d4rl | generated | minari
        ("eval_env", pa.string()),  # Gymnasium id evaluated on, e.g. Walker2d-v4
        ("init_source", pa.string()),  # none | hf:<repo> | shipped:<name> | local path
        ("init_family", pa.string()),  # random, random-ref, gpt2, igpt, clip, chibit, igpt-mini
        ("config_key", pa.string()),  # the condition: result-determining fields without the seed
        ("versions_json", pa.string()),  # {"dtsweep": ..., "torch": ..., ...}
    ]
)

PROVENANCE_COLUMNS = (
    "dataset_source", "dataset_sha256", "dataset_origin", "eval_env",
    "init_source", "init_family", "config_key", "versions_json",
)  # fmt: skip

METRICS_SCHEMA = pa.schema(
    TRIAL_COLUMNS
    + [
        ("epoch", pa.int64()),
        ("step", pa.int64()),
        ("train_loss", pa.float64()),
        ("action_error", pa.float64()),
        ("eval_return_mean", pa.float64()),
        ("eval_return_std", pa.float64()),
        ("eval_length_mean", pa.float64()),
        ("normalized_score", pa.float64()),
        ("lr", pa.float64()),
        ("wall_time_s", pa.float64()),
    ]
)

CHECKPOINTS_SCHEMA = pa.schema(
    [
        ("trial_id", pa.string()),
        ("epoch", pa.int64()),
        ("path", pa.string()),
        ("n_params", pa.int64()),
        ("nbytes", pa.int64()),
        ("sha256", pa.string()),
    ]
)

TENSOR_SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("dtype", pa.string()),
        ("shape", pa.list_(pa.int64())),
        ("data", pa.large_binary()),
    ]
)


# ---- filesystem access


def resolve(uri_or_path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a pyarrow-supported URI."""
    s = str(uri_or_path)
    if "://" in s:
        return pafs.FileSystem.from_uri(s)
    return pafs.LocalFileSystem(), str(Path(s).expanduser().resolve())


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

    def check_writable(self) -> None:
        """Raise OSError with the location if the sweep directory cannot be written."""
        probe = f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        try:
            self.makedirs()
            with self.fs.open_output_stream(self.path(probe)) as f:
                f.write(b"ok")
            self.fs.delete_file(self.path(probe))
        except (OSError, pa.ArrowException) as e:
            raise OSError(f"storage {self.root!r} is not writable: {e}") from None


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
    return [{k: (None if pd.isna(v) else (v.item() if isinstance(v, np.generic) else v)) for k, v in r.items()} for r in df.to_dict("records")]
