"""Sweeps survive lost nodes, killed drivers and failing trials, with nothing lost.

Real Ray everywhere: a multi-node cluster on this machine (ray.cluster_utils.Cluster),
a real `dtsweep run` killed with SIGKILL, a real I/O error inside a trial.
Each test gives Ray a private temp dir (RAY_TMPDIR), so it neither finds nor disturbs
other Ray instances on the machine, and kills only processes it started.
"""

import json
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
from dtsweep.orchestrate import run_sweep
from dtsweep.spec import parse_spec
from dtsweep.store import Store, load_checkpoint, sha256_file
from dtsweep.sweepdir import epochs_done, latest_resume_checkpoints, sweep_status

pytestmark = pytest.mark.slow


def short_and_long_studies(long_epochs: int) -> list[dict]:
    """A 1-epoch trial (seed 0) and one of `long_epochs` epochs (seed 1) that a test can kill mid-run."""
    return [
        {"name": "short", "init": "random", "seed": [0], "train": {"epochs": 1}},
        {"name": "long", "init": "random", "seed": [1], "train": {"epochs": long_epochs, "steps_per_epoch": 150}},
    ]


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
            if (
                mark in (proc / "environ").read_bytes().split(b"\0")
                and "Z" != (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            ):
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
        short_and_long_studies(long_epochs),
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
    # Relative to the sweep directory; opened through the store, they are file:// URIs.
    assert all(path.startswith("checkpoints/") for path in ck.path)
    assert store.resolve_rel(ck.path.iloc[-1]).startswith(f"file://{local_dir}/checkpoints/")
    assert sha256_file(store.resolve_rel(ck.path.iloc[-1])) == ck.sha256.iloc[-1]


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
    assert broken.trial_id in line and "seed=1" in line
    # The exception the trial raised, not Ray's coloured wrapper header, and where its traceback is.
    (error,) = [f["error"] for f in sweep_status(str(root))["failures"]]
    assert error.split(":")[0] in ("NotADirectoryError", "FileExistsError", "OSError"), error
    assert "\x1b" not in error and "RayTaskError" not in error and "ray::" not in error
    traceback_file = line.split("(traceback: ")[1].rstrip(")")
    # Tune's error file holds the frames (Ray prints them without a "Traceback" header).
    text = Path(traceback_file).read_text()
    assert traceback_file.startswith(str(root / "_tune")) and 'File "' in text and error.split(":")[0] in text

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


# --------------------------------------------------------------------------------------
# Ctrl-C (SIGINT) mid-run, a second run while one is active, then a rerun
# --------------------------------------------------------------------------------------


def test_sigint_stops_cleanly_rerun_resumes(tmp_path, data_cache, ray_tmpdir, capsys, monkeypatch):
    raw = tiny_sweep(
        tmp_path / "runs",
        [
            # Still running when SIGINT comes right after its first checkpoint; the rerun trains
            # only what is left.
            {"name": "long", "init": "random", "seed": [1], "train": {"epochs": 30, "steps_per_epoch": 150}},
            {"name": "later", "init": "random", "seed": [2], "train": {"epochs": 1}},
        ],
        max_concurrent_trials=1,  # "later" waits for "long": it has not started at the interrupt
    )
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    spec = parse_spec(raw)
    long, later = spec.trials()
    store = Store(spec.sweep_dir)
    cmd = [sys.executable, "-m", "dtsweep", "run", str(spec_path)]
    with open(tmp_path / "first.out", "w") as out, open(tmp_path / "first.err", "w") as err:
        # SIGINT's default handling restored in the child: a suite started with SIGINT ignored
        # (nohup, some CI runners) passes that on, and Python then never raises KeyboardInterrupt.
        driver = subprocess.Popen(cmd, stdout=out, stderr=err, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(lambda: checkpointed_epoch(store, long.trial_id) >= 1, 300, "the long trial to checkpoint an epoch")
        # SIGINT at once: on an idle machine the long trial ends within seconds. A second `run`
        # during a live one is tested in test_live_lease_refuses_a_second_run_before_anything_is_written.
        os.kill(driver.pid, signal.SIGINT)
        assert driver.wait(timeout=120) == 130
        wait_for(lambda: not ray_processes(ray_tmpdir), 60, "the interrupted driver's Ray processes to exit")
    finally:
        if driver.poll() is None:
            driver.kill()
        kill_all(ray_processes(ray_tmpdir))
    stderr = (tmp_path / "first.err").read_text()
    assert stderr.strip().splitlines()[-1] == "interrupted; run the same command again to resume", stderr[-3000:]
    assert "Traceback" not in stderr and "Tuner.restore" not in stderr, stderr[-3000:]
    assert not store.exists("lease.json")

    at_interrupt = epochs_done(store, long.trial_id)
    ledger = pd.read_parquet(f"{spec.sweep_dir}/trials.parquet").set_index("trial_id")
    assert ledger.loc[later.trial_id, "status"] == "pending"
    assert ledger.loc[long.trial_id, "status"] == "running" and at_interrupt < long.epochs
    assert set(ledger["error"].dropna()) == set()
    st = sweep_status(spec.sweep_dir)
    assert st["run"] == "interrupted" and st["counts"] == {"interrupted": 1, "pending": 1}
    capsys.readouterr()
    assert main(["status", spec.sweep_dir]) == 0
    assert "interrupted: no run is active" in capsys.readouterr().out

    # The same command again: the long trial resumes from its last epoch, the other one starts.
    assert main(cmd[3:]) == 0
    out = capsys.readouterr().out
    assert "2 trials, 0 finished, 2 to run" in out
    resumed_from = int(out.split(f"resuming {long.trial_id} from epoch ")[1].split()[0])
    assert 1 <= resumed_from <= at_interrupt
    assert sweep_status(spec.sweep_dir)["counts"] == {"finished": 2}
    assert_one_row_per_epoch(spec.sweep_dir, spec)


# --------------------------------------------------------------------------------------
# Stale leases, damaged and moved sweep directories
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_tiny(tmp_path_factory, data_cache):
    """A finished two-trial sweep (run once per module); tests work on copies of it."""
    root = tmp_path_factory.mktemp("finished")
    raw = tiny_sweep(root / "runs", [{"name": "main", "init": "random", "seed": [0, 1]}])
    (root / "sweep.yaml").write_text(yaml.safe_dump(raw))
    ray_dir = tempfile.mkdtemp(prefix="dtsw-", dir="/tmp")
    old = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = ray_dir
    try:
        assert run_sweep(parse_spec(raw), log=lambda *_: None).finished == 2
    finally:
        kill_all(ray_processes(ray_dir))
        shutil.rmtree(ray_dir, ignore_errors=True)
        os.environ.pop("RAY_TMPDIR") if old is None else os.environ.__setitem__("RAY_TMPDIR", old)
    return raw, root / "runs" / "faults"


def copy_of(finished_tiny, dest: Path):
    """(spec of the copy, its sweep dir): the finished sweep copied to `dest`."""
    raw, src = finished_tiny
    shutil.copytree(src, dest / "faults")
    raw = {**raw, "storage": str(dest)}
    return parse_spec(raw), dest / "faults"


def test_moved_sweep_dir_reads_its_own_files(finished_tiny, tmp_path, capsys):
    spec, root = copy_of(finished_tiny, tmp_path / "first")
    moved = tmp_path / "elsewhere"
    shutil.copytree(root, moved / "faults")
    shutil.rmtree(tmp_path / "first")  # the original is gone

    store = Store(str(moved / "faults"))
    ck = pd.read_parquet(moved / "faults" / "checkpoints.parquet")
    assert len(ck) == 4 and all(p.startswith("checkpoints/") for p in ck.path)
    for row in ck.itertuples():
        path = store.resolve_rel(row.path)
        assert path.startswith(str(moved)) and sha256_file(path) == row.sha256
        assert sum(t.numel() for t in load_checkpoint(path).values()) == row.n_params
    index = pd.read_parquet(moved / "faults" / "checkpoints" / ck.trial_id.iloc[0] / "index.parquet")
    assert all(p.startswith("checkpoints/") for p in index.path)
    # An absolute path an older version stored is read from this copy when the file is here.
    assert store.resolve_rel(f"/gone/runs/faults/{ck.path.iloc[0]}") == store.uri(ck.path.iloc[0])
    capsys.readouterr()
    assert main(["status", str(moved / "faults")]) == 0
    assert "2 trials: 2 finished" in capsys.readouterr().out


def test_damaged_sweep_status_then_run_repairs_it(finished_tiny, tmp_path, ray_tmpdir, capsys, monkeypatch):
    spec, root = copy_of(finished_tiny, tmp_path)
    a, b = spec.trials()
    untouched = file_bytes(root, b.trial_id)
    metrics_before = pd.read_parquet(root / "metrics.parquet")

    def truncate(p: Path) -> None:
        p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])

    truncate(root / "trials.parquet")
    truncate(root / "metrics" / f"{a.trial_id}.parquet")
    truncate(root / "checkpoints.parquet")
    (root / "checkpoints" / b.trial_id / "index.parquet").unlink()
    # A lease left by a driver that died on another host: expired, so taken over.
    (root / "lease.json").write_text(
        json.dumps({"run_id": "old", "host": "gone-host", "pid": 1, "renewed_at": 0, "expires_at": 1})
    )

    capsys.readouterr()
    assert main(["status", str(root)]) == 0
    out = capsys.readouterr().out
    assert "damaged: trials.parquet is unreadable" in out
    assert f"damaged: metrics/{a.trial_id}.parquet is unreadable" in out
    assert "damaged: checkpoints.parquet is unreadable" in out
    assert "Traceback" not in out

    lines = []
    summary = run_sweep(spec, log=lines.append)
    text = "\n".join(lines)
    assert "taking over the lease of run old (host gone-host" in text
    assert (
        f"metrics/{a.trial_id}.parquet is unreadable (cut off or damaged): set aside as metrics/{a.trial_id}.parquet.corrupt-"
        in text
    )
    assert f"checkpoints/{b.trial_id}/index.parquet: rebuilt from its 2 checkpoint files" in text
    # A finished trial keeps no resume state (issue 16): its rows come back from metrics.parquet.
    assert f"restored from metrics.parquet ({a.epochs + 1} rows)" in text and "resuming" not in text
    assert (summary.finished, summary.failed) == (2, 0)
    assert len(list((root / "metrics").glob(f"{a.trial_id}.parquet.corrupt-*"))) == 1

    untouched.pop(str(root / "checkpoints" / b.trial_id / "index.parquet"))
    assert {k: v for k, v in file_bytes(root, b.trial_id).items() if not k.endswith("index.parquet")} == untouched
    assert_one_row_per_epoch(str(root), spec)
    after = pd.read_parquet(root / "metrics.parquet")
    key = ["trial_id", "epoch"]
    merged = metrics_before.merge(after, on=key, suffixes=("_before", "_after"))
    assert len(merged) == len(metrics_before) == len(after)
    assert (merged.wall_time_s_before == merged.wall_time_s_after).all()  # nothing finished was recomputed
    ck = pd.read_parquet(root / "checkpoints.parquet")
    assert len(ck) == 4 and all(sha256_file(Store(str(root)).resolve_rel(p)) == h for p, h in zip(ck.path, ck.sha256))
    st = sweep_status(str(root))
    assert st["counts"] == {"finished": 2} and st["problems"] == [] and st["run"] == "idle"
    assert not (root / "lease.json").exists()

    # A lost compacted file is named by status and rebuilt by the next run, which trains nothing.
    (root / "metrics.parquet").unlink()
    capsys.readouterr()
    assert main(["status", str(root)]) == 0
    assert "damaged: metrics.parquet is missing" in capsys.readouterr().out
    assert run_sweep(spec, log=lambda *_: None).ran == 0
    assert_one_row_per_epoch(str(root), spec)
    assert sweep_status(str(root))["problems"] == []


def test_live_lease_refuses_a_second_run_before_anything_is_written(tmp_path):
    from dtsweep.spec import resolved_yaml
    from dtsweep.store import Lease, LeaseHeld

    spec = parse_spec(tiny_sweep(tmp_path, [{"name": "main", "init": "random", "seed": [0]}]))
    root = Path(spec.sweep_dir)
    root.mkdir()
    (root / "sweep.yaml").write_text(resolved_yaml(spec))  # what a first run writes before training
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    holder = Lease(Store(str(root)), ttl_s=5, renew_s=1, settle_s=0)
    with holder:
        first = json.loads((root / "lease.json").read_text())
        with pytest.raises(LeaseHeld, match=f"is in use by run {holder.run_id}"):
            run_sweep(spec, log=lambda *_: None)
        time.sleep(2.5)  # the heartbeat renews it
        assert json.loads((root / "lease.json").read_text())["expires_at"] > first["expires_at"]
        assert sweep_status(str(root))["run"] == "running"
    assert not (root / "lease.json").exists()
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
