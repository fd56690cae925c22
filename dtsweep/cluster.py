"""Connecting to Ray: the one place run, search and diagnose start or join a cluster."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

# Where the object store is, for the trials and diagnostics workers: a worker of a cluster
# started by `ray start`/`ray up` does not inherit the driver's environment, and without these
# it would write a sweep meant for MinIO or Ceph to AWS. Credentials are not forwarded (they
# would be stored in Ray's job table): each node uses its own (instance profile, ~/.aws).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None) -> Iterator[None]:
    """Use the Ray this process is already connected to, else connect for the block and
    disconnect after it.

    address: a cluster (`10.0.0.5:6379`, `auto`); default RAY_ADDRESS, else the cluster started
    on this machine with `ray start` (the head node of `ray up`), else a new local Ray with
    `num_cpus` CPUs (ignored when joining a running cluster, whose resources apply). The
    variables in FORWARDED_ENV that are set here are set for the session's workers too.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    forwarded = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    if forwarded:
        kwargs["runtime_env"] = {"env_vars": forwarded}
    if address:
        ray.init(address=address, **kwargs)
    else:
        try:
            ray.init(num_cpus=num_cpus, **kwargs)
        except ValueError:
            # Joining a running cluster, Ray refuses num_cpus: the cluster's resources apply.
            if num_cpus is None:
                raise
            ray.init(**kwargs)
    try:
        yield
    finally:
        ray.shutdown()
