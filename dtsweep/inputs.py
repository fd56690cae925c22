"""A sweep's inputs, resolved once by the driver before any trial starts.

Each dataset a trial names is resolved (and, for dtsweep's generated datasets, generated
offline) exactly once per run; every trial is handed that file's path and sha256 and reads
exactly those bytes (`dtsweep.train.loop.open_trial_dataset`).
"""

from __future__ import annotations

import time

from dtsweep.spec import Trial


def dataset_key(t: Trial) -> tuple:
    """What identifies a trial's dataset: (name, env, data.steps, data.seed, file sha256 or None)."""
    return (t.dataset, t.env, t.data.steps, t.data.seed, t.dataset_sha256)


def prepare_datasets(trials: list[Trial], log=print) -> dict[tuple, "DatasetSource"]:  # noqa: F821
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
            raise ValueError(f"dataset file {out[key].path} changed since the spec was loaded (sha256 {out[key].sha256}, was {sha})")
    return out


def trial_provenance(trials: list[Trial], sources: dict) -> dict[str, dict]:
    """trial_id -> the provenance columns of trials.parquet, from prepare_datasets' sources."""
    from dtsweep.train.loop import provenance_columns

    return {t.trial_id: provenance_columns(t, sources[dataset_key(t)]) for t in trials}
