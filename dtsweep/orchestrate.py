"""`dtsweep run`: every unfinished trial of a sweep, grid studies and searches, on Ray Tune.

The top of the run stage. `run_sweep` holds the sweep directory's lease, repairs damage, runs
the grid studies as one Tune experiment and then each search group (`dtsweep.search`), and
leaves a consistent, compacted sweep directory behind (`dtsweep.sweepdir`), also when
interrupted. Below it: `dtsweep.tuning` (the trainable, the Tuner, progress lines),
`dtsweep.inputs` (inputs resolved once and published to storage), `dtsweep.cluster` (connecting to Ray).
"""

from __future__ import annotations

import json

from dtsweep.cluster import ray_session, use_gpus
from dtsweep.inputs import dataset_key, prepare_datasets, publish_datasets, publish_inits, trial_inits
from dtsweep.spec import SweepSpec, Trial
from dtsweep.store import Lease, Store
from dtsweep.sweepdir import (
    RESUME_DIR,
    Ledger,
    RunSummary,
    compact,
    epochs_done,
    latest_resume_checkpoints,
    list_files,
    prune_resume_states,
    readable_rows,
    repair,
    safe_epochs_done,
    stale_compacted,
    trial_row,
    write_sweep_yaml,
)
from dtsweep.train.loop import trial_provenance
from dtsweep.tuning import build_tuner, fit_errors, job_config, progress_callback, run_name, train_trial


def run_sweep(spec: SweepSpec, *, address: str | None = None, retry_failed: bool = False, log=print,
              trainable=None) -> RunSummary:  # fmt: skip
    """Train every unfinished trial of `spec`: its grid studies, then its search studies.

    Idempotent and resumable; returns counts (a search sample counts as a trial). Holds the
    sweep directory's lease (`dtsweep.store.Lease`) throughout: raises LeaseHeld if another
    live run holds it. Damaged per-trial files are set aside first (`repair`). On
    KeyboardInterrupt the ledger keeps unstarted trials `pending` and started ones `running`
    (the next run resumes them), the lease is released, and the interrupt propagates.
    At the end of a run the resume states of finished trials are deleted (`prune_resume_states`).

    `trainable`: the grid's Tune function trainable, `dtsweep.tuning.train_trial` by default;
    benchmarks/scale.py passes one that does no training to measure the orchestration alone.
    """
    from dtsweep.search import run_searches

    store = Store(spec.sweep_dir)
    store.check_writable()
    address = address or spec.ray.address
    with Lease(store, log=log):
        repair(store, log=log)
        write_sweep_yaml(store, spec)
        ledger = Ledger(store, spec.trials())
        try:
            summary = _run_grid(spec, store, ledger, address=address, retry_failed=retry_failed, log=log,
                                trainable=trainable or train_trial)  # fmt: skip
            if any(st.search is not None for st in spec.studies):
                summary = summary + run_searches(spec, store, ledger, address=address, retry_failed=retry_failed, log=log)
        finally:
            ledger.close()  # trials.parquet complete, also after an interrupt
        finished = {tid for tid, r in ledger.rows.items() if r["status"] == "finished"}
        # Each trial's resume state goes when the ledger records it finished; these are the
        # ones a killed driver left behind.
        freed = prune_resume_states(store, finished)
        if freed:
            log(f"deleted the resume states of finished trials under {store.uri(RESUME_DIR)} ({freed / 1e6:,.1f} MB)")
        if store.exists(RESUME_DIR) and not list_files(store, RESUME_DIR, recursive=True):
            store.fs.delete_dir(store.path(RESUME_DIR))  # nothing left to resume: no empty folder either
        return summary


def _run_grid(spec: SweepSpec, store: Store, ledger: Ledger, *, address, retry_failed: bool, log, trainable) -> RunSummary:
    trials = spec.trials()
    todo = [t for t in trials if ledger.status(t.trial_id) == "pending"
            or (retry_failed and ledger.status(t.trial_id) == "failed")]  # fmt: skip
    n_finished = sum(ledger.status(t.trial_id) == "finished" for t in trials)
    n_failed_kept = sum(ledger.status(t.trial_id) == "failed" for t in trials) if not retry_failed else 0
    if trials:
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
        sources = prepare_datasets(todo, log=log)  # generating a dataset can take minutes: Ctrl-C is likely here
        ledger.set_provenance(trial_provenance(todo, sources))
        ledger.write()
        # Every node reads these copies, not the driver's files (dtsweep.inputs).
        sources = publish_datasets(store, sources, log=log)
        inits = publish_inits(store, todo, log=log)
        with ray_session(address, num_cpus=spec.ray.num_cpus):
            errors = _fit_grid(spec, store, todo, ledger, sources, inits, n_total=len(trials), n_done=n_finished, log=log,
                               trainable=trainable)  # fmt: skip
    except KeyboardInterrupt:
        _record_interrupt(store, ledger, todo)
        raise

    finished = failed = 0
    for t in todo:
        done = epochs_done(store, t.trial_id)
        err = errors.get(t.trial_id)
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


def _fit_grid(spec: SweepSpec, store: Store, todo: list[Trial], ledger: Ledger, sources: dict, inits: dict, *,
              n_total: int, n_done: int, log, trainable=train_trial) -> dict[str, str | None]:  # fmt: skip
    """Run `todo` as one Tune experiment; returns trial_id -> error line (None if fine)."""
    from ray import tune

    has_gpu = use_gpus(spec.ray.gpu, any(t.resources.gpu > 0 for t in todo), log=log)
    resume = latest_resume_checkpoints(store, {t.trial_id for t in todo})
    configs = []
    for t in todo:
        if t.trial_id in resume:
            log(f"resuming {t.trial_id} from epoch {resume[t.trial_id][0]} (checkpoint of an earlier run)")
        configs.append(job_config(t, store, has_gpu=has_gpu, dataset=sources[dataset_key(t)].to_dict(),
                                  inits=trial_inits(t, inits), resume_from=resume.get(t.trial_id, (None, None))[1])["job"])  # fmt: skip
    work = sum(t.epochs - resume.get(t.trial_id, (0,))[0] for t in todo)
    tuner = build_tuner(
        trainable, spec=spec, store=store, name=run_name("run"), has_gpu=has_gpu,
        callbacks=[progress_callback(n_total=n_total, n_done=n_done, work_epochs=work, ledger=ledger)],
        # Each job as one JSON string (`job_of`): Tune copies the whole grid per trial it creates.
        param_space={"job": tune.grid_search([json.dumps(c) for c in configs])},
        max_concurrent_trials=spec.ray.max_concurrent_trials,
        # A worker stays for the next trial with the same resources: starting a process and
        # importing torch per trial would cost seconds of CPU per trial (as in a search).
        reuse_actors=True,
    )  # fmt: skip
    return fit_errors(tuner.fit())


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
