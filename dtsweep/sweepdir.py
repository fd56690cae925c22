"""The sweep directory: ledger, compaction, self-repair, resume discovery and status.

Everything that reads or writes the files of a sweep directory (DESIGN §3) for the run stage
lives here, below both the grid runner (`dtsweep.orchestrate`) and the search runner
(`dtsweep.search`). The source of truth is the directory itself, not Tune's experiment state:
- a trial is *finished* when `metrics/<trial_id>.parquet` holds its final epoch;
- `trials.parquet` (the ledger) records each trial's status and last error;
- the latest resume state of a trial is its newest complete Tune checkpoint under `_tune/`.
So `run` can be repeated at will: finished trials are skipped, interrupted ones resume
from their last epoch (also after the driver itself was killed), new seeds only add trials.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dtsweep.schemas import CHECKPOINTS_SCHEMA, METRICS_SCHEMA, PROVENANCE_COLUMNS, TRIALS_SCHEMA
from dtsweep.spec import SweepSpec, Trial, resolved_yaml
from dtsweep.store import Store, lease_state, read_checkpoint_metadata, read_lease, sha256_file, table_from_rows

TUNE_DIR = "_tune"
RESUME_FILE = "resume.pt"


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

    def __add__(self, other: "RunSummary") -> "RunSummary":
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


def read_ledger(store: Store) -> pd.DataFrame:
    if store.exists("trials.parquet"):
        return store.read_pandas("trials.parquet")
    return TRIALS_SCHEMA.empty_table().to_pandas()


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


class Ledger:
    """trials.parquet, rewritten atomically whenever a trial changes state."""

    def __init__(self, store: Store, trials: list[Trial]):
        self.store = store
        self.trials = {t.trial_id: t for t in trials}
        old = readable_rows(store, "trials.parquet")
        if old is None:  # lost or set aside by `repair`: recover what the outputs tell
            old = recovered_rows(store, set(self.trials))
        # Trials of earlier runs of this sweep that the current spec no longer lists stay.
        self.rows: dict[str, dict] = {r["trial_id"]: r for r in old}
        # trial_id -> provenance columns of trials this run resolved (set_provenance); rows of
        # earlier runs keep the provenance they were written with.
        self.provenance: dict[str, dict] = {
            tid: {k: r.get(k) for k in PROVENANCE_COLUMNS} for tid, r in self.rows.items() if r.get("dataset_sha256")
        }
        for tid, t in self.trials.items():
            prev = self.rows.get(tid)
            done = epochs_done(store, tid)
            if done >= t.epochs:
                status, err = "finished", None
            elif prev is not None and prev["status"] in ("failed", "stopped"):
                # "stopped": ended early by a search's scheduler (ASHA); not to be rerun.
                status, err = prev["status"], prev["error"]
            else:
                status, err = "pending", None
            self.rows[tid] = trial_row(t, status, done, err)

    def status(self, tid: str) -> str:
        return self.rows[tid]["status"]

    def set(self, tid: str, status: str, error: str | None = None) -> None:
        self.rows[tid] = trial_row(self.trials[tid], status, epochs_done(self.store, tid), error)
        self.write()

    def set_provenance(self, provenance: dict[str, dict]) -> None:
        """Record trial_id -> provenance columns (dtsweep.inputs.trial_provenance) for the next writes."""
        self.provenance.update(provenance)

    def write(self) -> None:
        rows = sorted(({**r, **self.provenance.get(r["trial_id"], {})} for r in self.rows.values()), key=lambda r: r["trial_id"])
        self.store.write_table("trials.parquet", table_from_rows(rows, TRIALS_SCHEMA))


def latest_resume_checkpoints(store: Store) -> dict[str, tuple[int, str]]:
    """trial_id -> (epoch, checkpoint dir) of the newest complete Tune checkpoint of earlier runs.

    A driver or node killed while a worker uploads a checkpoint can leave a partial one;
    it is skipped (resume.pt shorter than resume.json records) and an older one is used:
    Tune deletes the previous checkpoint only after the new one has been reported.
    """
    best: dict[str, tuple[int, str]] = {}
    for run in store.list_dirs(TUNE_DIR):
        for trial_dir in store.list_dirs(f"{TUNE_DIR}/{run}"):
            for ck in store.list_dirs(f"{TUNE_DIR}/{run}/{trial_dir}"):
                if not ck.startswith("checkpoint_"):
                    continue
                rel = f"{TUNE_DIR}/{run}/{trial_dir}/{ck}"
                found = _complete_checkpoint(store, rel)
                if found is None:
                    continue
                # The checkpoint names its trial (trial directories carry readable names);
                # trial_dir is the trial_id in sweeps whose checkpoints predate that.
                epoch, tid = found[0], found[1] or trial_dir
                if epoch > best.get(tid, (-1, ""))[0]:
                    best[tid] = (epoch, store.uri(rel))
    return best


def _complete_checkpoint(store: Store, rel: str) -> tuple[int, str | None] | None:
    """(epoch, trial_id) of the resume checkpoint in `rel`, or None if it is missing or incomplete."""
    if not store.exists(f"{rel}/resume.json"):
        return None
    try:
        meta = json.loads(store.read_bytes(f"{rel}/resume.json"))
    except ValueError:  # cut off mid-write
        return None
    info = store.fs.get_file_info(store.path(rel, RESUME_FILE))
    if info.type != pafs.FileType.File or info.size != meta.get("resume_bytes"):
        return None
    return int(meta["epoch"]), meta.get("trial_id")


# --------------------------------------------------------------------------------------
# Compaction: metrics.parquet and checkpoints.parquet
# --------------------------------------------------------------------------------------


def compact(store: Store) -> None:
    """Concatenate per-trial metrics and checkpoint indexes into the two top-level files.

    Checkpoint paths are written relative to the sweep directory (older absolute ones that
    point into it are made relative), so a copied or moved sweep directory reads its own files.
    """
    tables = [store.read_table(p) for p in store.list("metrics", ".parquet")]
    metrics = pa.concat_tables(tables) if tables else METRICS_SCHEMA.empty_table()
    metrics = metrics.sort_by([("trial_id", "ascending"), ("epoch", "ascending")])
    store.write_table("metrics.parquet", metrics)
    rows = [r for tid in store.list_dirs("checkpoints") for r in readable_rows(store, f"checkpoints/{tid}/index.parquet") or []]
    for r in rows:
        r["path"] = store.relative(r["path"]) or r["path"]
    ck = table_from_rows(rows, CHECKPOINTS_SCHEMA)
    store.write_table("checkpoints.parquet", ck.sort_by([("trial_id", "ascending"), ("epoch", "ascending")]))


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
    that is missing, unreadable, or holds another number of rows than the per-trial files."""
    out = {}
    sources = {
        "metrics.parquet": store.list("metrics", ".parquet"),
        "checkpoints.parquet": [rel for tid in store.list_dirs("checkpoints")
                                if store.exists(rel := f"checkpoints/{tid}/index.parquet")],
    }  # fmt: skip
    for name, parts in sources.items():
        have = _parquet_rows(store, name)
        want = sum(_parquet_rows(store, p) or 0 for p in parts)
        if not store.exists(name):
            out[name] = "missing"
        elif have is None:
            out[name] = "unreadable"
        elif have != want:
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

    A trial whose metrics file was set aside resumes from its newest resume checkpoint (whose
    state carries every metrics row so far) or reruns; nothing finished is lost.
    """
    for rel in store.list("metrics", ".parquet"):
        if readable_rows(store, rel) is None:
            log(f"{rel} is unreadable (cut off or damaged): set aside as {store.set_aside(rel)}; "
                "its trial resumes from its last checkpoint or reruns")  # fmt: skip
    for tid in store.list_dirs("checkpoints"):
        rel = f"checkpoints/{tid}/index.parquet"
        damaged = store.exists(rel) and readable_rows(store, rel) is None
        if damaged:
            log(f"{rel} is unreadable: set aside as {store.set_aside(rel)}")
        if damaged or (not store.exists(rel) and store.list(f"checkpoints/{tid}", ".parquet")):
            log(f"{rel}: rebuilt from its {rebuild_checkpoint_index(store, tid)} checkpoint files")
    if store.exists("trials.parquet") and readable_rows(store, "trials.parquet") is None:
        log(f"trials.parquet is unreadable: set aside as {store.set_aside('trials.parquet')}; "
            "rebuilt from the spec and the per-trial files")  # fmt: skip


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
                raise FileNotFoundError(f"{sweep_dir}: trials.parquet is unreadable and there is no readable sweep.yaml to rebuild it from")
            raise FileNotFoundError(f"{sweep_dir}: no trials.parquet (not a dtsweep sweep directory, or never run)")
        problems.append(("trials.parquet is unreadable" if store.exists("trials.parquet") else "trials.parquet is missing")
                        + ": statuses below are rebuilt from sweep.yaml and metrics/; `run` repairs it")  # fmt: skip
    df = pd.DataFrame(rows) if rows else TRIALS_SCHEMA.empty_table().to_pandas()
    for col in TRIALS_SCHEMA.names:
        if col not in df:
            df[col] = None
    # A driver killed mid-run leaves "running"/"pending": the metrics files say how far each got.
    done = {}
    for tid in df["trial_id"]:
        done[tid] = safe_epochs_done(store, tid)
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
        "trials": df[["trial_id", "study", "init", "dataset", "context_len", "swap_block", "seed", "status", "epochs_done", "epochs"]],
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
