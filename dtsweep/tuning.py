"""Ray Tune wiring shared by grid studies (`dtsweep.orchestrate`) and searches (`dtsweep.search`):
the trainable, its placement, the one Tuner builder, the progress callback and error lines.

Each Tune trial carries one config entry, `{"job": {...}}` (the grid passes it as a JSON string;
read it with `job_of`): trial_id, the trial's settings (`Trial.to_dict()`), the sweep directory,
the dataset file the driver resolved and published, the published local init directories
(`dtsweep.inputs`), and the resume state the driver found (the trainable looks up the newest
itself). Everything a trial writes goes to the sweep directory (`dtsweep.train.loop`); Tune's
own results serve progress lines and schedulers only.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import re
import sys
import time
from pathlib import Path

from dtsweep.spec import SweepSpec, Trial
from dtsweep.store import Store
from dtsweep.sweepdir import TUNE_DIR, Ledger, latest_resume_state, load_resume_state, save_resume_state, trial_name
from dtsweep.tracking import logger_callbacks

# --------------------------------------------------------------------------------------
# The trainable (runs in a Ray worker)
# --------------------------------------------------------------------------------------


def train_trial(config: dict) -> None:
    """Tune function trainable: run one trial, saving a resume state and reporting each epoch."""
    from dtsweep.inputs import fetch_inits
    from dtsweep.models.backbones import use_local_copies
    from dtsweep.train import set_threads_for_trial

    job = job_of(config)
    trial = Trial.from_dict(job["trial"])
    set_threads_for_trial(trial.resources.cpu)
    # The driver resolved and published the inputs once (dtsweep.inputs); the trial reads this
    # node's verified copies of them: the dataset file, and any local init directory.
    with use_local_copies(fetch_inits(job.get("inits", {}))):
        _train(trial, job)


def _train(trial: Trial, job: dict) -> None:
    import torch

    from dtsweep.train import TrialRunner

    # Only a trial Ray gave a GPU share may use one: a CPU-only trial on a GPU node sees every
    # GPU of the node (Ray sets no CUDA_VISIBLE_DEVICES for it) and would crowd cuda:0.
    device = torch.device("cuda" if trial.resources.gpu > 0 and torch.cuda.is_available() else "cpu")
    runner = TrialRunner(trial, Store(job["sweep_dir"]), dataset=job.get("dataset"), device=device)

    # The newest resume state on storage: left by an earlier driver, or by this trial before
    # Tune restarted it (a lost node, an error). Looked up here rather than taken from the
    # driver, which may know an older one.
    resume = latest_resume_state(runner.store, trial.trial_id)
    if resume is not None:
        runner.load_resume_state(load_resume_state(resume[1]))

    def report(row: dict, r: TrialRunner) -> None:
        metrics = {k: v for k, v in row.items() if isinstance(v, (int, float)) and v is not None}
        metrics["epochs_total"] = trial.epochs
        report_epoch(metrics, r.resume_state(), r.store)

    runner.run(on_epoch=report)


def report_epoch(metrics: dict, state: dict, store: Store) -> None:
    """Save `state` (with "trial_id" and "epoch") as the trial's resume state, then tune.report(metrics)."""
    from ray import tune

    save_resume_state(store, state)
    tune.report(metrics)


def job_config(t: Trial, store: Store, *, has_gpu: bool, dataset: dict | None = None, resume_from: str | None = None,
               inits: dict | None = None, **extra) -> dict:  # fmt: skip
    """The `{"job": ...}` config of one Tune trial (see the module docstring). `inits`: the
    published local init directories the trial reads (`dtsweep.inputs.trial_inits`)."""
    d = t.to_dict()
    if not has_gpu:
        d["resources"]["gpu"] = 0.0
    job = {"trial_id": t.trial_id, "trial": d, "sweep_dir": store.uri(), **extra}
    if dataset is not None:
        job["dataset"] = dataset
    if inits:
        job["inits"] = inits
    if resume_from is not None:
        job["resume_from"] = resume_from
    return {"job": job}


def job_of(config: dict) -> dict:
    """The job of a Tune trial's config: `{"job": {...}}`, or `{"job": "<the same as JSON>"}` as
    the grid passes it (Tune deep-copies its whole grid for every trial it creates: a list of
    strings costs little, a list of nested dicts costs time that grows with the grid's size)."""
    job = config["job"]
    return json.loads(job) if isinstance(job, str) else job


def trial_placement(config: dict, *, has_gpu: bool):
    """Tune placement of one trial: its spec's CPUs, and its GPU share where the cluster has GPUs."""
    from ray import tune

    r = job_of(config)["trial"]["resources"]
    bundle = {"CPU": r["cpu"]}
    if has_gpu and r["gpu"] > 0:
        bundle["GPU"] = r["gpu"]
    return tune.PlacementGroupFactory([bundle])


# --------------------------------------------------------------------------------------
# The Tuner
# --------------------------------------------------------------------------------------


def run_name(prefix: str) -> str:
    """A Tune experiment name unique per run: a rerun seconds after a killed driver must not reuse its directory."""
    return f"{prefix}-{dt.datetime.now():%Y%m%d-%H%M%S}-{os.urandom(2).hex()}"


def build_tuner(trainable, *, spec: SweepSpec, store: Store, name: str, has_gpu: bool, callbacks: list,
                param_space: dict | None = None, **tune_config):  # fmt: skip
    """A Tuner running `trainable` with each trial's placement, Tune's state under `<sweep>/_tune/<name>`
    (trials save their own resume states: `dtsweep.sweepdir.save_resume_state`), `callbacks` and the spec's tracking loggers
    (`dtsweep.tracking`), and `tune_config` (TuneConfig's arguments). Trials are named (and their
    directories too) by `trial_name`, so TensorBoard, MLflow and W&B show readable runs."""
    from ray import tune

    # Tune warns when it syncs its experiment state to storage more often than a threshold (every
    # epoch report of many short trials does); dtsweep does not resume from that state, and the
    # warning would drown the progress lines. (Its warning that one sync takes long stays on.)
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's own SIGINT handler ends the experiment "gracefully": every unstarted trial comes
    # back as an error and a Tuner.restore hint is printed. Without it Ctrl-C raises
    # KeyboardInterrupt in the driver; the caller records the interrupt and the next run resumes.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    # Epoch 0 (before training) has no evaluation, so its result lacks normalized_score; a
    # search's ASHA skips such results, but Tune's strict metric check would fail the trial.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"

    def readable_name(tr) -> str:
        return trial_name(Trial.from_dict(job_of(tr.config)["trial"]))

    return tune.Tuner(
        tune.with_resources(trainable, functools.partial(trial_placement, has_gpu=has_gpu)),
        param_space=param_space,
        tune_config=tune.TuneConfig(trial_name_creator=readable_name, trial_dirname_creator=readable_name, **tune_config),
        run_config=tune.RunConfig(
            name=name,
            storage_path=store.uri(TUNE_DIR),
            failure_config=tune.FailureConfig(max_failures=spec.ray.max_failures),
            callbacks=callbacks + logger_callbacks(spec.ray.loggers, sweep_name=spec.name),
            verbose=0,
        ),
    )


def fit_errors(results) -> dict[str, str | None]:
    """trial_id -> error line (None if it ended without error) of a Tuner.fit() ResultGrid."""
    out = {}
    for res in results:
        if res.config:  # Tune returns config-less results after an interrupt
            out[job_of(res.config)["trial_id"]] = None if res.error is None else error_text(res.error)
    return out


# --------------------------------------------------------------------------------------
# Progress lines and error lines
# --------------------------------------------------------------------------------------


def progress_callback(*, n_total: int, n_done: int, work_epochs: int, ledger: Ledger | None = None, label: str = ""):
    """A tune.Callback printing one line per trial start, epoch and end on stderr, with an ETA.

    n_total / n_done: trials of the whole run and those finished before it; work_epochs: the
    epochs this run has to train (the ETA extrapolates the epochs trained so far). With a
    `ledger`, trial starts, completions and errors are recorded in it.
    """
    from ray import tune

    prefix = f"{label} " if label else ""

    class Progress(tune.Callback):
        def __init__(self):
            self.t0 = time.time()
            self.done, self.failed, self.epochs = n_done, 0, 0

        def _line(self, msg: str) -> None:
            el = time.time() - self.t0
            eta = ""
            if self.epochs and work_epochs > self.epochs:
                eta = f", ETA {_duration(el / self.epochs * (work_epochs - self.epochs))}"
            print(f"[dtsweep {el:6.0f}s] {prefix}{self.done}/{n_total} done, {self.failed} failed{eta} | {msg}",
                  file=sys.stderr, flush=True)  # fmt: skip

        def on_trial_start(self, iteration, trials, trial, **info):
            job = job_of(trial.config)
            if ledger is not None:
                ledger.set(job["trial_id"], "running")
            self._line(f"start {job['trial_id']} {describe(Trial.from_dict(job['trial']))}")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            epoch = result.get("epoch")
            if isinstance(epoch, int) and epoch >= 1:
                self.epochs += 1
            score = result.get("normalized_score")
            s = f" score {score:.1f}" if isinstance(score, float) else ""
            self._line(f"{job_of(trial.config)['trial_id']} epoch {epoch}/{result.get('epochs_total')}{s}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            tid = job_of(trial.config)["trial_id"]
            self.done += 1
            if ledger is not None:
                ledger.set(tid, "finished")
            self._line(f"finished {tid}")

        def on_trial_error(self, iteration, trials, trial, **info):
            tid = job_of(trial.config)["trial_id"]
            self.failed += 1
            line = _error_line(trial)
            if ledger is not None:
                ledger.set(tid, "failed", line)
            self._line(f"FAILED {tid}: {line}")

    return Progress()


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def describe(t: Trial) -> str:
    """ "(init dataset K=.. seed=..)" of a trial, for progress and log lines."""
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
