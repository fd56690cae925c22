"""Every Parquet schema of a sweep directory: the public output contract (DESIGN §3).

Documented column by column in docs/outputs.md. Writers build tables with exactly these
schemas (`dtsweep.store.table_from_rows`), so a column added here is added everywhere.
"""

from __future__ import annotations

import pyarrow as pa

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

# search.parquet: one row per sample of a search study (dtsweep.search). One column per searched
# path (train.lr, ...) follows these; search_schema() adds them.
SEARCH_SCHEMA = pa.schema(
    TRIAL_COLUMNS
    + [
        ("group", pa.string()),
        ("sample", pa.int64()),
        ("status", pa.string()),  # running | finished | stopped | failed
        ("objective", pa.float64()),
        ("objective_epoch", pa.int64()),
        ("metric", pa.string()),
        ("at", pa.string()),
        ("direction", pa.string()),
        ("epochs_done", pa.int64()),
        ("reused", pa.bool_()),
        ("error", pa.string()),
        ("updated_at", pa.timestamp("s", tz="UTC")),
        ("params_json", pa.string()),
    ]
)
_PARAM_TYPES = {float: pa.float64(), int: pa.int64(), bool: pa.bool_(), str: pa.string()}


def search_schema(param_types: dict[str, type]) -> pa.Schema:
    """SEARCH_SCHEMA plus one column per searched path ({"train.lr": float, ...}), sorted by path."""
    return pa.schema(list(SEARCH_SCHEMA) + [pa.field(p, _PARAM_TYPES[param_types[p]]) for p in sorted(param_types)])
