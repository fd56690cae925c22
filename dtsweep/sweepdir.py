"""The sweep directory: ledger, compaction, self-repair, resume discovery and status.

Everything that reads or writes the files of a sweep directory (DESIGN §3) for the run stage
lives here, below both the grid runner (`dtsweep.orchestrate`) and the search runner
(`dtsweep.search`). The source of truth is the directory itself, not Tune's experiment state:
- a trial is *finished* when `metrics/<trial_id>.parquet` holds its final epoch;
- `trials.parquet` (the ledger) records each trial's status and last error;
- the latest resume state of a trial is its newest file under `_tune/resume/<trial_id>/`.

Costs stay flat in the number of trials (issue 16): a state change writes one small record
(`_ledger/<trial_id>.json`) that is merged into `trials.parquet` at intervals and at the end of
a run; compacted files carry a manifest (size and mtime of every per-trial file they were
built from), so start-up, repair and `status` read only the per-trial files that changed since
the last compaction and otherwise take one listing per directory.
So `run` can be repeated at will: finished trials are skipped, interrupted ones resume
from their last epoch (also after the driver itself was killed), new seeds only add trials.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dtsweep.schemas import CHECKPOINTS_SCHEMA, METRICS_SCHEMA, PROVENANCE_COLUMNS, TRIALS_SCHEMA
from dtsweep.spec import SweepSpec, Trial, resolved_yaml
from dtsweep.store import Store, lease_state, read_checkpoint_metadata, read_lease, resolve, sha256_file, table_from_rows

TUNE_DIR = "_tune"
RESUME_FILE = "resume.pt"
# Resume states of unfinished trials (`save_resume_state`), beside Tune's run directories.
RESUME_DIR = f"{TUNE_DIR}/resume"
# Per-trial state records written on each state change, merged into trials.parquet at intervals.
LEDGER_DIR = "_ledger"
# Seconds between merges of the state records into trials.parquet during a run (a reader of
# trials.parquet sees a change at most this late; `status` merges the records itself).
LEDGER_INTERVAL_S = float(os.environ.get("DTSWEEP_LEDGER_INTERVAL_S", "30"))
# Footer key of metrics.parquet / checkpoints.parquet: {per-trial file: [size, mtime_ns]} it was built from.
MANIFEST_KEY = b"dtsweep_sources"
# Bytes this process wrote to ledger files (trials.parquet and the state records), by file
# kind; benchmarks/scale.py reads it. Counted where the ledger calls Store.write_bytes.
LEDGER_BYTES_WRITTEN: Counter = Counter()


def trial_name(t: Trial) -> str:
    """A trial's readable name: its Tune trial name and directory (`_tune/<run>/<name>`), and so
    its run name in TensorBoard, MLflow and W&B. "<init>-<dataset>-K<K>[-swap<b>]-s<seed>-<id8>",
    e.g. `gpt2-hopper-medium-K20-s3-1a2b3c4d`; the first 8 characters of the trial_id keep trials
    that differ only in other settings apart (Tune adds `_<4 hex>` if two still collide)."""
    dataset = t.dataset.replace("\\", "/").rstrip("/").split("/")[-1]
    if t.dataset_sha256 is not None:  # a file: its name without .hdf5
        dataset = dataset.rsplit(".", 1)[0] or dataset
    init = t.init.replace("\\", "/").rstrip("/").split("/")[-1]  # a local model directory: its name
    swap = f"-swap{t.swap_block}" if t.swap_block is not None else ""
    return f"{_slug(init)}-{_slug(dataset)}-K{t.context_len}{swap}-s{t.seed}-{t.trial_id[:8]}"


def _slug(s: str) -> str:
    """`s` as a short, file-name-safe part of a trial name."""
    return re.sub(r"[^A-Za-z0-9._]+", "-", s).strip("-.")[:40] or "x"


def _trial_dirs(store: Store, run: str, trial_id: str) -> list[str]:
    """The directories under `_tune/<run>/` that may be `trial_id`'s: named by the trial_id itself
    (sweeps run before trials had readable names) or by `trial_name` (ending in its first 8
    characters, maybe with Tune's `_<4 hex>` added)."""
    pattern = re.compile(rf"(.*-)?({re.escape(trial_id)}|{re.escape(trial_id[:8])})(_[0-9a-f]{{4}})?")
    return [d for d in store.list_dirs(f"{TUNE_DIR}/{run}") if pattern.fullmatch(d)]


@dataclass
class RunSummary:
    """Trial counts of one `run` (a search sample counts as a trial)."""

    sweep_dir: str
    total: int
    skipped: int  # already finished before this run
    ran: int
    finished: int
    failed: int

    def __add__(self, other: RunSummary) -> RunSummary:
        fields = ("total", "skipped", "ran", "finished", "failed")
        return RunSummary(self.sweep_dir, *(getattr(self, f) + getattr(other, f) for f in fields))


def write_sweep_yaml(store: Store, spec: SweepSpec) -> None:
    """Record the resolved spec as sweep.yaml (rewritten only when it changed)."""
    text = resolved_yaml(spec)
    if not store.exists("sweep.yaml") or store.read_bytes("sweep.yaml").decode(errors="replace") != text:
        store.write_bytes("sweep.yaml", text.encode())


# --------------------------------------------------------------------------------------
# Ledger: what is finished, what failed, where to resume
# --------------------------------------------------------------------------------------


def epochs_done(store: Store, trial_id: str) -> int:
    """Highest epoch with a metrics row (-1 if none)."""
    rel = f"metrics/{trial_id}.parquet"
    if not store.exists(rel):
        return -1
    epochs = store.read_table(rel, columns=["epoch"]).column("epoch").to_pylist()
    return max(epochs, default=-1)


# ---- listings and manifests: one listing per directory instead of one read per trial


def list_files(store: Store, rel_dir: str, suffix: str = "", recursive: bool = False) -> dict[str, tuple[int, int]]:
    """{relative path: (size in bytes, mtime in ns)} of the files under `rel_dir` ending in
    `suffix` (temporary files of unfinished writes excluded): one listing, no reads."""
    sel = pafs.FileSelector(store.path(rel_dir), allow_not_found=True, recursive=recursive)
    out = {}
    for info in store.fs.get_file_info(sel):
        if info.type != pafs.FileType.File or not info.base_name.endswith(suffix) or info.base_name.startswith(".tmp-"):
            continue
        rel = info.path[len(store.base) + 1 :] if info.path.startswith(store.base + "/") else f"{rel_dir}/{info.base_name}"
        out[rel] = (int(info.size), int(info.mtime_ns or 0))
    return out


def read_manifest(store: Store, rel: str) -> dict[str, tuple[int, int]] | None:
    """The manifest stored in the footer of compacted file `rel`, or None (missing, unreadable,
    or written by a version without manifests)."""
    try:
        meta = pq.read_schema(store.path(rel), filesystem=store.fs).metadata or {}
        raw = json.loads(meta[MANIFEST_KEY])
    except (OSError, pa.ArrowException, KeyError, ValueError):
        return None
    return {k: (int(v[0]), int(v[1])) for k, v in raw.items()}


def with_manifest(table: pa.Table, sources: dict[str, tuple[int, int]]) -> pa.Table:
    """`table` with the manifest of the per-trial files it was built from in its footer."""
    meta = dict(table.schema.metadata or {})
    meta[MANIFEST_KEY] = json.dumps({k: list(v) for k, v in sorted(sources.items())}).encode()
    return table.replace_schema_metadata(meta)


def _tid_of_metrics(rel: str) -> str:
    return rel.rsplit("/", 1)[1].removesuffix(".parquet")


def _compacted_metrics(store: Store) -> tuple[dict, pa.Table | None]:
    """(manifest, table) of metrics.parquet; ({}, None) when it cannot be trusted."""
    manifest = read_manifest(store, "metrics.parquet")
    if manifest is None:
        return {}, None
    try:
        return manifest, store.read_table("metrics.parquet")
    except (OSError, pa.ArrowException):
        return {}, None


def all_epochs_done(store: Store) -> dict[str, int | None]:
    """trial_id -> highest epoch with a metrics row, for every metrics file (None: unreadable).

    A file unchanged since the last compaction (same size and mtime as metrics.parquet's
    manifest records) is taken from metrics.parquet; only the others are read, so a start of a
    finished sweep costs one listing and one read however many trials it has.
    """
    listing = list_files(store, "metrics", ".parquet")
    manifest, compacted = _compacted_metrics(store)
    known: dict[str, int] = {}
    if compacted is not None and compacted.num_rows:
        g = compacted.select(["trial_id", "epoch"]).group_by("trial_id").aggregate([("epoch", "max")])
        known = dict(zip(g.column("trial_id").to_pylist(), g.column("epoch_max").to_pylist()))
    out: dict[str, int | None] = {}
    for rel, key in listing.items():
        tid = _tid_of_metrics(rel)
        out[tid] = known[tid] if manifest.get(rel) == key and tid in known else safe_epochs_done(store, tid)
    return out


def read_ledger(store: Store) -> pd.DataFrame:
    """trials.parquet with the pending state records merged (what `status` and readers see)."""
    rows = readable_rows(store, "trials.parquet")
    if rows is None:
        return TRIALS_SCHEMA.empty_table().to_pandas()
    merged = {r["trial_id"]: r for r in rows}
    merged.update(pending_records(store))
    return table_from_rows(sorted(merged.values(), key=lambda r: r["trial_id"]), TRIALS_SCHEMA).to_pandas()


def trial_row(t: Trial, status: str, done: int, error: str | None = None) -> dict:
    return {
        **t.columns(),
        "epochs": t.epochs,
        "status": status,
        "epochs_done": max(done, 0),
        "error": error,
        "updated_at": dt.datetime.now(dt.timezone.utc),
        "config_json": json.dumps(t.to_dict(), sort_keys=True),
    }


def _record_bytes(row: dict) -> bytes:
    d = {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in row.items()}
    return json.dumps(d, sort_keys=True).encode()


def pending_records(store: Store) -> dict[str, dict]:
    """trial_id -> ledger row of the state records not yet merged into trials.parquet.

    A record is always at least as new as the trial's row in trials.parquet (it is deleted
    only after a merge that included it), so it wins. Records deleted between the listing and
    the read were merged: trials.parquet, read after this, has them.
    """
    out = {}
    for rel in list_files(store, LEDGER_DIR, ".json"):
        try:
            row = json.loads(store.read_bytes(rel))
        except (OSError, ValueError):  # merged and deleted meanwhile, or cut off by a killed driver
            continue
        if isinstance(row, dict) and "trial_id" in row:
            if row.get("updated_at"):
                row["updated_at"] = dt.datetime.fromisoformat(row["updated_at"])
            out[row["trial_id"]] = row
    return out


def _write_ledger_bytes(store: Store, rel: str, data: bytes, kind: str) -> None:
    store.write_bytes(rel, data)
    LEDGER_BYTES_WRITTEN[kind] += len(data)


class Ledger:
    """The trial ledger: rows in memory, a small state record per change, trials.parquet at intervals.

    `set` writes `_ledger/<trial_id>.json` (one small object, whatever the number of trials);
    `write` merges every row into trials.parquet and deletes the records it merged. A
    background thread merges at most every `interval_s` seconds (and never spends more than
    about 5% of the time merging), so trials.parquet is at most an interval behind during a
    run and complete after it (`close`). A driver killed between merges leaves records behind:
    the next run and `status` merge them.
    """

    def __init__(self, store: Store, trials: list[Trial], interval_s: float | None = None):
        self.store = store
        self.trials = {t.trial_id: t for t in trials}
        self.interval_s = LEDGER_INTERVAL_S if interval_s is None else float(interval_s)
        self._lock = threading.RLock()
        old = readable_rows(store, "trials.parquet")
        if old is None:  # lost or set aside by `repair`: recover what the outputs tell
            old = recovered_rows(store, set(self.trials))
        # Trials of earlier runs of this sweep that the current spec no longer lists stay.
        self.rows: dict[str, dict] = {r["trial_id"]: r for r in old}
        leftover = pending_records(store)  # of a driver killed between merges
        self.rows.update(leftover)
        self._records: set[str] = set(leftover)  # trial ids whose state record is not yet merged
        # trial_id -> provenance columns of trials this run resolved (set_provenance); rows of
        # earlier runs keep the provenance they were written with.
        self.provenance: dict[str, dict] = {
            tid: {k: r.get(k) for k in PROVENANCE_COLUMNS} for tid, r in self.rows.items() if r.get("dataset_sha256")
        }
        done_all = all_epochs_done(store)
        for tid, t in self.trials.items():
            prev = self.rows.get(tid)
            done = done_all.get(tid, -1)
            done = -1 if done is None else done  # unreadable: `repair` ran first, so only a race
            if done >= t.epochs:
                status, err = "finished", None
            elif prev is not None and prev["status"] in ("failed", "stopped"):
                # "stopped": ended early by a search's scheduler (ASHA); not to be rerun.
                status, err = prev["status"], prev["error"]
            else:
                status, err = "pending", None
            self.rows[tid] = trial_row(t, status, done, err)
        self._last_merge = time.monotonic()
        self._merge_cost_s = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks (and this ledger with them) into tuner.pkl; the lock and
        # the merge thread belong to this process only.
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_stop", "_thread")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.RLock(), _stop=threading.Event(), _thread=None)

    def status(self, tid: str) -> str:
        return self.rows[tid]["status"]

    def set(self, tid: str, status: str, error: str | None = None) -> None:
        """Record a state change: one metrics-file read and one small record written.
        A trial recorded finished (all its epochs on storage) loses its resume state."""
        row = trial_row(self.trials[tid], status, epochs_done(self.store, tid), error)
        if status == "finished" and row["epochs_done"] >= row["epochs"]:
            prune_resume_states(self.store, {tid}, folder=f"{RESUME_DIR}/{tid}")
        with self._lock:
            self.rows[tid] = row
            _write_ledger_bytes(self.store, f"{LEDGER_DIR}/{tid}.json", _record_bytes(self._full(row)), "records")
            self._records.add(tid)
        self._start_merger()

    def set_provenance(self, provenance: dict[str, dict]) -> None:
        """Record trial_id -> provenance columns (dtsweep.inputs.trial_provenance) for the next writes."""
        self.provenance.update(provenance)

    def _full(self, row: dict) -> dict:
        return {**row, **self.provenance.get(row["trial_id"], {})}

    def write(self) -> None:
        """Merge: rewrite trials.parquet from every row, then delete the merged state records."""
        with self._lock:
            t0 = time.monotonic()
            current = list(self.rows.values())  # one C-level copy: callers also assign rows directly
            rows = sorted((self._full(r) for r in current), key=lambda r: r["trial_id"])
            sink = pa.BufferOutputStream()
            pq.write_table(table_from_rows(rows, TRIALS_SCHEMA), sink, compression="zstd")
            _write_ledger_bytes(self.store, "trials.parquet", sink.getvalue().to_pybytes(), "trials.parquet")
            for tid in sorted(self._records):
                self.store.delete(f"{LEDGER_DIR}/{tid}.json")
            self._records.clear()
            self._last_merge = time.monotonic()
            self._merge_cost_s = self._last_merge - t0

    def merge_if_due(self) -> bool:
        """Merge if records are pending and the interval has passed; True if it merged.

        The interval grows to 20x the last merge's duration, so merging a very large ledger
        never takes more than ~5% of the driver's time."""
        with self._lock:
            due = max(self.interval_s, 20 * self._merge_cost_s)
            if self._records and time.monotonic() - self._last_merge >= due:
                self.write()
                return True
        return False

    def _start_merger(self) -> None:
        if self._thread is None and self.interval_s > 0:
            self._thread = threading.Thread(target=self._merger, name="dtsweep-ledger", daemon=True)
            self._thread.start()

    def _merger(self) -> None:
        while not self._stop.wait(min(self.interval_s, 5.0)):
            try:
                self.merge_if_due()
            except (OSError, pa.ArrowException) as e:  # a storage hiccup: the next tick retries
                print(f"warning: could not merge the trial ledger: {e}", flush=True)

    def close(self) -> None:
        """Stop the background merges and merge what is pending (trials.parquet complete)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            if self._records:
                self.write()


# ---- resume states: `_tune/resume/<trial_id>/epoch=<n>.pt`


def resume_state_rel(trial_id: str, epoch: int) -> str:
    return f"{RESUME_DIR}/{trial_id}/epoch={epoch}.pt"


def save_resume_state(store: Store, state: dict) -> str:
    """Write a trial's resume state (`TrialRunner.resume_state()`: "trial_id", "epoch", tensors)
    as `_tune/resume/<trial_id>/epoch=<n>.pt`, then delete its older ones; returns the new one.

    Written to a temporary name and moved into place, so a listing never shows a partial file
    (a worker killed mid-upload leaves only a `.tmp-` file, which listings skip). dtsweep
    writes these itself instead of handing Tune checkpoints: with one kept checkpoint per
    trial, Tune rewrites its whole experiment state (every trial's config) after each one,
    a cost that grows with the number of trials (issue 16).
    """
    import torch

    tid, epoch = state["trial_id"], int(state["epoch"])
    rel = resume_state_rel(tid, epoch)
    folder = f"{RESUME_DIR}/{tid}"
    store.makedirs(folder)
    tmp = f"{folder}/.tmp-{os.urandom(6).hex()}-epoch={epoch}.pt"
    with tempfile.TemporaryDirectory() as d:
        local = os.path.join(d, RESUME_FILE)
        torch.save(state, local)  # a local file first: a GPT-2 state (~1.5 GB) is not held twice in memory
        pafs.copy_files(local, store.path(tmp), source_filesystem=pafs.LocalFileSystem(), destination_filesystem=store.fs)
    store.move(tmp, rel)
    for older in list_files(store, folder, ".pt"):
        if older != rel:
            store.delete(older)
    return store.uri(rel)


def latest_resume_state(store: Store, trial_id: str) -> tuple[int, str] | None:
    """(epoch, location) of one trial's newest resume state, or None: one listing of its folder."""
    found = latest_resume_checkpoints(store, {trial_id}, folder=f"{RESUME_DIR}/{trial_id}")
    return found.get(trial_id)


def load_resume_state(location: str) -> dict:
    """A resume state written by `save_resume_state` (local path or URI), tensors on the CPU."""
    import io

    import torch

    fs, path = resolve(location)
    with fs.open_input_stream(path) as f:
        return torch.load(io.BytesIO(f.read()), weights_only=True, map_location="cpu")


def latest_resume_checkpoints(store: Store, trial_ids: set[str] | None = None, *,
                              folder: str = RESUME_DIR) -> dict[str, tuple[int, str]]:  # fmt: skip
    """trial_id -> (epoch, location) of the newest resume state of each trial (of `trial_ids`;
    None: all), from one listing of `_tune/resume/` (no reads). Finished trials have none left
    (`prune_resume_states`)."""
    best: dict[str, tuple[int, str]] = {}
    for rel in list_files(store, folder, ".pt", recursive=True):
        parts = rel.split("/")
        m = re.fullmatch(r"epoch=(\d+)\.pt", parts[-1])
        if m is None or len(parts) != 4 or (trial_ids is not None and parts[2] not in trial_ids):
            continue
        if int(m[1]) > best.get(parts[2], (-1, ""))[0]:
            best[parts[2]] = (int(m[1]), store.uri(rel))
    return best


def prune_resume_states(store: Store, finished: set[str], *, folder: str = RESUME_DIR) -> int:
    """Delete the resume states of `finished` trials found under `folder`; returns the bytes
    freed. A finished trial's outputs hold everything; its weights + AdamW moments would only
    take space (issue 16). Unfinished trials keep theirs and resume from them. One listing."""
    freed, dirs = 0, set()
    for rel, (size, _) in list_files(store, folder, recursive=True).items():
        parts = rel.split("/")
        if len(parts) == 4 and parts[2] in finished:
            dirs.add("/".join(parts[:3]))
            freed += size
    for rel in sorted(dirs):
        store.fs.delete_dir(store.path(rel))
    return freed


# --------------------------------------------------------------------------------------
# Compaction: metrics.parquet and checkpoints.parquet
# --------------------------------------------------------------------------------------


def checkpoint_listing(store: Store) -> tuple[dict[str, tuple[int, int]], dict[str, list[str]]]:
    """(index files {rel: (size, mtime_ns)}, trial_id -> its `epoch=<n>.parquet` files) under
    checkpoints/: one recursive listing."""
    index, files = {}, {}
    for rel, key in list_files(store, "checkpoints", ".parquet", recursive=True).items():
        parts = rel.split("/")
        if len(parts) != 3:
            continue
        if parts[2] == "index.parquet":
            index[rel] = key
        elif re.fullmatch(r"epoch=\d+\.parquet", parts[2]):
            files.setdefault(parts[1], []).append(rel)
    return index, files


def _kept_rows(store: Store, name: str, sources: dict[str, tuple[int, int]], tid_of) -> tuple[pa.Table | None, set[str]]:
    """(rows of compacted file `name` whose per-trial file is unchanged since it was built,
    trial ids of those files); (None, set()) when it has no usable manifest."""
    manifest = read_manifest(store, name)
    if not manifest:
        return None, set()
    same = {tid_of(rel) for rel, key in sources.items() if manifest.get(rel) == key}
    if not same:
        return None, set()
    try:
        old = store.read_table(name).replace_schema_metadata(None)
    except (OSError, pa.ArrowException):
        return None, set()
    return old.filter(pc.is_in(old.column("trial_id"), value_set=pa.array(sorted(same), pa.string()))), same


def compact(store: Store) -> None:
    """Concatenate per-trial metrics and checkpoint indexes into the two top-level files.

    Incremental: rows of per-trial files unchanged since the last compaction (the manifest in
    the compacted file's footer: size and mtime of each source) are kept without reading those
    files, so compaction reads only what changed and writes each top-level file once.
    Checkpoint paths are written relative to the sweep directory (older absolute ones that
    point into it are made relative), so a copied or moved sweep directory reads its own files.
    """
    sources = list_files(store, "metrics", ".parquet")  # listed before any read: a later change shows as changed
    kept, same = _kept_rows(store, "metrics.parquet", sources, _tid_of_metrics)
    tables = [] if kept is None else [kept]
    tables += [store.read_table(p).replace_schema_metadata(None) for p in sources if _tid_of_metrics(p) not in same]
    metrics = pa.concat_tables(tables) if tables else METRICS_SCHEMA.empty_table()
    metrics = metrics.sort_by([("trial_id", "ascending"), ("epoch", "ascending")])
    store.write_table("metrics.parquet", with_manifest(metrics, sources))

    index, _ = checkpoint_listing(store)
    kept, same = _kept_rows(store, "checkpoints.parquet", index, lambda rel: rel.split("/")[1])
    rows = [r for rel in index if rel.split("/")[1] not in same for r in readable_rows(store, rel) or []]
    for r in rows:
        r["path"] = store.relative(r["path"]) or r["path"]
    tables = [table_from_rows(rows, CHECKPOINTS_SCHEMA)] + ([] if kept is None else [kept.cast(CHECKPOINTS_SCHEMA)])
    ck = pa.concat_tables(tables).sort_by([("trial_id", "ascending"), ("epoch", "ascending")])
    store.write_table("checkpoints.parquet", with_manifest(ck, index))


# --------------------------------------------------------------------------------------
# Self-repair: damaged or missing files are set aside and rebuilt from what survives
# --------------------------------------------------------------------------------------


def readable_rows(store: Store, rel: str) -> list[dict] | None:
    """Rows of the Parquet file `rel`, or None if it is missing or cannot be read (cut off, garbled)."""
    if not store.exists(rel):
        return None
    try:
        return store.read_table(rel).to_pylist()
    except (OSError, pa.ArrowException):
        return None


def safe_epochs_done(store: Store, trial_id: str) -> int | None:
    """`epochs_done`, or None when the trial's metrics file exists but cannot be read."""
    try:
        return epochs_done(store, trial_id)
    except (OSError, pa.ArrowException):
        return None


def _parquet_rows(store: Store, rel: str) -> int | None:
    """Row count from a Parquet file's footer; None if missing or unreadable."""
    try:
        return pq.read_metadata(store.path(rel), filesystem=store.fs).num_rows
    except (OSError, pa.ArrowException):
        return None


def stale_compacted(store: Store) -> dict[str, str]:
    """{"metrics.parquet"|"checkpoints.parquet": why it must be rebuilt} for each compacted file
    that is missing, unreadable, or out of date with the per-trial files.

    Out of date: it holds another number of rows than the per-trial files. Only the per-trial
    files that its manifest does not show unchanged are read (their footers); with an
    up-to-date manifest this is one listing per directory. A file without a manifest (older
    versions) has every footer read. A copied sweep directory (new mtimes) reads them all too.
    """
    out = {}
    index, _ = checkpoint_listing(store)
    sources = {"metrics.parquet": (list_files(store, "metrics", ".parquet"), _tid_of_metrics),
               "checkpoints.parquet": (index, lambda rel: rel.split("/")[1])}  # fmt: skip
    for name, (parts, tid_of) in sources.items():
        if not store.exists(name):
            out[name] = "missing"
            continue
        have = _parquet_rows(store, name)
        if have is None:
            out[name] = "unreadable"
            continue
        manifest = read_manifest(store, name) or {}
        changed = [rel for rel in sorted(set(manifest) | set(parts)) if manifest.get(rel) != parts.get(rel)]
        if not changed:
            continue
        if manifest:  # rows the compacted file holds for the changed trials
            tids = store.read_table(name, columns=["trial_id"]).column("trial_id").value_counts().to_pylist()
            per_trial = {d["values"]: d["counts"] for d in tids}
            had = sum(per_trial.get(tid_of(rel), 0) for rel in changed)
        else:
            had = have
        want = have - had + sum(_parquet_rows(store, rel) or 0 for rel in changed if rel in parts)
        if have != want:
            out[name] = f"stale ({have} rows, the per-trial files hold {want})"
    return out


def rebuild_checkpoint_index(store: Store, trial_id: str) -> int:
    """Rewrite `checkpoints/<trial_id>/index.parquet` from the checkpoint files themselves
    (epoch from the file name, n_params from the footer, size and sha256 of the bytes); returns its rows."""
    rows = []
    for rel in store.list(f"checkpoints/{trial_id}", ".parquet"):
        m = re.fullmatch(r"epoch=(\d+)\.parquet", rel.rsplit("/", 1)[1])
        if m is None:
            continue
        try:
            meta = read_checkpoint_metadata(store.uri(rel))
        except (OSError, pa.ArrowException, ValueError):  # a cut-off checkpoint: left out, retrained if needed
            continue
        rows.append({"trial_id": trial_id, "epoch": int(m[1]), "path": rel, "n_params": meta.get("n_params"),
                     "nbytes": store.file_size(rel), "sha256": sha256_file(store.uri(rel))})  # fmt: skip
    store.write_table(f"checkpoints/{trial_id}/index.parquet", table_from_rows(rows, CHECKPOINTS_SCHEMA))
    return len(rows)


def repair(store: Store, log=print) -> None:
    """Before a run reads anything: set aside every unreadable per-trial file and the ledger
    (renamed `<name>.corrupt-<time>`, one line each) and rebuild the checkpoint indexes.

    A trial whose metrics file was set aside gets its rows back from metrics.parquet when that
    holds them (a finished trial: nothing to retrain), else resumes from its newest resume
    checkpoint (whose state carries every metrics row so far) or reruns.
    Per-trial files that the compacted files' manifests show unchanged since they were read
    whole by a compaction are not read again: a repair of a healthy sweep costs two listings.
    """
    manifest = read_manifest(store, "metrics.parquet") or {}
    for rel, key in list_files(store, "metrics", ".parquet").items():
        if manifest.get(rel) == key or readable_rows(store, rel) is not None:
            continue
        aside = store.set_aside(rel)
        restored = _restore_metrics(store, _tid_of_metrics(rel))
        log(f"{rel} is unreadable (cut off or damaged): set aside as {aside}; "
            + (f"restored from metrics.parquet ({restored} rows)" if restored
               else "its trial resumes from its last checkpoint or reruns"))  # fmt: skip
    index, files = checkpoint_listing(store)
    ck_manifest = read_manifest(store, "checkpoints.parquet") or {}
    for tid in sorted(set(files) | {rel.split("/")[1] for rel in index}):
        rel = f"checkpoints/{tid}/index.parquet"
        damaged = rel in index and ck_manifest.get(rel) != index[rel] and readable_rows(store, rel) is None
        if damaged:
            log(f"{rel} is unreadable: set aside as {store.set_aside(rel)}")
        if damaged or (rel not in index and files.get(tid)):
            log(f"{rel}: rebuilt from its {rebuild_checkpoint_index(store, tid)} checkpoint files")
    if store.exists("trials.parquet") and readable_rows(store, "trials.parquet") is None:
        log(f"trials.parquet is unreadable: set aside as {store.set_aside('trials.parquet')}; "
            "rebuilt from the spec and the per-trial files")  # fmt: skip


def _restore_metrics(store: Store, trial_id: str) -> int:
    """Rewrite `metrics/<trial_id>.parquet` from the trial's rows in a readable metrics.parquet;
    returns the rows written (0: none there, nothing written)."""
    try:
        m = store.read_table("metrics.parquet").replace_schema_metadata(None)
    except (OSError, pa.ArrowException):
        return 0
    rows = m.filter(pc.equal(m.column("trial_id"), trial_id))
    if rows.num_rows:
        store.write_table(f"metrics/{trial_id}.parquet", rows.cast(METRICS_SCHEMA))
    return rows.num_rows


def recovered_rows(store: Store, known: set[str]) -> list[dict]:
    """Ledger rows for trials with outputs but no ledger row and not in the current spec
    (the ledger was lost, and the spec since changed): rebuilt from their checkpoints' metadata."""
    rows = []
    for rel in store.list("metrics", ".parquet"):
        tid = rel.rsplit("/", 1)[1].removesuffix(".parquet")
        if tid in known:
            continue
        for ck in store.list(f"checkpoints/{tid}", ".parquet"):
            try:
                t = Trial.from_dict(read_checkpoint_metadata(store.uri(ck))["trial"])
            except (OSError, pa.ArrowException, ValueError, KeyError, TypeError):
                continue
            done = safe_epochs_done(store, tid)
            rows.append(trial_row(t, "finished" if (done or -1) >= t.epochs else "pending", done or -1))
            break
    return rows


# --------------------------------------------------------------------------------------
# Status: what `dtsweep status` shows
# --------------------------------------------------------------------------------------


def error_file(store: Store, trial_id: str) -> str | None:
    """Location of the newest Tune error file (full traceback) of a trial under `_tune/`, if any."""
    for run in reversed(store.list_dirs(TUNE_DIR)):  # run names sort by start time
        for trial_dir in _trial_dirs(store, run, trial_id):
            rel = f"{TUNE_DIR}/{run}/{trial_dir}"
            if store.exists(f"{rel}/error.txt") and _tune_trial_id(store, rel) in (trial_id, None):
                return store.uri(f"{rel}/error.txt")
    return None


def _tune_trial_id(store: Store, rel: str) -> str | None:
    """The trial_id in Tune's params.json of a trial directory (None if Tune wrote none): tells
    apart the rare two trials whose readable names end in the same 8 characters."""
    if not store.exists(f"{rel}/params.json"):
        return None
    try:
        return json.loads(store.read_bytes(f"{rel}/params.json"))["job"]["trial_id"]
    except (ValueError, KeyError, TypeError):  # cut off mid-write, or not a dtsweep trial's
        return None


def mixed_dataset_warnings(ledger: pd.DataFrame) -> list[str]:
    """One line per condition (config_key) whose trials read different dataset bytes.

    Seeds of one condition are pooled by the report; if they trained on different files
    (a dataset regenerated differently on another machine, a file replaced between runs)
    the pool mixes conditions. Trials without provenance (older sweeps) are not compared.
    """
    if "config_key" not in ledger or "dataset_sha256" not in ledger:
        return []
    known = ledger.dropna(subset=["config_key", "dataset_sha256"])
    out = []
    for key, g in known.groupby("config_key", sort=True):
        shas = sorted(g["dataset_sha256"].unique())
        if len(shas) > 1:
            out.append(
                f"warning: condition {key} ({g['init'].iloc[0]} {g['dataset'].iloc[0]} K={g['context_len'].iloc[0]}): "
                f"its {len(g)} trials read {len(shas)} different dataset files "
                f"(sha256 {', '.join(s[:12] for s in shas)}); their seeds should not be pooled"
            )
    return out


def sweep_status(sweep_dir: str) -> dict:
    """Counts by status and failures with their reasons, read from the sweep directory.

    Never raises on damage: unreadable files are named in "problems" (a rerun repairs them)
    and what can be read is reported. "run" says whether a `run` is active: "running" (its
    lease is live, with "lease" naming it), "interrupted" (no live lease but trials were left
    running: rerun to resume; those trials show as "interrupted") or "idle".
    """
    store = Store(sweep_dir)
    problems: list[str] = []
    rows = readable_rows(store, "trials.parquet")
    if rows is None:
        rows = _ledger_from_sweep_yaml(store)
        if rows is None:
            if store.exists("trials.parquet"):
                raise FileNotFoundError(
                    f"{sweep_dir}: trials.parquet is unreadable and there is no readable sweep.yaml to rebuild it from"
                )
            raise FileNotFoundError(f"{sweep_dir}: no trials.parquet (not a dtsweep sweep directory, or never run)")
        problems.append(("trials.parquet is unreadable" if store.exists("trials.parquet") else "trials.parquet is missing")
                        + ": statuses below are rebuilt from sweep.yaml and metrics/; `run` repairs it")  # fmt: skip
    # State changes not yet merged into trials.parquet (a live run's, or a killed driver's).
    merged = {r["trial_id"]: r for r in rows}
    merged.update(pending_records(store))
    rows = sorted(merged.values(), key=lambda r: r["trial_id"])
    df = pd.DataFrame(rows) if rows else TRIALS_SCHEMA.empty_table().to_pandas()
    for col in TRIALS_SCHEMA.names:
        if col not in df:
            df[col] = None
    # A driver killed mid-run leaves "running"/"pending": the metrics files say how far each got.
    on_disk = all_epochs_done(store)  # one listing; reads only files changed since the last compaction
    done = {}
    for tid in df["trial_id"]:
        done[tid] = on_disk.get(tid, -1)
        if done[tid] is None:
            problems.append(f"metrics/{tid}.parquet is unreadable; `run` sets it aside and the trial resumes")
            done[tid] = -1
    lease = read_lease(store)
    live = lease_state(lease) == "live"
    if not live:  # while a run is active the compacted files lag behind by design
        problems += [f"{name} is {why}; `run` rebuilds it" for name, why in stale_compacted(store).items()]
    status = [
        "finished" if done[r.trial_id] >= r.epochs else ("interrupted" if r.status == "running" and not live else r.status)
        for r in df.itertuples()
    ]
    df = df.assign(status=status, epochs_done=[max(done[t], 0) for t in df["trial_id"]])
    run = "running" if live else ("interrupted" if "interrupted" in status else "idle")
    counts = df["status"].value_counts().to_dict()
    failures = df[df["status"] == "failed"][["trial_id", "init", "dataset", "context_len", "swap_block", "seed", "error"]]
    failures = failures.assign(error_file=[error_file(store, tid) for tid in failures["trial_id"]])
    return {
        "sweep_dir": store.uri(),
        "warnings": mixed_dataset_warnings(df),
        "total": int(len(df)),
        "counts": {k: int(v) for k, v in counts.items()},
        "run": run,
        "lease": lease if live else None,
        "problems": problems,
        "failures": failures.to_dict("records"),
        "trials": df[
            ["trial_id", "study", "init", "dataset", "context_len", "swap_block", "seed", "status", "epochs_done", "epochs"]
        ],
    }


def _ledger_from_sweep_yaml(store: Store) -> list[dict] | None:
    """Ledger rows of the spec stored as sweep.yaml (statuses unknown: pending), or None."""
    from dtsweep.spec import SpecError, parse_spec

    if not store.exists("sweep.yaml"):
        return None
    try:
        import yaml

        spec = parse_spec(yaml.safe_load(store.read_bytes("sweep.yaml").decode()))
    except (OSError, ValueError, SpecError, yaml.YAMLError):
        return None
    rows = [trial_row(t, "pending", -1) for t in spec.trials()]
    return rows + recovered_rows(store, {r["trial_id"] for r in rows})
