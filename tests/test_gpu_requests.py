"""GPU requests follow the spec's `ray.gpu` on any cluster: never a silent downgrade.

Real Ray: a local Ray started by dtsweep.cluster.ray_session, and a cluster joined by its
address (ray.cluster_utils.Cluster), both on this GPU-less machine.
"""

from __future__ import annotations

import pytest
import yaml

from dtsweep.cluster import NoGpuError, ray_session, use_gpus
from dtsweep.spec import SpecError, parse_spec


def test_ray_gpu_setting_is_parsed_and_checked():
    raw = {
        "name": "g",
        "storage": "runs",
        "studies": [{"name": "s", "init": ["random"], "dataset": ["hopper-medium"], "seed": [0]}],
    }
    assert parse_spec(raw).ray.gpu == "auto"
    # YAML reads a bare `on` / `off` as a boolean.
    assert parse_spec({**raw, "ray": yaml.safe_load("{gpu: on}")}).ray.gpu == "on"
    assert parse_spec({**raw, "ray": yaml.safe_load("{gpu: off}")}).ray.gpu == "off"
    with pytest.raises(SpecError, match="ray.gpu"):
        parse_spec({**raw, "ray": {"gpu": "sometimes"}})


def test_a_local_ray_without_gpus_runs_gpu_trials_on_cpu_and_says_so():
    lines = []
    with ray_session(num_cpus=1):
        assert use_gpus("auto", wants_gpu=True, log=lines.append) is False
        assert lines and "run on CPU" in lines[0]
        assert use_gpus("on", wants_gpu=True, log=lines.append) is True  # waits for GPU nodes
        assert "wait for GPU nodes" in lines[-1]
        assert use_gpus("off", wants_gpu=True, log=lines.append) is False
        assert use_gpus("auto", wants_gpu=False, log=lines.append) is False


def test_a_joined_cluster_without_gpus_is_refused_not_downgraded():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        with ray_session(cluster.address):
            with pytest.raises(NoGpuError, match="gpu: on"):
                use_gpus("auto", wants_gpu=True, log=lambda line: None)
            assert use_gpus("on", wants_gpu=True, log=lambda line: None) is True
    finally:
        cluster.shutdown()
