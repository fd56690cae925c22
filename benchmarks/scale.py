"""How dtsweep's own cost grows with the number of trials (issue 16, point 1).

    python benchmarks/scale.py --quick --out r.json     # N = 100 and 1,000 (< 5 minutes on 2 cores)
    python benchmarks/scale.py --out r.json             # N = 100, 1,000 and 5,000
    python benchmarks/scale.py --n 20 --out r.json      # any N (the CI test uses a tiny one)
    python benchmarks/scale.py --n 100 --finished 5000  # + rerun/status of a finished 5,000-trial sweep
    python benchmarks/scale.py --quick --s3 --out r.json  # the sweeps on an S3 server on 127.0.0.1

Runs the real orchestration path — spec -> ledger -> Ray Tune -> Store -> compaction -> status
— through `dtsweep.orchestrate.run_sweep`, with ONE substitution: the Tune trainable does no
training. It writes what a real trial writes, with the real writers (a metrics row per epoch
through `Store.write_table`, an analysis checkpoint of a 4-element tensor through
`write_checkpoint` at the spec's checkpoint epochs, its checkpoint index), and saves a resume
state and reports each epoch to Tune through `dtsweep.tuning.report_epoch`, like `train_trial`.
So every second measured is orchestration cost: Ray Tune's scheduling and checkpoint handling,
the ledger, the per-trial files, compaction.

Per N it reports (seconds are wall-clock unless named cpu):
- first_trial_s: from `run_sweep` called to the first trial's trainable running (Ray start,
  repair, ledger, dataset resolution, Tune start-up);
- per_trial_overhead_s: (run_s - first_trial_s) / N, the orchestration cost per trial once
  trials flow; driver_cpu_per_trial_s: the driver process's CPU time of the run / N;
- ledger_bytes_written: bytes written to ledger files (trials.parquet and the per-trial state
  records) through `Store` during the run (`dtsweep.sweepdir.LEDGER_BYTES_WRITTEN`);
- rerun_s: `run_sweep` again once every trial is finished (nothing to train);
- status_s: `dtsweep.sweepdir.sweep_status` of the finished sweep;
and top level `overhead_growth` = per_trial_overhead_s at the largest N / at the smallest.
With --s3 the sweeps live on a real S3-compatible server on 127.0.0.1 (moto's, benchmarks/
s3server.py; needs the `test` extra): every ledger record, metrics file, checkpoint and
compaction is an S3 request, as on a cluster with object storage (loopback, so no network
latency: a real bucket adds its round trips).
`finished_sweeps` (--finished, and the full run's 5,000): rerun_s and status_s of a finished
sweep whose outputs were written with the same writers directly, not through Tune.
On a machine shared with other jobs these are upper bounds: the load average is recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DTSWEEP_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # s3server

S3_BUCKET = "dtsweep-scale"

SUBSTITUTION = (
    "the Tune trainable does no training: it writes each epoch's metrics row, the analysis "
    "checkpoints (a 4-element tensor) and their index with dtsweep's writers, and saves a resume "
    "state and reports each epoch to Tune, as train_trial does; everything else is dtsweep's "
    "real run path (spec, ledger, Ray Tune, Store, compaction, status)"
)


def scale_spec(storage: str, n: int) -> dict:
    """A sweep of `n` trials: one condition, `n` seeds; tiny settings (no trial trains)."""
    return {
        "name": f"scale-{n}",
        "storage": storage,
        "defaults": {
            "context_len": 5,
            "dataset": ["hopper-random"],
            "data": {"steps": 3000, "seed": 0},
            "model": {"n_layer": 1, "n_embd": 16, "n_head": 1},
            "train": {"epochs": 2, "steps_per_epoch": 4, "batch_size": 8, "warmup_steps": 2},
            "eval": {"episodes": 2, "max_steps": 30},
            "checkpoint_epochs": [0, "final"],
        },
        "studies": [{"name": "main", "init": "random", "seed": {"start": 0, "count": n}}],
        # Four trials at a time on a local 2-CPU Ray (the trials only write small files).
        "resources": {"default": {"cpu": 0.5, "gpu": 0}},
        "ray": {"num_cpus": 2, "max_failures": 0},
    }


def write_trial_outputs(store, trial, on_epoch=None) -> None:
    """What a trial writes, with dtsweep's writers, minus the training: per epoch a metrics row
    (and an analysis checkpoint of a 4-element tensor at the spec's checkpoint epochs, with its
    index); then `on_epoch(epoch, state)`."""
    import torch

    from dtsweep.schemas import CHECKPOINTS_SCHEMA, METRICS_SCHEMA
    from dtsweep.store import table_from_rows, write_checkpoint

    tid = trial.trial_id
    weights = {"w": torch.zeros(4)}
    rows, ck_rows = [], []
    for epoch in range(trial.epochs + 1):
        if epoch in trial.checkpoint_epochs:
            rel = f"checkpoints/{tid}/epoch={epoch}.parquet"
            stats = write_checkpoint(store, rel, weights, {"trial_id": tid, "epoch": epoch, "trial": trial.to_dict()})
            ck_rows.append({"trial_id": tid, "epoch": epoch, "path": rel, **stats})
            store.write_table(f"checkpoints/{tid}/index.parquet", table_from_rows(ck_rows, CHECKPOINTS_SCHEMA))
        rows.append({**trial.columns(), "epoch": epoch, "step": epoch * trial.train.steps_per_epoch,
                     "train_loss": None if epoch == 0 else 0.0, "action_error": 0.0, "lr": trial.train.lr,
                     "wall_time_s": 0.0})  # fmt: skip
        store.write_table(f"metrics/{tid}.parquet", table_from_rows(rows, METRICS_SCHEMA))
        if on_epoch is not None:
            on_epoch(epoch, {"trial_id": tid, "epoch": epoch, "model": weights})


def make_trainable(started_log: str):
    """The substituted trainable (see the module docstring); it appends its start time
    (Unix seconds) to `started_log` so the driver can tell when the first trial ran."""

    def no_training_trial(config: dict) -> None:
        from dtsweep.spec import Trial
        from dtsweep.store import Store
        from dtsweep.tuning import job_of, report_epoch

        with open(started_log, "a") as f:  # one short append per trial: atomic on a local disk
            f.write(f"{time.time()}\n")
        job = job_of(config)
        trial = Trial.from_dict(job["trial"])
        store = Store(job["sweep_dir"])
        write_trial_outputs(store, trial, lambda epoch, state: report_epoch(
            {"epoch": epoch, "epochs_total": trial.epochs}, state, store))  # fmt: skip

    return no_training_trial


def measure_finished(n: int, storage: str, log) -> dict:
    """rerun_s and status_s of a finished sweep of `n` trials whose outputs were written directly
    (the writers above, the ledger, compaction), without running them through Tune: how long a
    rerun of a finished N-trial sweep takes where running all N through Tune would take too long."""
    from dtsweep.orchestrate import run_sweep
    from dtsweep.spec import parse_spec
    from dtsweep.store import Store
    from dtsweep.sweepdir import Ledger, compact, sweep_status, trial_row, write_sweep_yaml

    raw = scale_spec(storage, n)
    raw["name"] = f"finished-{n}"
    spec = parse_spec(raw)
    store = Store(spec.sweep_dir)
    t0 = time.time()
    for t in spec.trials():
        write_trial_outputs(store, t)
    write_sweep_yaml(store, spec)
    ledger = Ledger(store, spec.trials())
    for t in spec.trials():
        ledger.rows[t.trial_id] = trial_row(t, "finished", t.epochs)
    ledger.write()
    compact(store)
    log(f"finished sweep of {n} trials written in {time.time() - t0:.0f}s (not timed)")
    t1 = time.time()
    again = run_sweep(spec, log=lambda *_: None)
    rerun_s = time.time() - t1
    t2 = time.time()
    st = sweep_status(spec.sweep_dir)
    status_s = time.time() - t2
    out = {"n_trials": n, "rerun_s": round(rerun_s, 2), "status_s": round(status_s, 2),
           "all_finished": again.ran == 0 and again.skipped == n and st["counts"] == {"finished": n}}  # fmt: skip
    log(f"finished N={n}: {json.dumps(out)}")
    return out


def measure(n: int, storage: str, workdir: Path, log) -> dict:
    """One sweep of n trials under `storage` (a local directory or a URI); workdir: local scratch."""
    from dtsweep.inputs import prepare_datasets
    from dtsweep.orchestrate import run_sweep
    from dtsweep.spec import parse_spec
    from dtsweep.store import Store
    from dtsweep.sweepdir import LEDGER_BYTES_WRITTEN, latest_resume_checkpoints, pending_records, sweep_status

    spec = parse_spec(scale_spec(storage, n))
    prepare_datasets(spec.trials()[:1], log=log)  # generated once, outside the timings
    started_log = workdir / f"started-{n}.txt"
    trainable = make_trainable(str(started_log))
    quiet = lambda *_: None  # noqa: E731

    bytes0 = sum(LEDGER_BYTES_WRITTEN.values())
    cpu0, t0 = time.process_time(), time.time()
    first = run_sweep(spec, log=quiet, trainable=trainable)
    run_s, cpu_s = time.time() - t0, time.process_time() - cpu0
    ledger_bytes = sum(LEDGER_BYTES_WRITTEN.values()) - bytes0
    starts = [float(x) for x in started_log.read_text().split()]
    first_trial_s = min(starts) - t0

    t1 = time.time()
    again = run_sweep(spec, log=quiet, trainable=trainable)
    rerun_s = time.time() - t1
    t2 = time.time()
    st = sweep_status(spec.sweep_dir)
    status_s = time.time() - t2

    store = Store(spec.sweep_dir)
    ok = (first.finished == n and first.failed == 0 and again.ran == 0 and st["counts"] == {"finished": n}
          and len(starts) == n)  # fmt: skip
    out = {
        "n_trials": n,
        "run_s": round(run_s, 2),
        "first_trial_s": round(first_trial_s, 2),
        "per_trial_overhead_s": round((run_s - first_trial_s) / n, 4),
        "driver_cpu_per_trial_s": round(cpu_s / n, 4),
        "ledger_bytes_written": int(ledger_bytes),
        "trials_parquet_bytes": store.file_size("trials.parquet"),
        "rerun_s": round(rerun_s, 2),
        "status_s": round(status_s, 2),
        "resume_states_left": len(latest_resume_checkpoints(store)),
        "ledger_records_left": len(pending_records(store)),
        "all_finished": bool(ok),
    }
    log(f"N={n}: {json.dumps(out)}")
    return out


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "load_avg_start": os.getloadavg()[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="N = 100 and 1,000 only")
    p.add_argument("--n", type=int, nargs="*", help="trial counts to run (overrides --quick; none: only --finished)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--workdir", help="where the sweeps go (default: a temporary directory, deleted)")
    p.add_argument("--s3", action="store_true", help="write the sweeps to an S3-compatible server on 127.0.0.1 (moto)")
    p.add_argument("--finished", type=int, nargs="*", default=None,
                   help="also time rerun and status of finished sweeps of these sizes, written without Tune "
                        "(default: 5000 unless --quick or --n)")  # fmt: skip
    args = p.parse_args(argv)
    ns = args.n if args.n is not None else ([100, 1000] if args.quick else [100, 1000, 5000])

    def log(msg: str) -> None:
        print(f"[scale] {msg}", file=sys.stderr, flush=True)

    log(f"substitution: {SUBSTITUTION}")
    info = machine()
    log(f"machine: {info['cpu']}, {info['cores']} cores, load average {info['load_avg_start']:.1f} at start "
        "(a shared machine: figures are upper bounds)")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="dtsweep-scale-", dir=args.workdir) as d, contextlib.ExitStack() as stack:
        os.environ.setdefault("DTSWEEP_DATA_DIR", str(Path(d) / "datasets"))
        storage = d
        if args.s3:
            from s3server import moto_s3

            endpoint = stack.enter_context(moto_s3([S3_BUCKET], str(Path(d) / "moto.log")))
            storage = f"s3://{S3_BUCKET}/{Path(d).name}"
            log(f"storage: {storage} on the S3 server at {endpoint}")
        results = [measure(n, storage, Path(d), log) for n in ns]
        finished_ns = args.finished if args.finished is not None else ([] if (args.quick or args.n is not None) else [5000])
        finished = [measure_finished(n, storage, log) for n in finished_ns]
    info["load_avg_end"] = os.getloadavg()[0]
    growth = None
    if results:
        small, large = results[0], results[-1]
        growth = round(large["per_trial_overhead_s"] / small["per_trial_overhead_s"], 3)
        log(f"overhead_growth (per-trial overhead at N={large['n_trials']} / at N={small['n_trials']}): {growth}")
    out = {
        "benchmark": "scale",
        "substitution": SUBSTITUTION,
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": info,
        "storage": "s3 (moto server on 127.0.0.1)" if args.s3 else "local disk",
        "results": {str(r["n_trials"]): r for r in results},
        "overhead_growth": growth,
        "finished_sweeps": {str(r["n_trials"]): r for r in finished},
    }
    text = json.dumps(out, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0 if all(r["all_finished"] for r in results + finished) else 1


if __name__ == "__main__":
    sys.exit(main())
