"""Connecting to Ray: the one place run, search and diagnose start or join a cluster, and
the one place that decides whether trials get the GPUs their spec asks for."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

# Where the object store is, for the trials and diagnostics workers: a worker of a cluster
# started by `ray start`/`ray up` does not inherit the driver's environment, and without these
# it would write a sweep meant for MinIO or Ceph to AWS. Credentials are not forwarded (they
# would be stored in Ray's job table): each node uses its own (instance profile, ~/.aws).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")

# Set by ray_session: True while connected to a Ray it started itself on this machine.
_STARTED_LOCAL = False


class NoGpuError(RuntimeError):
    """The spec asks for GPUs and the cluster has none (a user-fixable problem: one line, exit 2)."""


def use_gpus(setting: str, wants_gpu: bool, log=print) -> bool:
    """Whether trials keep their GPU requests (resources.gpu), per the spec's `ray.gpu` setting.

    Never downgrades silently: on a cluster whose GPU nodes have not started yet (an
    autoscaling cluster right after `ray up`) every trial asking for CPUs only would see every
    GPU of its node and pile onto cuda:0. "auto" therefore keeps the requests when the
    cluster has GPUs, runs on CPU with a notice on a Ray that ray_session started on a machine
    without GPUs, and raises NoGpuError on a joined cluster without GPUs; "on" keeps them
    (trials wait for GPU nodes); "off" drops them. Call inside ray_session.
    """
    import ray

    if not wants_gpu or setting == "off":
        return False
    has_gpu = ray.cluster_resources().get("GPU", 0) > 0
    if setting == "on":
        if not has_gpu:
            log("ray.gpu: on and no GPU in the cluster yet: trials wait for GPU nodes (autoscaler)")
        return True
    if has_gpu:
        return True
    if _STARTED_LOCAL:
        log("no GPU on this machine: trials run on CPU (ray.gpu: auto; `off` says so quietly, `on` waits for GPUs)")
        return False
    raise NoGpuError(
        "the spec asks for GPUs (resources.gpu) but the Ray cluster has none now; set `ray: {gpu: on}` "
        "to wait for GPU nodes an autoscaler will start, or `ray: {gpu: off}` to run on CPUs"
    )


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

    global _STARTED_LOCAL
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
    # A Ray this process started (not a cluster it joined) has only this machine's resources.
    # Ray's public API does not say which happened; its driver's node object does (head=True
    # when ray.init started the head here).
    node = getattr(ray._private.worker.global_worker, "node", None)
    _STARTED_LOCAL = not address and node is not None and node.is_head()
    try:
        yield
    finally:
        _STARTED_LOCAL = False
        ray.shutdown()
