"""Parquet checkpoints and atomic writes."""

import pyarrow.parquet as pq
import pytest
import torch

from dtsweep.store import Store, load_checkpoint, read_checkpoint_metadata, sha256_file, write_checkpoint


def test_checkpoint_round_trip_every_dtype(tmp_path):
    store = Store(str(tmp_path))
    sd = {
        "w": torch.randn(3, 4),
        "b16": torch.randn(5).to(torch.bfloat16),
        "h": torch.randn(2, 2).half(),
        "i": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "strided": torch.randn(4, 6)[:, ::2],
    }
    stats = write_checkpoint(store, "checkpoints/t/epoch=0.parquet", sd, {"trial_id": "t", "epoch": 0})
    path = store.uri("checkpoints/t/epoch=0.parquet")
    back = load_checkpoint(path)
    assert list(back) == list(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert torch.equal(back[k], v.contiguous())
    assert stats["n_params"] == sum(v.numel() for v in sd.values())
    assert stats["sha256"] == sha256_file(path)
    meta = read_checkpoint_metadata(path)
    assert meta["trial_id"] == "t" and meta["n_params"] == stats["n_params"]
    assert pq.read_table(path).column_names == ["name", "dtype", "shape", "data"]


def test_write_is_atomic_and_leaves_no_temporaries(tmp_path):
    store = Store(str(tmp_path))
    store.write_bytes("a/b.txt", b"one")
    store.write_bytes("a/b.txt", b"two")
    assert store.read_bytes("a/b.txt") == b"two"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.txt"]
    assert store.list("a") == ["a/b.txt"]


def test_file_uri_works_like_a_path(tmp_path):
    store = Store(f"file://{tmp_path}/sweep")
    store.write_bytes("x.bin", b"abc")
    assert (tmp_path / "sweep" / "x.bin").read_bytes() == b"abc"


def test_unwritable_storage_is_reported(tmp_path):
    # A path below a regular file cannot be created, whoever runs the test (root included).
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OSError, match="not writable"):
        Store(str(tmp_path / "afile" / "sweep")).check_writable()
