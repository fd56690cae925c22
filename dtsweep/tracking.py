"""Experiment tracking: the spec's `ray.loggers` as Ray Tune's own logger callbacks.

    ray:
      loggers: [tensorboard, {mlflow: {tracking_uri: file:///data/mlruns}}, {wandb: {project: dt}}]

Each name switches on the callback Tune ships for that tool; dtsweep only fills in defaults
(the sweep's name as MLflow experiment and W&B project) and checks before a run that the
tool's package is installed. Every Tune trial is one run in each tool, named by its readable
trial name (`dtsweep.sweepdir.trial_name`, e.g. `gpt2-hopper-medium-K20-s3-1a2b3c4d`), with
one point per epoch of what the trial reports (normalized_score, train_loss, ...: Tune's
step is the report count, epoch 0 being step 1). The sweep directory stays the source of
truth: these are views of the same numbers in the tools researchers already use.

- tensorboard: tensorboardX event files in each trial's Tune directory,
  `<sweep>/_tune/<run>/<trial name>/events.out.tfevents.*` (`tensorboard --logdir <sweep>/_tune`).
- mlflow: one MLflow run per trial in experiment `experiment_name` (default: MLFLOW_EXPERIMENT_NAME,
  else the sweep's name) at `tracking_uri` (default: MLFLOW_TRACKING_URI, else MLflow's default,
  `./mlflow.db` with MLflow 3). MLflow 3 takes a file store (file:///path/mlruns) only with
  MLFLOW_ALLOW_FILE_STORE=true; checked before the run.
- wandb: one W&B run per trial in `project` (default: WANDB_PROJECT, else the sweep's name);
  `mode: offline` (or WANDB_MODE=offline in the environment Ray starts with) keeps the runs in
  local `wandb/` directories for a later `wandb sync`.
"""

from __future__ import annotations

import importlib.util
import os
import urllib.parse

from dtsweep.spec import TrackingLogger

# logger name -> (module Tune's callback imports, the package that provides it)
PACKAGES = {"tensorboard": ("tensorboardX", "tensorboardX"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}


class TrackingError(Exception):
    """A logger of the spec cannot be used here; `str(err)` is one line saying how to fix it."""


def check_loggers(loggers: tuple[TrackingLogger, ...]) -> None:
    """Raise TrackingError if a logger cannot work here: its package is missing (checked without
    importing it), or MLflow would refuse its file store. Cheap, writes nothing."""
    for lg in loggers:
        module, package = PACKAGES[lg.name]
        if importlib.util.find_spec(module) is None:
            raise TrackingError(f"ray.loggers: {lg.name} needs the {package} package, which is not installed; "
                                f"pip install 'dtsweep[tracking]' (or pip install {package})")  # fmt: skip
        if lg.name == "mlflow":
            _check_mlflow_file_store(lg.settings.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI"))


def _check_mlflow_file_store(uri: str | None) -> None:
    """MLflow 3 keeps file stores (file:///path, a plain path) in maintenance mode and refuses them
    unless MLFLOW_ALLOW_FILE_STORE=true; without this check the refusal is a traceback at the
    start of Tuner.fit."""
    if uri is None or urllib.parse.urlparse(uri).scheme not in ("", "file"):
        return  # MLflow's default store, a database or a tracking server
    try:
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
    except ImportError:  # an MLflow from before the refusal: file stores need no opt-in
        return
    if not MLFLOW_ALLOW_FILE_STORE.get():
        raise TrackingError(f"ray.loggers: mlflow tracking_uri {uri!r} is a file store, which this MLflow refuses "
                            "unless MLFLOW_ALLOW_FILE_STORE=true is set; set it, or use a database "
                            "(sqlite:///path/mlflow.db) or a tracking server")  # fmt: skip


def logger_callbacks(loggers: tuple[TrackingLogger, ...], *, sweep_name: str) -> list:
    """Tune callbacks for `loggers` (RayConfig.loggers), in the spec's order; TrackingError
    (before any trial starts) if one cannot work here."""
    check_loggers(loggers)
    out = []
    for lg in loggers:
        s = lg.settings
        if lg.name == "tensorboard":
            from ray.tune.logger import TBXLoggerCallback

            out.append(TBXLoggerCallback())
        elif lg.name == "mlflow":
            from ray.air.integrations.mlflow import MLflowLoggerCallback

            # Tune's callback needs an experiment name or id; MLFLOW_EXPERIMENT_ID, when set, wins.
            experiment = s.get("experiment_name") or os.environ.get("MLFLOW_EXPERIMENT_NAME") or sweep_name
            tags = {k: str(v) for k, v in s.get("tags", {}).items()}  # MLflow tags are strings
            out.append(MLflowLoggerCallback(tracking_uri=s.get("tracking_uri"), experiment_name=experiment, tags=tags))
        elif lg.name == "wandb":
            from ray.air.integrations.wandb import WandbLoggerCallback

            project = s.get("project") or os.environ.get("WANDB_PROJECT") or sweep_name
            if s.get("mode") in ("offline", "disabled"):
                # Tune's callback demands an API key unless W&B's own switch, WANDB_MODE, says
                # offline; the spec's mode is that switch (an API key is no use offline).
                os.environ["WANDB_MODE"] = s["mode"]
            # entity, mode and tags go to wandb.init as they are (Tune passes extra keywords on).
            extra = {k: s[k] for k in ("entity", "mode", "tags") if k in s}
            out.append(WandbLoggerCallback(project=project, group=s.get("group"), **extra))
        else:  # spec.LOGGERS and this function name the same tools
            raise AssertionError(f"no callback for logger {lg.name!r}")
    return out
