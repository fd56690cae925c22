"""Test-suite environment: offline, no Ray auth/dashboard, datasets cached per session."""

import os

# Before anything imports transformers/ray: never reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DTSWEEP_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One dtsweep dataset cache for the whole session (generated datasets are reused)."""
    path = tmp_path_factory.mktemp("datasets")
    old = os.environ.get("DTSWEEP_DATA_DIR")
    os.environ["DTSWEEP_DATA_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("DTSWEEP_DATA_DIR", None)
    else:
        os.environ["DTSWEEP_DATA_DIR"] = old


# A private Ray temp dir per test session: a test's ray.init() never joins a Ray that
# something else on this machine started, and its sockets live under a short path.
if "RAY_TMPDIR" not in os.environ:
    import tempfile

    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ray", dir="/tmp")
