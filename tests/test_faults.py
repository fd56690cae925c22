"""Sweeps survive lost nodes, killed drivers and failing trials, with nothing lost.

Real Ray everywhere: a multi-node cluster on this machine (ray.cluster_utils.Cluster),
a real `python -m dtsweep run` killed with SIGKILL, a real I/O error inside a trial.
Each test gives Ray a private temp dir (RAY_TMPDIR), so it neither finds nor disturbs
other Ray instances on the machine, and kills only processes it started.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dtsweep.cli import main
from dtsweep.orchestrate import epochs_done, latest_resume_checkpoints, run_sweep, sweep_status
from dtsweep.spec import parse_spec
from dtsweep.store import Store, sha256_file

pytestmark = pytest.mark.slow


def tiny_sweep(storage, studies, **ray):
    """A sweep of tiny real trials: 1-block 16-wide DT, hopper-random, short epochs."""
    return {
        "name": "faults",
        "storage": str(storage),
        "defaults": {
            "context_len": 5,
            "dataset": ["hopper-random"],
            "data": {"steps": 3000, "seed": 0},
            "model": {"n_layer": 1, "n_embd": 16, "n_head": 1},
            "train": {"epochs": 2, "steps_per_epoch": 4, "batch_size": 8, "warmup_steps": 2},
            "eval": {"episodes": 2, "max_steps": 30, "action_error_samples": 16},
            "checkpoint_epochs": [0, "final"],
        },
        "studies": studies,
        "ray": {"num_cpus": 2, "max_failures": 0, **ray},
    }


def ray_processes(ray_tmpdir: str) -> list[int]:
    """Running processes (zombies excluded) started with this test's RAY_TMPDIR: the driver,
    its Ray services and their workers (which live in process groups of their own)."""
    mark = f"RAY_TMPDIR={ray_tmpdir}".encode()
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if mark in (proc / "environ").read_bytes().split(b"\0") and "Z" != (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]:
                pids.append(int(proc.name))
        except OSError:  # exited while we looked, or not ours to read
            continue
    return pids


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def ray_tmpdir(monkeypatch):
    # Short path: Ray's Unix sockets live below it (108-byte limit).
    d = tempfile.mkdtemp(prefix="dtsw-", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", d)
    yield d
    kill_all(ray_processes(d))  # normally none: every Ray here is shut down or dies with its driver
    shutil.rmtree(d, ignore_errors=True)


def wait_for(condition, timeout_s: float, what: str, poll_s: float = 0.1):
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def checkpointed_epoch(store: Store, tid: str) -> int:
    """Epoch of the trial's newest complete resume checkpoint on storage (-1: none yet)."""
    return latest_resume_checkpoints(store).get(tid, (-1, ""))[0]


def metrics_rows(store: Store, tid: str) -> pd.DataFrame:
    rel = f"metrics/{tid}.parquet"
    return store.read_pandas(rel) if store.exists(rel) else pd.DataFrame(columns=["epoch"])


def file_bytes(root: Path, tid: str) -> dict[str, bytes]:
    """Every output file of one trial (metrics and checkpoints), path -> bytes."""
    paths = [root / "metrics" / f"{tid}.parquet", *sorted((root / "checkpoints" / tid).glob("*"))]
    return {str(p): p.read_bytes() for p in paths}


def assert_one_row_per_epoch(sweep_dir: str, spec) -> None:
    m = pd.read_parquet(f"{sweep_dir}/metrics.parquet")
    for t in spec.trials():
        epochs = m[m.trial_id == t.trial_id]["epoch"].tolist()
        assert epochs == list(range(t.epochs + 1)), (t.trial_id, epochs)


# --------------------------------------------------------------------------------------
# A worker node lost mid-trial
# --------------------------------------------------------------------------------------


def test_lost_node_trial_resumes_on_another_node(tmp_path, data_cache, ray_tmpdir):
    import ray
    from ray.cluster_utils import Cluster

    epochs = 8
    raw = tiny_sweep(f"file://{tmp_path}", [{"name": "main", "init": "random", "seed": [0]}], max_failures=2)
    # Long enough epochs that the node is gone well before the trial could finish.
    raw["defaults"]["train"].update(epochs=epochs, steps_per_epoch=150)
    spec = parse_spec(raw)
    (trial,) = spec.trials()
    store = Store(spec.sweep_dir)

    # The head schedules nothing (0 CPUs), so the trial must run on a worker node; node A
    # is the only one, so that is where it starts. Node A is killed as soon as an epoch is
    # trained; node B, added after that, is where the trial has to go on.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        node_a = cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        out = {}

        def sweep_in_background():
            try:
                out["summary"] = run_sweep(spec, log=lambda *_: None)
            except BaseException as e:  # re-raised below, in the test's thread
                out["error"] = e

        sweep = threading.Thread(target=sweep_in_background)
        sweep.start()

        wait_for(
            lambda: checkpointed_epoch(store, trial.trial_id) >= 1 or not sweep.is_alive(),
            240,
            "the checkpoint of the first trained epoch",
        )
        assert sweep.is_alive(), f"the sweep ended early: {out}"
        time.sleep(1)  # for Tune's driver to register that checkpoint
        cluster.remove_node(node_a, allow_graceful=False)  # SIGKILL, like a reclaimed spot node
        before = metrics_rows(store, trial.trial_id)
        assert epochs_done(store, trial.trial_id) < epochs, "the trial finished before its node was lost"
        cluster.add_node(num_cpus=1)

        sweep.join(timeout=300)
        assert not sweep.is_alive(), "the sweep did not finish after the node loss"
    finally:
        ray.shutdown()
        cluster.shutdown()

    if "error" in out:
        raise out["error"]
    summary = out["summary"]
    assert (summary.finished, summary.failed) == (1, 0)
    assert_one_row_per_epoch(spec.sweep_dir, spec)
    # Resumed, not restarted: the epochs up to the checkpoint keep the rows computed on
    # node A (a fresh start would recompute them, with other wall times).
    after = pd.read_parquet(f"{spec.sweep_dir}/metrics.parquet")
    merged = before[before.epoch <= 1].merge(after, on="epoch", suffixes=("_before", "_after"))
    assert len(merged) == 2
    assert (merged.wall_time_s_before == merged.wall_time_s_after).all()
    assert sweep_status(spec.sweep_dir)["counts"] == {"finished": 1}


# --------------------------------------------------------------------------------------
# The driver killed mid-sweep
# --------------------------------------------------------------------------------------


def test_killed_driver_rerun_finishes_only_the_rest(tmp_path, data_cache, ray_tmpdir, capsys):
    long_epochs = 8
    # Storage as a file:// URI: Tune's storage_path, the trials' outputs and the resume
    # checkpoint handed to the second driver all take the path an s3:// sweep takes.
    raw = tiny_sweep(
        f"file://{tmp_path}/runs",
        [
            {"name": "short", "init": "random", "seed": [0], "train": {"epochs": 1}},
            {"name": "long", "init": "random", "seed": [1], "train": {"epochs": long_epochs, "steps_per_epoch": 150}},
        ],
    )
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    spec = parse_spec(raw)
    short, long = spec.trials()
    store = Store(spec.sweep_dir)
    local_dir = tmp_path / "runs" / "faults"
    cmd = [sys.executable, "-m", "dtsweep", "run", str(spec_path)]

    # Every process of this driver's Ray carries the test's own RAY_TMPDIR in its environment,
    # so the test can make sure all of them are gone without touching anyone else's Ray.
    with open(tmp_path / "first.log", "w") as log:
        driver = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(
            lambda: epochs_done(store, short.trial_id) >= short.epochs and checkpointed_epoch(store, long.trial_id) >= 1,
            300,
            "the short trial to finish and the long one to checkpoint an epoch",
        )
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        # Ray's processes die with the driver that started them (Ray ties their fate to it);
        # whatever is still running after 30 s is killed here, by pid. A trial's worker may
        # finish the epoch it is in before it notices: the outputs are read after that.
        try:
            wait_for(lambda: not ray_processes(ray_tmpdir), 30, "Ray processes of the killed driver to exit")
        except AssertionError:
            kill_all(ray_processes(ray_tmpdir))
            wait_for(lambda: not ray_processes(ray_tmpdir), 30, "the killed driver's Ray processes to exit")
    finally:
        kill_all(ray_processes(ray_tmpdir))
    at_kill = epochs_done(store, long.trial_id)
    before = metrics_rows(store, long.trial_id)
    assert at_kill < long_epochs, "the long trial finished before the driver was killed"
    untouched = file_bytes(local_dir, short.trial_id)

    capsys.readouterr()
    assert main(cmd[3:]) == 0  # the same command, in this process: no second torch import
    out = capsys.readouterr().out
    assert "2 trials, 1 finished, 1 to run" in out
    assert f"resuming {long.trial_id} from epoch " in out
    resumed_from = int(out.split(f"resuming {long.trial_id} from epoch ")[1].split()[0])
    assert 1 <= resumed_from <= at_kill

    assert file_bytes(local_dir, short.trial_id) == untouched
    assert_one_row_per_epoch(spec.sweep_dir, spec)
    after = pd.read_parquet(f"{spec.sweep_dir}/metrics.parquet")
    merged = before[before.epoch <= resumed_from].merge(
        after[after.trial_id == long.trial_id], on="epoch", suffixes=("_before", "_after")
    )
    assert len(merged) == resumed_from + 1
    assert (merged.wall_time_s_before == merged.wall_time_s_after).all()
    assert set(pd.read_parquet(f"{spec.sweep_dir}/trials.parquet")["status"]) == {"finished"}
    ck = pd.read_parquet(f"{spec.sweep_dir}/checkpoints.parquet")
    assert all(path.startswith(f"file://{local_dir}/checkpoints/") for path in ck.path)
    assert sha256_file(ck.path.iloc[-1]) == ck.sha256.iloc[-1]


# --------------------------------------------------------------------------------------
# A trial that raises, then --retry-failed
# --------------------------------------------------------------------------------------


def test_failed_trial_is_kept_failed_then_retried(tmp_path, data_cache, ray_tmpdir, capsys):
    raw = tiny_sweep(tmp_path / "runs", [{"name": "main", "init": "random", "seed": [0, 1]}])
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    spec = parse_spec(raw)
    healthy, broken = spec.trials()
    root = Path(spec.sweep_dir)
    # A regular file where the broken trial's checkpoint directory goes: its first
    # checkpoint write raises a real OSError inside the Ray worker.
    blocker = root / "checkpoints" / broken.trial_id
    blocker.parent.mkdir(parents=True)
    blocker.write_text("in the way")

    summary = run_sweep(spec, log=lambda *_: None)
    assert (summary.finished, summary.failed) == (1, 1)
    capsys.readouterr()
    assert main(["status", str(root)]) == 0
    status = capsys.readouterr().out
    assert "1 failed, 1 finished" in status
    (line,) = [ln for ln in status.splitlines() if ln.strip().startswith("failed")]
    assert broken.trial_id in line and "seed=1" in line and "Error" in line

    # A plain rerun leaves a failed trial alone (and says how to retry it).
    lines = []
    assert run_sweep(spec, log=lines.append).ran == 0
    assert "rerun with --retry-failed" in lines[0]

    untouched = file_bytes(root, healthy.trial_id)
    blocker.unlink()
    capsys.readouterr()
    assert main(["run", str(spec_path), "--retry-failed"]) == 0
    assert "1 finished, 1 to run" in capsys.readouterr().out
    assert sweep_status(str(root))["counts"] == {"finished": 2}
    assert file_bytes(root, healthy.trial_id) == untouched
    assert_one_row_per_epoch(str(root), spec)
