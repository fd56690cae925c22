"""cluster.yaml: accepted by Ray's own cluster-config validation (offline) and fit for a sweep."""

import copy
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_ray_validates_the_file_as_written_and_as_ray_up_prepares_it(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(copy.deepcopy(config))  # the JSON schema and Ray's own consistency checks
    # `ray up` merges the provider's defaults before launching; the result must validate too.
    validate_config(prepare_config(copy.deepcopy(config)))


def test_validation_would_catch_a_broken_file(config):
    # Guards the test above against a validator that accepts anything.
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_small_spot"]["resources"] = {"GPU": "one"}
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)
    broken = copy.deepcopy(config)
    broken["head_node_type"] = "missing"
    with pytest.raises(ValueError):
        validate_config(broken)


def test_gpu_worker_types_spot_and_on_demand_of_each_shape(config):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")  # no trials on the head
    gpu = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    shapes = {t["node_config"]["InstanceType"] for t in gpu.values()}
    assert len(shapes) >= 2  # a small-GPU type for packing trials and a larger one
    for shape in shapes:
        of_shape = [t for t in gpu.values() if t["node_config"]["InstanceType"] == shape]
        spot = [t for t in of_shape if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
        on_demand = [t for t in of_shape if "InstanceMarketOptions" not in t["node_config"]]
        assert len(spot) == 1 and len(on_demand) == 1, shape
        assert spot[0]["priority"] > on_demand[0]["priority"]  # spot first, on-demand the fallback
    small = min(gpu.values(), key=lambda t: t["resources"]["GPU"])
    # Two trials of the paper grid ({cpu: 2, gpu: 0.5}) fit on one small GPU node.
    assert small["resources"]["CPU"] >= 4 and small["resources"]["GPU"] >= 1
    assert (
        sum(t.get("max_workers", 0) for t in types.values())
        >= config["max_workers"]
        >= sum(t.get("min_workers", 0) for t in types.values())
    )


def test_dashboard_not_exposed_and_no_secrets(config):
    text = (ROOT / "cluster.yaml").read_text()
    (start,) = [c for c in config["head_start_ray_commands"] if "ray start --head" in c]
    assert "--dashboard-host=127.0.0.1" in start
    assert "security_group" not in config["provider"]  # Ray's default group: SSH only from outside
    for secret in ("aws_secret_access_key", "aws_access_key_id", "ssh_private_key", "BEGIN RSA", "BEGIN OPENSSH"):
        assert secret.lower() not in text.lower()
    assert "ssh_private_key" not in config["auth"]


def test_nodes_install_this_checkout(config):
    assert config["file_mounts"] == {"~/dtsweep": "."}
    assert (ROOT / "scripts" / "install.sh").is_file()
    # The head runs no trials: CPU torch although its AMI has nvidia-smi; workers the CUDA stack.
    assert config["head_setup_commands"] == ["bash ~/dtsweep/scripts/install.sh --cpu"]
    assert config["worker_setup_commands"] == ["bash ~/dtsweep/scripts/install.sh --gpu"]
    assert not any("install.sh" in c for c in config["setup_commands"])  # would run on both


def test_nodes_run_python_3_11_with_the_tested_pins(config):
    import ray
    import transformers

    setup = config["setup_commands"]
    assert any("apt-get install" in c and "python3.11-venv" in c for c in setup)
    assert any("python3.11 -m venv ~/venv" in c for c in setup)
    assert not any(re.search(r"\bpython3 -m venv", c) for c in setup)  # the AMI's Python 3.10
    pins = dict(
        line.split("==") for line in (ROOT / "constraints" / "gpu.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )  # fmt: skip
    # The pins are the versions this suite runs with (torch's local "+cpu" label aside).
    assert pins["torch"] == torch.__version__.split("+")[0]
    assert pins["transformers"] == transformers.__version__
    assert pins["ray"] == ray.__version__
    # The Ray that setup_commands installs is the pinned one (launcher and cluster must match).
    (ray_cmd,) = [c for c in setup if "ray[default]==" in c]
    assert f'"ray[default]=={pins["ray"]}"' in ray_cmd


@pytest.mark.parametrize(
    "args,env,constraints",
    [(["--cpu"], {}, "cpu"), (["--gpu"], {}, "gpu"), ([], {"DTSWEEP_TORCH": "cpu"}, "cpu"),
     ([], {"DTSWEEP_TORCH": "gpu"}, "gpu"), (["--gpu", "--cpu"], {}, "cpu")],
)  # fmt: skip
def test_install_script_picks_the_constraints(args, env, constraints):
    proc = subprocess.run(
        ["bash", "scripts/install.sh", "--dry-run", *args], cwd=ROOT, env={**os.environ, **env},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    pip_lines = [line for line in proc.stdout.splitlines() if "pip install" in line]
    assert pip_lines and all(f"-c constraints/{constraints}.txt" in line for line in pip_lines)
    assert any(line.endswith("-e .") for line in pip_lines)


def test_install_script_refuses_unknown_choices():
    for args, env in ((["--cuda"], {}), ([], {"DTSWEEP_TORCH": "cuda"})):
        proc = subprocess.run(
            ["bash", "scripts/install.sh", "--dry-run", *args], cwd=ROOT, env={**os.environ, **env},
            capture_output=True, text=True,
        )  # fmt: skip
        assert proc.returncode == 2 and "install.sh:" in proc.stderr
