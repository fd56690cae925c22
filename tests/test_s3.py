"""The whole workflow on object storage, and inputs shared through it.

A real S3-compatible server (moto's standalone server, `moto[server]`) runs on 127.0.0.1 for
the module; dtsweep finds it through AWS_ENDPOINT_URL, as it would find MinIO or Ceph. Every
step runs against `s3://`: a sweep run by the CLI in a subprocess, its driver killed with
SIGKILL, `status`, a rerun that finishes it, `diagnose`, `report`, and a copy of the sweep
prefix in another bucket that reads its own files. A multi-node Ray cluster on this machine
(`ray.cluster_utils.Cluster`) shows that a worker node trains on the dataset and init
directory the driver published under `<sweep>/inputs/`, after the driver's own files are gone.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml

# Helpers of the fault tests (same tiny trials, same way of finding this test's Ray processes).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from s3server import moto_s3  # the server benchmarks/scale.py --s3 uses
from test_faults import checkpointed_epoch, kill_all, ray_processes, short_and_long_studies, tiny_sweep, wait_for

from dtsweep.cli import main
from dtsweep.data import file_sha256
from dtsweep.inputs import INPUTS_DIR, MANIFEST
from dtsweep.models.backbones import ASSETS_DIR
from dtsweep.spec import parse_spec
from dtsweep.store import Store, load_checkpoint, sha256_file
from dtsweep.sweepdir import epochs_done, sweep_status

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto.server")

BUCKET, COPY_BUCKET = "dtsweep-test", "dtsweep-copy"


@pytest.fixture
def ray_tmpdir(monkeypatch):
    """A private RAY_TMPDIR (short: Ray's sockets live below it); its processes killed after the test."""
    d = tempfile.mkdtemp(prefix="dtsw-", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", d)
    yield d
    kill_all(ray_processes(d))
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """moto's S3 server on a free loopback port, with the environment every dtsweep process
    (and the Ray workers started from it) uses to reach it; two empty buckets."""
    with moto_s3((BUCKET, COPY_BUCKET), str(tmp_path_factory.mktemp("moto") / "moto.log")) as endpoint:
        yield endpoint


def s3_files(uri: str) -> dict[str, int]:
    """Relative path -> size of every object below `uri`."""
    store = Store(uri)
    sel = pafs.FileSelector(store.base, recursive=True, allow_not_found=True)
    return {i.path[len(store.base) + 1 :]: i.size for i in store.fs.get_file_info(sel) if i.type == pafs.FileType.File}


def test_malformed_storage_uris_are_one_line(tmp_path, capsys):
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(yaml.safe_dump(tiny_sweep(tmp_path / "runs", [{"name": "main", "init": "random", "seed": [0]}])))
    for uri in ("s3://", "s3:///prefix", "gs://", "s3://bucket:x/sweep", "nosuchfs://bucket/sweep"):
        for argv in (["status", uri], ["report", uri], ["diagnose", uri], ["run", str(spec_path), "--storage", uri]):
            capsys.readouterr()
            assert main(argv) == 2, argv
            err = capsys.readouterr().err.strip()
            assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "runs").exists()


def test_inputs_are_published_once_and_fetched_verified(s3_endpoint, tmp_path, monkeypatch):
    from dtsweep.data import DatasetSource
    from dtsweep.inputs import InputError, fetch_file, publish_datasets

    data = tmp_path / "driver" / "hopper-random_x.hdf5"
    data.parent.mkdir()
    data.write_bytes(os.urandom(3 << 20))
    src = DatasetSource("hopper-random", str(data), file_sha256(data), "generated", "hopper", "Hopper-v5")
    store = Store(f"s3://{BUCKET}/unit/sweep")
    lines = []
    (published,) = publish_datasets(store, {"k": src}, log=lines.append).values()
    assert published.published == store.uri(f"{INPUTS_DIR}/{src.sha256}/{data.name}") and len(lines) == 1
    publish_datasets(store, {"k": src}, log=lines.append)
    assert len(lines) == 1  # already there with the same size: not uploaded again

    monkeypatch.setenv("DTSWEEP_DATA_DIR", str(tmp_path / "node"))
    local = fetch_file(published.published, src.sha256)
    assert local == tmp_path / "node" / INPUTS_DIR / src.sha256 / data.name
    assert local.read_bytes() == data.read_bytes()
    # Other bytes under the published name are refused, and never land in the cache.
    store.write_bytes(f"{INPUTS_DIR}/{src.sha256}/{data.name}", b"not the dataset")
    local.unlink()
    with pytest.raises(InputError, match="sha256"):
        fetch_file(published.published, src.sha256)
    assert not local.exists() and not list(local.parent.glob(".fetch-*"))
    store.delete(f"{INPUTS_DIR}/{src.sha256}/{data.name}")
    with pytest.raises(InputError, match="missing"):
        fetch_file(published.published, src.sha256)


@pytest.mark.slow
def test_whole_workflow_on_s3(s3_endpoint, tmp_path, data_cache, ray_tmpdir, capsys):
    long_epochs = 8
    storage = f"s3://{BUCKET}/runs"
    raw = tiny_sweep(
        storage,
        short_and_long_studies(long_epochs),
    )
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    spec = parse_spec(raw)
    short, long = spec.trials()
    sweep_uri = spec.sweep_dir
    assert sweep_uri == f"{storage}/faults"
    store = Store(sweep_uri)
    cmd = [sys.executable, "-m", "dtsweep", "run", str(spec_path)]

    # 1. The CLI in a subprocess, killed with SIGKILL once the short trial is done and the
    #    long one has a resume checkpoint on S3.
    with open(tmp_path / "first.log", "w") as log:
        driver = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(
            lambda: (
                driver.poll() is not None
                or (epochs_done(store, short.trial_id) >= short.epochs and checkpointed_epoch(store, long.trial_id) >= 1)
            ),
            400,
            "the short trial to finish and the long one to checkpoint an epoch on S3",
            poll_s=1,
        )
        assert driver.poll() is None, "the driver exited early:\n" + (tmp_path / "first.log").read_text()[-3000:]
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        try:
            wait_for(lambda: not ray_processes(ray_tmpdir), 30, "Ray processes of the killed driver to exit")
        except AssertionError:
            kill_all(ray_processes(ray_tmpdir))
    finally:
        kill_all(ray_processes(ray_tmpdir))
    at_kill = epochs_done(store, long.trial_id)
    assert at_kill < long_epochs, "the long trial finished before the driver was killed"

    # The dataset the driver resolved is published, content-addressed, under the sweep.
    ledger = store.read_pandas("trials.parquet")
    sha = ledger["dataset_sha256"].iloc[0]
    published = [p for p in s3_files(sweep_uri) if p.startswith(f"{INPUTS_DIR}/{sha}/")]
    assert published == [f"{INPUTS_DIR}/{sha}/{Path(ledger['dataset_source'].iloc[0]).name}"]
    assert sha256_file(store.uri(published[0])) == sha

    # 2. status: the killed driver's trials are interrupted, not running.
    capsys.readouterr()
    assert main(["status", sweep_uri]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{sweep_uri}: 2 trials:") and "1 finished" in out
    assert "interrupted" in out

    # 3. The same command again resumes the long trial from its S3 checkpoint.
    before = {p: s for p, s in s3_files(sweep_uri).items() if p.startswith(("metrics/", "checkpoints/")) and short.trial_id in p}
    assert main(cmd[3:]) == 0
    out = capsys.readouterr().out
    assert "2 trials, 1 finished, 1 to run" in out
    assert f"resuming {long.trial_id} from epoch " in out
    resumed_from = int(out.split(f"resuming {long.trial_id} from epoch ")[1].split()[0])
    assert 1 <= resumed_from <= at_kill
    assert "published" not in out  # the dataset was on S3 already: nothing uploaded again
    assert {p: s for p, s in s3_files(sweep_uri).items() if p in before} == before

    capsys.readouterr()
    assert main(["status", sweep_uri]) == 0
    out = capsys.readouterr().out
    assert f"{sweep_uri}: 2 trials: 2 finished" in out and "damaged" not in out and "interrupted" not in out

    m = store.read_pandas("metrics.parquet")
    for t in spec.trials():
        assert m[m.trial_id == t.trial_id]["epoch"].tolist() == list(range(t.epochs + 1))
    ck = store.read_pandas("checkpoints.parquet")
    assert len(ck) == 4 and all(p.startswith(f"checkpoints/{tid}/") for p, tid in zip(ck.path, ck.trial_id))

    # 4. diagnose and report, reading and writing S3.
    assert main(["diagnose", sweep_uri, "--fast", "--kinds", "params,cka"]) == 0
    out = capsys.readouterr().out
    assert f"{sweep_uri}/diagnostics/params.parquet" in out
    params = store.read_pandas("diagnostics/params.parquet")
    assert set(params["trial_id"]) == {short.trial_id, long.trial_id}
    assert main(["report", sweep_uri]) == 0
    assert capsys.readouterr().out.strip() == f"{sweep_uri}/report/index.md"
    assert "dtsweep report: faults" in store.read_bytes("report/index.md").decode()

    # 5. The sweep prefix copied to another bucket, the original deleted: the copy reads its own files.
    copy_uri = f"s3://{COPY_BUCKET}/moved/faults"
    src_fs, src = store.fs, store.base
    pafs.copy_files(src, Store(copy_uri).base, source_filesystem=src_fs, destination_filesystem=Store(copy_uri).fs)
    src_fs.delete_dir(src)
    assert not Store(sweep_uri).exists("trials.parquet")
    copy = Store(copy_uri)
    ck = copy.read_pandas("checkpoints.parquet")
    last = copy.resolve_rel(ck.path.iloc[-1])
    assert last.startswith(f"{copy_uri}/checkpoints/")
    assert sha256_file(last) == ck.sha256.iloc[-1] and load_checkpoint(last)
    assert sweep_status(copy_uri)["counts"] == {"finished": 2}
    assert main(["status", copy_uri]) == 0
    assert f"{copy_uri}: 2 trials: 2 finished" in capsys.readouterr().out
    assert main(["report", copy_uri]) == 0
    assert capsys.readouterr().out.strip() == f"{copy_uri}/report/index.md"


@pytest.mark.slow
def test_worker_node_trains_from_published_inputs(s3_endpoint, tmp_path, ray_tmpdir, monkeypatch):
    """The driver's dataset and init directory exist only on the driver until published;
    they are moved away before any trial starts, so the worker node can train only on the
    copies under <sweep>/inputs/, fetched into its own cache."""
    import ray
    from ray.cluster_utils import Cluster

    from dtsweep.orchestrate import run_sweep

    driver_data = tmp_path / "driver-data"
    worker_data = tmp_path / "worker-data"
    init_dir = tmp_path / "driver-models" / "my-chibit"
    shutil.copytree(ASSETS_DIR / "chibit", init_dir)
    monkeypatch.setenv("DTSWEEP_DATA_DIR", str(driver_data))

    raw = tiny_sweep(f"s3://{BUCKET}/nodes", [{"name": "main", "init": str(init_dir), "seed": [0]}])
    raw["defaults"].pop("model")  # a pretrained init keeps its own shape
    raw["defaults"]["train"]["epochs"] = 1
    spec = parse_spec(raw)
    (trial,) = spec.trials()
    store = Store(spec.sweep_dir)

    moved = []

    def log(line: str) -> None:
        # Publishing ends with the init directory: from then on the driver's files are gone.
        if line.startswith(f"init {init_dir}: published"):
            for path in (driver_data, init_dir.parent):
                path.rename(path.with_name(path.name + "-gone"))
                moved.append(path)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        # The worker node's processes get another data directory: its cache of the inputs.
        monkeypatch.setenv("DTSWEEP_DATA_DIR", str(worker_data))
        cluster.add_node(num_cpus=2)
        monkeypatch.setenv("DTSWEEP_DATA_DIR", str(driver_data))
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        summary = run_sweep(spec, log=log)
    finally:
        ray.shutdown()
        cluster.shutdown()

    assert moved == [driver_data, init_dir.parent], "publishing did not happen before the trials"
    assert (summary.finished, summary.failed) == (1, 0), store.read_pandas("trials.parquet")["error"].tolist()
    assert epochs_done(store, trial.trial_id) == 1

    row = store.read_pandas("trials.parquet").iloc[0]
    sha = row["dataset_sha256"]
    name = Path(row["dataset_source"]).name
    assert row["dataset_source"].startswith(str(driver_data))  # provenance names the driver's file
    assert row["init_source"] == str(init_dir.resolve()) and row["init_family"] == "chibit"
    # The worker's cache holds the published dataset, byte for byte what the driver resolved.
    cached = worker_data / INPUTS_DIR / sha / name
    assert cached.is_file() and file_sha256(cached) == sha
    assert sha256_file(store.uri(f"{INPUTS_DIR}/{sha}/{name}")) == sha
    # ... and the published init directory, every file as the driver had it.
    (digest,) = [d for d in store.list_dirs(INPUTS_DIR) if store.exists(f"{INPUTS_DIR}/{d}/{MANIFEST}")]
    manifest = json.loads(store.read_bytes(f"{INPUTS_DIR}/{digest}/{MANIFEST}"))
    gone = init_dir.parent.with_name(init_dir.parent.name + "-gone") / init_dir.name
    assert set(manifest["files"]) == {p.name for p in gone.iterdir()}
    for rel, info in manifest["files"].items():
        assert file_sha256(worker_data / INPUTS_DIR / digest / init_dir.name / rel) == file_sha256(gone / rel) == info["sha256"]
    # The checkpoint carries the same provenance as the ledger: the driver's names, not the cache's.
    from dtsweep.store import read_checkpoint_metadata

    meta = read_checkpoint_metadata(store.uri(f"checkpoints/{trial.trial_id}/epoch=1.parquet"))
    assert meta["provenance"]["dataset_source"] == row["dataset_source"]
    assert meta["provenance"]["init_source"] == row["init_source"]


@pytest.mark.slow
def test_search_on_s3(s3_endpoint, tmp_path, data_cache, ray_tmpdir, capsys):
    from test_search import search_raw

    spec_path = tmp_path / "search.yaml"
    spec_path.write_text(yaml.safe_dump(search_raw(f"s3://{BUCKET}/search", num_samples=2)))
    sweep_uri = f"s3://{BUCKET}/search/tiny-search"
    assert main(["run", str(spec_path)]) == 0
    store = Store(sweep_uri)
    samples = store.read_pandas("search.parquet")
    assert len(samples) == 2 and set(samples["status"]) <= {"finished", "stopped"}
    assert store.list(INPUTS_DIR + "/" + store.read_pandas("trials.parquet")["dataset_sha256"].iloc[0], ".hdf5")
    capsys.readouterr()
    assert main(["run", str(spec_path)]) == 0  # the rerun draws no new sample
    assert len(store.read_pandas("search.parquet")) == 2
    assert main(["status", sweep_uri]) == 0
    assert f"{sweep_uri}: 2 trials:" in capsys.readouterr().out
