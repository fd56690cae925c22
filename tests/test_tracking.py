"""Experiment tracking: `ray.loggers` switches on Ray Tune's own TensorBoard, MLflow and W&B
callbacks. One tiny real sweep (two trials, two epochs) through `dtsweep run` with all three,
read back with each tool's own reader."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dtsweep.cli import main
from dtsweep.spec import SpecError, TrackingLogger, parse_spec
from dtsweep.store import Store
from dtsweep.sweepdir import TUNE_DIR, latest_resume_checkpoints, trial_name

EPOCHS = 2
RAW = {
    "name": "tracked",
    "defaults": {
        "context_len": 5,
        "data": {"steps": 3000, "seed": 0},
        "model": {"n_layer": 1, "n_embd": 16, "n_head": 1},
        "train": {"epochs": EPOCHS, "steps_per_epoch": 4, "batch_size": 8, "warmup_steps": 2},
        "eval": {"episodes": 2, "max_steps": 30, "action_error_samples": 16},
        "checkpoint_epochs": ["final"],
    },
    "studies": [{"name": "main", "init": ["random"], "dataset": ["hopper-random"], "seed": [0, 1]}],
    "ray": {"num_cpus": 2, "max_failures": 0},
}


def write_spec(tmp_path: Path, loggers) -> Path:
    raw = json.loads(json.dumps(RAW))
    raw["storage"] = str(tmp_path / "runs")
    raw["ray"]["loggers"] = loggers
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def tracked_sweep(tmp_path_factory, data_cache):
    """The sweep, run once with all three loggers; W&B offline into a directory of its own."""
    tmp = tmp_path_factory.mktemp("tracked")
    mlruns = tmp / "mlruns"
    spec_path = write_spec(tmp, ["tensorboard", {"mlflow": {"tracking_uri": mlruns.as_uri()}}, {"wandb": {"mode": "offline"}}])
    import ray

    # W&B logs from a Ray actor, which inherits the environment of the Ray that `run` starts
    # below, not of one some other test left running.
    assert not ray.is_initialized()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(tmp / "wandb"))
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 takes a file store only when asked to
        (tmp / "wandb").mkdir()
        assert main(["run", str(spec_path)]) == 0
    spec = parse_spec(yaml.safe_load(spec_path.read_text()))
    return {"spec": spec, "mlruns": mlruns, "wandb": tmp / "wandb", "names": {trial_name(t): t for t in spec.trials()}}


def test_trials_have_readable_names(tracked_sweep):
    spec, names = tracked_sweep["spec"], tracked_sweep["names"]
    assert sorted(names) == sorted(f"random-hopper-random-K5-s{t.seed}-{t.trial_id[:8]}" for t in spec.trials())
    run_dirs = [d for d in (Path(spec.sweep_dir) / TUNE_DIR).iterdir() if d.name != "resume"]
    (run_dir,) = run_dirs
    assert {d.name for d in run_dir.iterdir() if d.is_dir()} == set(names)
    # Resume states live apart from Tune's (readable) trial directories, keyed by trial_id;
    # both trials finished, so none is left.
    assert latest_resume_checkpoints(Store(spec.sweep_dir)) == {}


def test_tensorboard_event_files_hold_normalized_score_per_epoch(tracked_sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec, names = tracked_sweep["spec"], tracked_sweep["names"]
    (run_dir,) = (Path(spec.sweep_dir) / TUNE_DIR).iterdir()
    for name in names:
        acc = EventAccumulator(str(run_dir / name))
        acc.Reload()
        # Tune's step is the report count (epoch 0, before training, is step 1); the epoch
        # scalar maps steps to epochs. Epoch 0 has no evaluation, so no score.
        epoch_of = {e.step: int(e.value) for e in acc.Scalars("ray/tune/epoch")}
        assert sorted(epoch_of.values()) == list(range(EPOCHS + 1))
        scores = acc.Scalars("ray/tune/normalized_score")
        assert sorted(epoch_of[e.step] for e in scores) == list(range(1, EPOCHS + 1))
        assert all(abs(e.value) < 1e6 for e in scores)  # finite D4RL scores


def test_mlflow_file_store_has_one_run_per_trial(tracked_sweep):
    from mlflow.tracking import MlflowClient

    spec, names = tracked_sweep["spec"], tracked_sweep["names"]
    client = MlflowClient(tracking_uri=tracked_sweep["mlruns"].as_uri())
    experiment = client.get_experiment_by_name(spec.name)  # default experiment: the sweep's name
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(names)
    for r in runs:
        assert r.info.status == "FINISHED"
        # The grid hands Tune each job as one JSON string (dtsweep.tuning.job_of): MLflow logs it as one param.
        assert json.loads(r.data.params["job"])["trial_id"] == names[r.info.run_name].trial_id
        history = client.get_metric_history(r.info.run_id, "normalized_score")
        assert len(history) == EPOCHS
        assert r.data.metrics["epoch"] == EPOCHS


def test_wandb_offline_writes_a_run_directory_per_trial(tracked_sweep):
    runs = sorted((tracked_sweep["wandb"] / "wandb").glob("offline-run-*"))
    assert len(runs) == len(tracked_sweep["names"])
    for run in runs:
        # The run's record file (what `wandb sync` uploads later). Its contents are not checked:
        # with Ray 2.60 and wandb 0.31, Tune's callback can ray.kill the logging actor (and the
        # wandb-core process under it) while wandb.finish() still flushes, leaving only the
        # file's header (seen in one of three runs of this test on a loaded machine).
        (records,) = run.glob("run-*.wandb")
        assert records.stat().st_size > 0


def test_loggers_do_not_change_trial_ids(tmp_path):
    plain = parse_spec(yaml.safe_load(write_spec(tmp_path, None).read_text()))
    tracked = parse_spec(yaml.safe_load(write_spec(tmp_path, ["tensorboard", "mlflow", "wandb"]).read_text()))
    assert [t.trial_id for t in plain.trials()] == [t.trial_id for t in tracked.trials()]
    assert tracked.ray.loggers == (TrackingLogger("tensorboard"), TrackingLogger("mlflow"), TrackingLogger("wandb"))


@pytest.mark.parametrize(
    "loggers, message",
    [
        (["tensorbord"], "ray.loggers[0]: unknown logger 'tensorbord'; did you mean 'tensorboard'?"),
        ([{"wandb": {"projet": "x"}}], "ray.loggers[0].wandb.projet: unknown key; did you mean 'project'?"),
        ([{"wandb": {"mode": "sometimes"}}], "ray.loggers[0].wandb.mode: 'sometimes' is not valid"),
        ([{"mlflow": {"tracking_uri": 5}}], "ray.loggers[0].mlflow.tracking_uri: 5 is not valid"),
        ([{"tensorboard": {"dir": "x"}}], "ray.loggers[0].tensorboard: {'dir': 'x'} is not valid"),
        (["mlflow", "mlflow"], "ray.loggers[1]: 'mlflow' is not valid; expected each logger at most once"),
        ("wandb", "ray.loggers: 'wandb' is not valid; expected a list of loggers"),
    ],
)
def test_bad_loggers_are_one_line_spec_errors(tmp_path, loggers, message):
    with pytest.raises(SpecError) as e:
        parse_spec(yaml.safe_load(write_spec(tmp_path, loggers).read_text()))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_missing_tracking_package_fails_before_anything_runs(tmp_path):
    # A fresh interpreter where `import wandb` fails as if it were not installed (None in
    # sys.modules is Python's own "cannot be imported" marker); the real CLI runs in it.
    spec_path = write_spec(tmp_path, ["tensorboard", "wandb"])
    code = f"import sys; sys.modules['wandb'] = None; from dtsweep.cli import main; sys.exit(main(['run', {str(spec_path)!r}]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, timeout=300)
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: ray.loggers: wandb needs the wandb package") and "dtsweep[tracking]" in line
    assert not (tmp_path / "runs").exists()  # nothing written, nothing trained


def test_an_mlflow_file_store_without_the_opt_in_fails_before_anything_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    spec_path = write_spec(tmp_path, [{"mlflow": {"tracking_uri": (tmp_path / "mlruns").as_uri()}}])
    assert main(["run", str(spec_path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ray.loggers: mlflow tracking_uri") and "MLFLOW_ALLOW_FILE_STORE=true" in line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlruns").exists()
