"""A real S3-compatible server on 127.0.0.1 for benchmarks and tests: moto's standalone server
(`moto[server]`, in the `test` extra), found by dtsweep through AWS_ENDPOINT_URL as it would
find MinIO or Ceph. Loopback only; fake credentials."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_s3(buckets: Sequence[str], log_path: str, timeout_s: float = 60) -> Iterator[str]:
    """Start the server on a free loopback port with empty `buckets`; yields its endpoint URL.

    For the duration, this process's environment points every S3 client at it (AWS_ENDPOINT_URL,
    fake credentials, no EC2 metadata lookup); Ray workers started from here inherit it
    (`dtsweep.cluster.ray_session` forwards AWS_ENDPOINT_URL). The server's output goes to log_path.
    """
    import boto3

    port = _free_port()
    log = open(log_path, "w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"moto's S3 server exited at start (see {log_path})")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"moto's S3 server did not listen within {timeout_s:.0f} s") from None
                time.sleep(0.2)
        s3 = boto3.client("s3", endpoint_url=endpoint)
        for bucket in buckets:
            s3.create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
