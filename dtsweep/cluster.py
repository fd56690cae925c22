"""Connecting to Ray: the one place run, search and diagnose start or join a cluster."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None) -> Iterator[None]:
    """Use the Ray this process is already connected to, else connect for the block and
    disconnect after it.

    address: a cluster (`10.0.0.5:6379`, `auto`); default RAY_ADDRESS, else the cluster started
    on this machine with `ray start` (the head node of `ray up`), else a new local Ray with
    `num_cpus` CPUs (ignored when joining a running cluster, whose resources apply).
    """
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
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
