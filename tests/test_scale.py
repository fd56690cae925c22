"""Flat orchestration cost (issue 16): the ledger's state records, compaction manifests,
resume-state discovery and pruning on a real sweep directory, and benchmarks/scale.py at a tiny N.

No Ray except in the benchmark run; no timing assertions (benchmarks/scale.py measures)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from dtsweep.schemas import METRICS_SCHEMA
from dtsweep.spec import parse_spec
from dtsweep.store import Store, table_from_rows
from dtsweep.sweepdir import (
    LEDGER_DIR,
    Ledger,
    all_epochs_done,
    compact,
    latest_resume_checkpoints,
    load_resume_state,
    pending_records,
    prune_resume_states,
    read_ledger,
    read_manifest,
    repair,
    save_resume_state,
    stale_compacted,
    sweep_status,
)

ROOT = Path(__file__).resolve().parents[1]


def spec_of(tmp_path, n: int = 3):
    return parse_spec({
        "name": "ledger", "storage": str(tmp_path),
        "defaults": {"dataset": ["hopper-random"], "model": {"n_layer": 1, "n_embd": 16, "n_head": 1},
                     "train": {"epochs": 2}, "checkpoint_epochs": [0, "final"]},
        "studies": [{"name": "main", "init": "random", "seed": list(range(n))}],
    })  # fmt: skip


def write_metrics(store: Store, trial, epochs: int) -> None:
    rows = [{**trial.columns(), "epoch": e, "step": e, "wall_time_s": float(e)} for e in range(epochs + 1)]
    store.write_table(f"metrics/{trial.trial_id}.parquet", table_from_rows(rows, METRICS_SCHEMA))


def test_state_changes_are_small_records_merged_at_intervals(tmp_path):
    spec = spec_of(tmp_path)
    store = Store(spec.sweep_dir)
    a, b, c = spec.trials()
    ledger = Ledger(store, spec.trials(), interval_s=3600)  # no merge by time in this test
    ledger.write()
    merged = store.read_bytes("trials.parquet")

    ledger.set(a.trial_id, "running")
    write_metrics(store, b, 2)
    ledger.set(b.trial_id, "finished")
    # Each change is one small record; trials.parquet is untouched until the next merge...
    assert store.read_bytes("trials.parquet") == merged
    assert set(pending_records(store)) == {a.trial_id, b.trial_id}
    assert all(store.file_size(f"{LEDGER_DIR}/{t.trial_id}.json") < 8000 for t in (a, b))
    # ...and readers see the changes at once: status and read_ledger merge the records.
    st = sweep_status(spec.sweep_dir)
    assert st["run"] == "interrupted" and st["counts"] == {"interrupted": 1, "finished": 1, "pending": 1}
    assert read_ledger(store).set_index("trial_id").loc[b.trial_id, "status"] == "finished"

    # A driver killed here leaves the records; the next ledger takes them in.
    again = Ledger(store, spec.trials(), interval_s=3600)
    assert again.status(b.trial_id) == "finished" and again.status(a.trial_id) == "pending"
    again.close()  # merges and deletes the records
    assert pending_records(store) == {} and not store.list(LEDGER_DIR, ".json")
    on_disk = pd.read_parquet(f"{spec.sweep_dir}/trials.parquet").set_index("trial_id")
    assert on_disk.loc[b.trial_id, "status"] == "finished" and on_disk.loc[c.trial_id, "status"] == "pending"


def test_merge_runs_in_the_background_after_the_interval(tmp_path):
    spec = spec_of(tmp_path, n=1)
    store = Store(spec.sweep_dir)
    (a,) = spec.trials()
    ledger = Ledger(store, spec.trials(), interval_s=0.2)
    ledger.set(a.trial_id, "running")
    import time

    deadline = time.time() + 30
    while pending_records(store) and time.time() < deadline:  # the merge thread's next tick
        time.sleep(0.1)
    ledger.close()
    assert pending_records(store) == {}
    assert pd.read_parquet(f"{spec.sweep_dir}/trials.parquet")["status"].tolist() == ["running"]


def test_compacted_files_let_startup_skip_unchanged_per_trial_files(tmp_path):
    spec = spec_of(tmp_path)
    store = Store(spec.sweep_dir)
    a, b, c = spec.trials()
    write_metrics(store, a, 2)
    write_metrics(store, b, 1)
    compact(store)
    manifest = read_manifest(store, "metrics.parquet")
    assert set(manifest) == {f"metrics/{a.trial_id}.parquet", f"metrics/{b.trial_id}.parquet"}
    assert stale_compacted(store) == {}
    assert all_epochs_done(store) == {a.trial_id: 2, b.trial_id: 1}

    # A file that changed since the compaction is read; compaction keeps the others' rows.
    write_metrics(store, b, 2)
    write_metrics(store, c, 0)
    assert all_epochs_done(store) == {a.trial_id: 2, b.trial_id: 2, c.trial_id: 0}
    assert set(stale_compacted(store)) == {"metrics.parquet"}
    compact(store)
    m = pd.read_parquet(f"{spec.sweep_dir}/metrics.parquet")
    assert m.groupby("trial_id")["epoch"].max().to_dict() == {a.trial_id: 2, b.trial_id: 2, c.trial_id: 0}
    assert stale_compacted(store) == {}

    # The manifest is trusted only for files of the same size and mtime: a damaged one is found.
    p = Path(spec.sweep_dir) / "metrics" / f"{a.trial_id}.parquet"
    p.write_bytes(p.read_bytes()[:100])
    assert all_epochs_done(store)[a.trial_id] is None
    lines = []
    repair(store, log=lines.append)
    assert len(lines) == 1 and "restored from metrics.parquet (3 rows)" in lines[0]
    assert all_epochs_done(store)[a.trial_id] == 2
    assert pq.read_table(p).num_rows == 3


def test_resume_states_found_in_one_listing_and_pruned(tmp_path):
    spec = spec_of(tmp_path)
    store = Store(spec.sweep_dir)
    a, b, _ = spec.trials()
    for epoch in (0, 1):
        save_resume_state(store, {"trial_id": a.trial_id, "epoch": epoch, "w": torch.full((3,), float(epoch))})
    save_resume_state(store, {"trial_id": b.trial_id, "epoch": 0, "w": torch.zeros(3)})
    # A worker killed mid-upload leaves a temporary file: never taken for a resume state.
    (Path(spec.sweep_dir) / "_tune" / "resume" / b.trial_id / ".tmp-0000-epoch=1.pt").write_bytes(b"cut")
    found = latest_resume_checkpoints(store)
    assert {tid: e for tid, (e, _) in found.items()} == {a.trial_id: 1, b.trial_id: 0}
    assert torch.equal(load_resume_state(found[a.trial_id][1])["w"], torch.ones(3))
    assert len(list((Path(spec.sweep_dir) / "_tune" / "resume" / a.trial_id).glob("*.pt"))) == 1  # older ones deleted
    assert latest_resume_checkpoints(store, {b.trial_id}).keys() == {b.trial_id}

    assert prune_resume_states(store, {a.trial_id}) > 0
    assert set(latest_resume_checkpoints(store)) == {b.trial_id}
    assert not (Path(spec.sweep_dir) / "_tune" / "resume" / a.trial_id).exists()


@pytest.mark.slow
def test_scale_benchmark_writes_every_figure(tmp_path, data_cache):
    """At a tiny N, on the S3 test server (--s3): the object-storage path of the benchmark; the
    local one differs only in the storage root."""
    pytest.importorskip("moto.server")
    out = tmp_path / "r.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--n", "6", "12", "--finished", "30", "--out", str(out),
                        "--workdir", str(tmp_path), "--s3"], capture_output=True, text=True, timeout=900, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "does no training" in r.stderr and "on the S3 server" in r.stderr
    res = json.loads(out.read_text())
    assert res["storage"].startswith("s3")
    assert {"overhead_growth", "substitution", "machine", "results"} <= set(res)
    assert set(res["results"]) == {"6", "12"} and set(res["finished_sweeps"]) == {"30"}
    for _n, row in res["results"].items():
        assert {"per_trial_overhead_s", "first_trial_s", "ledger_bytes_written", "rerun_s", "status_s"} <= set(row)
        assert row["all_finished"] and row["resume_states_left"] == 0 and row["ledger_records_left"] == 0
        assert row["ledger_bytes_written"] > 0
