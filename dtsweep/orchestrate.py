"""Ray Tune wiring: one Tune trial per dtsweep trial, the trial ledger, resume.

Source of truth is the sweep directory, not Tune's experiment state:
- a trial is *finished* when `metrics/<trial_id>.parquet` holds its final epoch;
- `trials.parquet` (the ledger) records each trial's status and last error;
- the latest resume state of a trial is its newest Tune checkpoint under `_tune/`.
So `run` can be repeated at will: finished trials are skipped, interrupted ones resume
from their last epoch (also after the driver itself was killed), new seeds only add trials.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dtsweep.spec import SweepSpec, Trial, resolved_yaml
from dtsweep.store import (
    CHECKPOINTS_SCHEMA,
    METRICS_SCHEMA,
    PROVENANCE_COLUMNS,
    TRIALS_SCHEMA,
    Lease,
    Store,
    describe_lease,
    lease_state,
    read_checkpoint_metadata,
    read_lease,
    sha256_file,
    table_from_rows,
)

TUNE_DIR = "_tune"
RESUME_FILE = "resume.pt"


# --------------------------------------------------------------------------------------
# The Tune trainable (runs in a Ray worker)
# --------------------------------------------------------------------------------------


def train_trial(config: dict) -> None:
    """Tune function trainable: run one trial, reporting each epoch with a resume checkpoint."""
    import torch
    from ray import tune

    from dtsweep.train import TrialRunner, set_threads_for_trial

    config = config["job"]
    trial = Trial.from_dict(config["trial"])
    set_threads_for_trial(trial.resources.cpu)
    # The driver resolved the dataset once (prepare_datasets); the runner reads that file.
    runner = TrialRunner(trial, Store(config["sweep_dir"]), dataset=config.get("dataset"))

    checkpoint = tune.get_checkpoint()  # set when Tune restarts this trial (lost node, error)
    if checkpoint is None and config.get("resume_from"):
        checkpoint = tune.Checkpoint(config["resume_from"])  # left by an earlier driver
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            runner.load_resume_state(torch.load(Path(d) / RESUME_FILE, weights_only=True, map_location="cpu"))

    def report(row: dict, r: TrialRunner) -> None:
        metrics = {k: v for k, v in row.items() if isinstance(v, (int, float)) and v is not None}
        metrics["epochs_total"] = trial.epochs
        with tempfile.TemporaryDirectory() as d:
            torch.save(r.resume_state(), Path(d) / RESUME_FILE)
            # The size lets a later driver tell a complete upload from one cut off mid-copy.
            size = (Path(d) / RESUME_FILE).stat().st_size
            (Path(d) / "resume.json").write_text(json.dumps({"trial_id": r.tid, "epoch": r.epoch, "resume_bytes": size}))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    runner.run(on_epoch=report)


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
        """Record trial_id -> provenance columns (orchestrate.trial_provenance) for the next writes."""
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
        for tid in store.list_dirs(f"{TUNE_DIR}/{run}"):
            for ck in store.list_dirs(f"{TUNE_DIR}/{run}/{tid}"):
                if not ck.startswith("checkpoint_"):
                    continue
                rel = f"{TUNE_DIR}/{run}/{tid}/{ck}"
                epoch = _complete_checkpoint_epoch(store, rel)
                if epoch is not None and epoch > best.get(tid, (-1, ""))[0]:
                    best[tid] = (epoch, store.uri(rel))
    return best


def _complete_checkpoint_epoch(store: Store, rel: str) -> int | None:
    """The epoch of the resume checkpoint in `rel`, or None if it is missing or incomplete."""
    if not store.exists(f"{rel}/resume.json"):
        return None
    try:
        meta = json.loads(store.read_bytes(f"{rel}/resume.json"))
    except ValueError:  # cut off mid-write
        return None
    info = store.fs.get_file_info(store.path(rel, RESUME_FILE))
    if info.type != pafs.FileType.File or info.size != meta.get("resume_bytes"):
        return None
    return int(meta["epoch"])


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
# Progress and ledger updates from the driver
# --------------------------------------------------------------------------------------


def _progress_callback(ledger: Ledger, n_total: int, n_skipped: int):
    from ray import tune

    class Progress(tune.Callback):
        def __init__(self):
            self.t0 = time.time()
            self.done = n_skipped
            self.failed = 0

        def _line(self, msg: str) -> None:
            el = time.time() - self.t0
            print(f"[dtsweep {el:6.0f}s] {self.done}/{n_total} done, {self.failed} failed | {msg}", file=sys.stderr, flush=True)

        def on_trial_start(self, iteration, trials, trial, **info):
            t = ledger.trials[trial.config["job"]["trial_id"]]
            ledger.set(t.trial_id, "running")
            self._line(f"start {t.trial_id} {_describe(t)}")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            t = ledger.trials[trial.config["job"]["trial_id"]]
            score = result.get("normalized_score")
            s = f" score {score:.1f}" if isinstance(score, float) else ""
            self._line(f"{t.trial_id} epoch {result.get('epoch')}/{t.epochs}{s}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            tid = trial.config["job"]["trial_id"]
            self.done += 1
            ledger.set(tid, "finished")
            self._line(f"finished {tid}")

        def on_trial_error(self, iteration, trials, trial, **info):
            tid = trial.config["job"]["trial_id"]
            self.failed += 1
            ledger.set(tid, "failed", _error_line(trial))
            self._line(f"FAILED {tid}: {_error_line(trial)}")

    return Progress()


def _describe(t: Trial) -> str:
    swap = f" swap={t.swap_block}" if t.swap_block is not None else ""
    return f"({t.init} {t.dataset} K={t.context_len}{swap} seed={t.seed})"


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def error_text(error: BaseException | str) -> str:
    """The ledger's `error`: "<Type>: <message>" of the exception the trial raised, one line.

    Ray wraps a worker's exception (RayTaskError, its message a coloured header and a
    traceback); the innermost `.cause` is what the trial raised. A string is Tune's error
    text: its last line is that exception's. ANSI colour codes are removed.
    """
    if isinstance(error, str):
        lines = [ln.strip() for ln in _ANSI.sub("", error).splitlines() if ln.strip()]
        return (lines[-1] if lines else "unknown error (see Ray logs)")[:1000]
    seen = set()
    while isinstance(getattr(error, "cause", None), BaseException) and id(error) not in seen:
        seen.add(id(error))
        error = error.cause
    name = type(error).__name__
    # Ray's as_instanceof_cause() class is named "RayTaskError(OSError)": keep the cause's name.
    name = name[name.index("(") + 1 : -1] if name.endswith(")") and "(" in name else name
    message = " ".join(ln.strip() for ln in _ANSI.sub("", str(error)).splitlines() if ln.strip())
    return (f"{name}: {message}" if message else name)[:1000]


def _error_line(trial) -> str:
    """One line for the ledger from Tune's error file of `trial` (while the run goes on)."""
    path = getattr(trial, "error_file", None) or ""
    text = Path(path).read_text() if path and os.path.exists(path) else ""
    return error_text(text)


def error_file(store: Store, trial_id: str) -> str | None:
    """Location of the newest Tune error file (full traceback) of a trial under `_tune/`, if any."""
    for run in reversed(store.list_dirs(TUNE_DIR)):  # run names sort by start time
        rel = f"{TUNE_DIR}/{run}/{trial_id}/error.txt"
        if store.exists(rel):
            return store.uri(rel)
    return None


# --------------------------------------------------------------------------------------
# run / status
# --------------------------------------------------------------------------------------


@dataclass
class RunSummary:
    sweep_dir: str
    total: int
    skipped: int  # already finished before this run
    ran: int
    finished: int
    failed: int


def prepare_datasets(trials: list[Trial]) -> dict[tuple, "DatasetSource"]:
    """Resolve (and generate offline, if needed) every dataset once, before any trial starts.

    Returns dataset_key(trial) -> DatasetSource; every trial is handed its entry (path +
    sha256) and reads exactly that file (dtsweep.train.loop.open_trial_dataset).
    """
    from dtsweep.data import resolve_source

    out = {}
    for key in sorted({dataset_key(t) for t in trials}, key=str):
        name, env, steps, seed, _ = key
        out[key] = resolve_source(name, env=env, steps=steps, seed=seed)
        if key[4] is not None and out[key].sha256 != key[4]:
            raise ValueError(f"dataset file {out[key].path} changed since the spec was loaded (sha256 {out[key].sha256}, was {key[4]})")
    return out


def dataset_key(t: Trial) -> tuple:
    """What identifies a trial's dataset: (name, env, data.steps, data.seed, file sha256 or None)."""
    return (t.dataset, t.env, t.data.steps, t.data.seed, t.dataset_sha256)


def trial_provenance(trials: list[Trial], sources: dict) -> dict[str, dict]:
    """trial_id -> the provenance columns of trials.parquet, from prepare_datasets' sources."""
    from dtsweep.train.loop import provenance_columns

    return {t.trial_id: provenance_columns(t, sources[dataset_key(t)]) for t in trials}


# Sweep directories whose lease this process holds: run_with_searches runs its grid studies
# through run_sweep, which must not ask for the lease a second time.
_HELD: dict[str, Lease] = {}


def run_sweep(
    spec: SweepSpec,
    *,
    address: str | None = None,
    retry_failed: bool = False,
    log=print,
) -> RunSummary:
    """Train every unfinished trial of `spec`; returns counts. Idempotent and resumable.

    Holds the sweep directory's lease (`dtsweep.store.Lease`) throughout: raises LeaseHeld if
    another live run holds it. Damaged per-trial files are set aside first (`repair`). On
    KeyboardInterrupt the ledger keeps unstarted trials `pending` and started ones `running`
    (the next run resumes them), the lease is released, and the interrupt propagates.
    """
    store = Store(spec.sweep_dir)
    if store.uri() in _HELD:
        return _run_sweep(spec, store, address=address, retry_failed=retry_failed, log=log)
    store.check_writable()
    lease = Lease(store, log=log)
    lease.acquire()
    _HELD[store.uri()] = lease
    try:
        repair(store, log=log)
        if any(st.search is not None for st in spec.studies):
            from dtsweep.search import run_with_searches  # runs the grid studies through here, then the searches

            return run_with_searches(spec, address=address, retry_failed=retry_failed, log=log)
        return _run_sweep(spec, store, address=address, retry_failed=retry_failed, log=log)
    finally:
        del _HELD[store.uri()]
        lease.release()


def _run_sweep(spec: SweepSpec, store: Store, *, address, retry_failed: bool, log) -> RunSummary:
    trials = spec.trials()
    store.check_writable()
    if not store.exists("sweep.yaml") or store.read_bytes("sweep.yaml").decode(errors="replace") != resolved_yaml(spec):
        store.write_bytes("sweep.yaml", resolved_yaml(spec).encode())

    ledger = Ledger(store, trials)
    todo = [t for t in trials if ledger.status(t.trial_id) == "pending"
            or (retry_failed and ledger.status(t.trial_id) == "failed")]  # fmt: skip
    n_finished = sum(ledger.status(t.trial_id) == "finished" for t in trials)
    n_failed_kept = sum(ledger.status(t.trial_id) == "failed" for t in trials) if not retry_failed else 0
    log(f"sweep {spec.name}: {len(trials)} trials, {n_finished} finished, {len(todo)} to run"
        + (f", {n_failed_kept} failed (rerun with --retry-failed)" if n_failed_kept else "")
        + f" -> {store.uri()}")  # fmt: skip
    if not todo:
        if _ledger_differs(store, ledger):
            ledger.write()
        stale = stale_compacted(store)
        if stale:
            compact(store)
            log("rebuilt " + ", ".join(f"{name} ({why})" for name, why in stale.items()))
        return RunSummary(store.uri(), len(trials), n_finished, 0, n_finished, n_failed_kept)

    for t in todo:
        ledger.rows[t.trial_id]["status"] = "pending"
        ledger.rows[t.trial_id]["error"] = None
    try:
        sources = prepare_datasets(todo)  # generating a dataset can take minutes: Ctrl-C is likely here
        ledger.set_provenance(trial_provenance(todo, sources))
        ledger.write()
        results = _fit(spec, store, todo, ledger, address=address or spec.ray.address, n_total=len(trials), n_skipped=n_finished, log=log, sources=sources)
    except KeyboardInterrupt:
        _record_interrupt(store, ledger, todo)
        raise

    finished = failed = 0
    for t in todo:
        done = epochs_done(store, t.trial_id)
        err = results.get(t.trial_id)
        if done >= t.epochs and err is None:
            ledger.rows[t.trial_id] = trial_row(t, "finished", done)
            finished += 1
        else:
            ledger.rows[t.trial_id] = trial_row(t, "failed", done, err or "did not finish")
            failed += 1
    ledger.write()
    compact(store)
    log(f"sweep {spec.name}: {finished} trials finished, {failed} failed this run; outputs in {store.uri()}")
    return RunSummary(store.uri(), len(trials), n_finished, len(todo), n_finished + finished, failed + n_failed_kept)


def _record_interrupt(store: Store, ledger: Ledger, todo: list[Trial]) -> None:
    """After Ctrl-C: trials that completed are finished, started ones stay `running` (the next
    run resumes them from their last epoch), unstarted ones stay `pending`; nothing is failed."""
    for t in todo:
        done = safe_epochs_done(store, t.trial_id)
        status = "finished" if (done if done is not None else -1) >= t.epochs else ledger.status(t.trial_id)
        ledger.rows[t.trial_id] = trial_row(t, status, done if done is not None else -1)
    ledger.write()
    compact(store)


def _ledger_differs(store: Store, ledger: Ledger) -> bool:
    """True if trials.parquet is missing, unreadable, or disagrees with `ledger` on a trial's status."""
    rows = readable_rows(store, "trials.parquet")
    if rows is None:
        return True
    on_disk = {(r["trial_id"], r["status"], r["epochs_done"]) for r in rows}
    return on_disk != {(r["trial_id"], r["status"], r["epochs_done"]) for r in ledger.rows.values()}


def _fit(spec, store: Store, todo: list[Trial], ledger: Ledger, *, address, n_total, n_skipped, log=print, sources=None) -> dict[str, str | None]:
    """Run `todo` as one Tune experiment; returns trial_id -> error line (None if fine).

    `sources`: prepare_datasets' result; each trial's config carries its DatasetSource."""
    import ray
    from ray import tune

    # Tune warns each time num_to_keep=1 forces an experiment snapshot; with one checkpoint
    # per epoch that is by design, and the warning would drown the progress lines.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's own SIGINT handler ends the experiment "gracefully": every unstarted trial comes
    # back as an error and a Tuner.restore hint is printed. Without it Ctrl-C raises
    # KeyboardInterrupt here; the caller records the interrupt and the next run resumes.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    started_here = not ray.is_initialized()
    if started_here:
        init_ray(address, num_cpus=spec.ray.num_cpus)
    try:
        has_gpu = ray.cluster_resources().get("GPU", 0) > 0
        resume = latest_resume_checkpoints(store)

        configs = []
        for t in todo:
            d = t.to_dict()
            if not has_gpu:
                d["resources"]["gpu"] = 0.0
            c = {"trial_id": t.trial_id, "trial": d, "sweep_dir": store.uri()}
            if sources is not None:
                c["dataset"] = sources[dataset_key(t)].to_dict()
            if t.trial_id in resume:
                c["resume_from"] = resume[t.trial_id][1]
                log(f"resuming {t.trial_id} from epoch {resume[t.trial_id][0]} (checkpoint of an earlier run)")
            configs.append(c)

        # Unique per run: a rerun seconds after a killed driver must not reuse its directory.
        run_name = dt.datetime.now().strftime("run-%Y%m%d-%H%M%S-") + os.urandom(2).hex()
        tuner = tune.Tuner(
            tune.with_resources(train_trial, functools.partial(trial_placement, has_gpu=has_gpu)),
            param_space={"job": tune.grid_search(configs)},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=spec.ray.max_concurrent_trials,
                trial_name_creator=lambda tr: tr.config["job"]["trial_id"],
                trial_dirname_creator=lambda tr: tr.config["job"]["trial_id"],
            ),
            run_config=tune.RunConfig(
                name=run_name,
                storage_path=store.uri(TUNE_DIR),
                failure_config=tune.FailureConfig(max_failures=spec.ray.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=[_progress_callback(ledger, n_total, n_skipped)],
                verbose=0,
            ),
        )
        grid = tuner.fit()
        out = {}
        for res in grid:
            if not res.config:  # Tune returns config-less results after an interrupt
                continue
            tid = res.config["job"]["trial_id"]
            out[tid] = None if res.error is None else error_text(res.error)
        return out
    finally:
        if started_here:
            ray.shutdown()


def trial_placement(config: dict, *, has_gpu: bool):
    """Tune placement of one trial: its spec's CPUs, and its GPU share where the cluster has GPUs."""
    from ray import tune

    r = config["job"]["trial"]["resources"]
    bundle = {"CPU": r["cpu"]}
    if has_gpu and r["gpu"] > 0:
        bundle["GPU"] = r["gpu"]
    return tune.PlacementGroupFactory([bundle])


def init_ray(address: str | None, *, num_cpus: int | None = None) -> None:
    """Connect to `address` (or RAY_ADDRESS), else start a local Ray without dashboard."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    if address:
        ray.init(address=address, **kwargs)
        return
    # Ray's own default: the cluster started on this machine with `ray start` (the head
    # node of `ray up`), else a new local Ray.
    try:
        ray.init(num_cpus=num_cpus, **kwargs)
    except ValueError:
        # Joining a running cluster, Ray refuses num_cpus: the cluster's resources apply.
        if num_cpus is None:
            raise
        ray.init(**kwargs)


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
