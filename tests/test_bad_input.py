"""Bad input to `dtsweep run`: one clear line, exit code 2, nothing written.

Every case runs the real CLI in a subprocess against its own storage location and checks
that the location was not created. The cases are independent, so they run a few at a time.
"""

import ast
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from dtsweep.preflight import PreflightError, check_ray_address

ROOT = Path(__file__).resolve().parents[1]

VALID = {
    "name": "bad",
    "defaults": {
        "context_len": 5,
        "data": {"steps": 3000, "seed": 0},
        "model": {"n_layer": 2, "n_embd": 16, "n_head": 1},
        "train": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 8},
        "eval": {"episodes": 1, "max_steps": 10},
    },
    "studies": [{"name": "main", "init": "random", "dataset": ["hopper-random"], "seed": [0]}],
}


def with_study(**changes) -> dict:
    raw = json.loads(json.dumps(VALID))
    raw["studies"][0].update(changes)
    return raw


def free_port() -> int:
    """A local TCP port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# name -> (spec: dict or raw YAML text, extra CLI args, extra env, text the one line must hold)
CASES = {
    "malformed_yaml": ("name: bad\nstudies: [\n  {init: random\n", [], {}, "malformed YAML at line"),
    "wrong_type": (
        with_study(train={"epochs": "ten"}),
        [],
        {},
        "studies[0].train.epochs: 'ten' is not valid; expected an integer",
    ),
    "unknown_key": (with_study(trian={"epochs": 1}), [], {}, "studies[0].trian: unknown key; did you mean 'train'?"),
    "unknown_env": (with_study(dataset=["hoper-medium"]), [], {}, "unknown env 'hoper'"),
    "unknown_init": (with_study(init="gtp2"), [], {}, "unknown init 'gtp2' (did you mean 'gpt2'?)"),
    "swap_block_out_of_range": (
        with_study(swap_block=[2], swap_from="gpt2"),
        [],
        {},
        "swap_block: 2 is not valid; expected a block index in 0..1 (model depth 2)",
    ),
    "dataset_missing_offline": (
        with_study(dataset=["hopper-medium-v2"]),
        [],
        {"DTSWEEP_OFFLINE": "1", "D4RL_DATASET_DIR": "{tmp}/d4rl"},
        "dataset 'hopper-medium-v2' not found (offline): put D4RL's hopper_medium-v2.hdf5 in",
    ),  # fmt: skip
    "dataset_without_generator": (
        with_study(dataset=["hopper-expert"]),
        [],
        {"DTSWEEP_OFFLINE": "1", "D4RL_DATASET_DIR": "{tmp}/d4rl"},
        "no offline generator for 'expert'",
    ),  # fmt: skip
    "hub_model_offline": (
        with_study(init="gpt2", model=None),
        [],
        {"HF_HUB_OFFLINE": "1", "HF_HOME": "{tmp}/hf"},
        "Hugging Face model 'gpt2' cannot be loaded (HF_HUB_OFFLINE is set and it is not in the local cache); "
        "on a machine with internet run `hf download gpt2 --local-dir DIR`",
    ),  # fmt: skip
    "storage_not_writable": (VALID, ["--storage", "{tmp}/a_file/runs"], {}, "a_file is a file, not a directory"),
    "ray_address_not_answering": (VALID, ["--address", "127.0.0.1:{port}"], {}, "Ray address '127.0.0.1:{port}' does not answer"),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Run every case's CLI once; name -> (CompletedProcess, its temp dir, its storage path)."""
    port = free_port()

    def run(name):
        spec, args, env, _ = CASES[name]
        tmp = tmp_path_factory.mktemp(name)
        (tmp / "a_file").write_text("not a directory")
        spec_path = tmp / "sweep.yaml"
        spec_path.write_text(spec if isinstance(spec, str) else yaml.safe_dump({**spec, "storage": str(tmp / "runs")}))
        fill = {"tmp": str(tmp), "port": str(port)}
        args = [a.format(**fill) for a in args]
        env = {**os.environ, **{k: v.format(**fill) for k, v in env.items()}}
        cmd = [sys.executable, "-m", "dtsweep", "run", str(spec_path), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp)
        storage = Path(args[args.index("--storage") + 1]) if "--storage" in args else tmp / "runs"
        return name, (proc, tmp, storage, fill)

    # Each process spends most of its time importing torch: a few at once on two cores.
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(run, CASES))


@pytest.mark.slow  # eleven CLI processes, each importing torch and transformers
@pytest.mark.parametrize("name", CASES)
def test_bad_input_one_line_exit_2_nothing_written(outcomes, name):
    proc, tmp, storage, fill = outcomes[name]
    expected = CASES[name][3].format(**fill)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert expected in lines[0]
    assert not storage.exists() and not (tmp / "runs").exists()
    assert (tmp / "a_file").read_text() == "not a directory"
    assert sorted(p.name for p in tmp.iterdir()) == ["a_file", "sweep.yaml"]  # nothing else either


@pytest.mark.slow
def test_missing_dataset_says_how_to_make_or_fetch_it(outcomes):
    line = outcomes["dataset_missing_offline"][0].stderr
    assert "dtsweep data make hopper-medium" in line and "rail.eecs.berkeley.edu" in line


def test_ray_address_check_is_fast_and_accepts_a_live_one():
    port = free_port()
    t0 = time.time()
    with pytest.raises(PreflightError, match="does not answer"):
        check_ray_address(f"127.0.0.1:{port}", timeout_s=1.0)
    with pytest.raises(PreflightError, match="does not answer"):
        check_ray_address(f"ray://127.0.0.1:{port}", timeout_s=1.0)
    assert time.time() - t0 < 5
    with pytest.raises(PreflightError, match="not one ray.init understands"):
        check_ray_address("http://127.0.0.1:8265")
    with socket.socket() as server:  # something answering: accepted
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_ray_address(f"127.0.0.1:{server.getsockname()[1]}")
        check_ray_address(f"ray://127.0.0.1:{server.getsockname()[1]}")
    check_ray_address("local")


# --------------------------------------------------------------------------------------
# Safety: nothing a user receives is unpickled, no spec string is evaluated
# --------------------------------------------------------------------------------------


def test_no_pickle_no_eval_in_the_package():
    problems = []
    for path in sorted((ROOT / "dtsweep").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("pickle", "cloudpickle", "dill", "marshal", "shelve") for n in names):
                    problems.append(f"{where}: imports a pickle module")
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            kwargs = {k.arg: k.value for k in node.keywords}
            if isinstance(f, ast.Name) and name in ("eval", "exec"):
                problems.append(f"{where}: {name}()")
            if owner == "torch" and name == "load":
                safe = kwargs.get("weights_only")
                if not (isinstance(safe, ast.Constant) and safe.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if owner == "yaml" and name in ("load", "unsafe_load", "full_load"):
                problems.append(f"{where}: yaml.{name} (use yaml.safe_load)")
            allow_pickle = kwargs.get("allow_pickle")  # absent: numpy's default, False
            if owner == "np" and name == "load" and allow_pickle is not None:
                if not (isinstance(allow_pickle, ast.Constant) and allow_pickle.value is False):
                    problems.append(f"{where}: np.load with allow_pickle")
    assert problems == []


# --------------------------------------------------------------------------------------
# More bad input, in-process through the same `main` (no torch import per case): names that
# would leave the storage directory, integers beyond int64, undecodable specs, grids far
# larger than meant, storage the OS refuses, and `data make` arguments checked before
# anything is generated.
# --------------------------------------------------------------------------------------

from dtsweep.cli import main  # noqa: E402

# name -> (spec: dict, str or bytes; CLI args after the spec path; text the one line must hold)
RUN_CASES = {
    "sweep_named_dotdot": ({**VALID, "name": ".."}, [], "name: '..' is not valid"),
    "sweep_named_dot": ({**VALID, "name": "."}, [], "name: '.' is not valid"),
    "study_named_dotdot": (with_study(name=".."), [], "studies[0].name: '..' is not valid"),
    "study_name_with_slash": (with_study(name="a/b"), [], "studies[0].name: 'a/b' is not valid"),
    "seed_2_63": (
        with_study(seed=[2**63]),
        [],
        "studies[0].seed[0]: 9223372036854775808 is not valid; expected an integer in [0, 2**63)",
    ),
    "seed_negative": (with_study(seed=[-1]), [], "studies[0].seed[0]: -1 is not valid; expected an integer >= 0"),
    "seed_count_past_2_63": (with_study(seed={"start": 2**63 - 1, "count": 2}), [], "seeds in [0, 2**63)"),
    "epochs_beyond_int64": (
        with_study(train={"epochs": 2**64}),
        [],
        "studies[0].train.epochs: 18446744073709551616 is not valid",
    ),
    "not_utf8": (b"name: caf\xe9\nstudies: []\n", [], "not a UTF-8 text file"),
    "not_yaml_binary": (b"\x89PNG\r\n\x1a\n\x00\x00", [], "not a UTF-8 text file"),
    "grid_too_large": (with_study(seed={"start": 0, "count": 100_001}), [], "the sweep has 100,001 trials (more than 100,000)"),
    "storage_under_proc": (VALID, ["--storage", "/proc/dtsweep-test-runs"], "is not writable"),
    "storage_under_sys": (VALID, ["--storage", "/sys/dtsweep-test-runs"], "is not writable"),
}


@pytest.mark.parametrize("command", ["plan", "run"])
@pytest.mark.parametrize("name", RUN_CASES)
def test_more_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, monkeypatch, name, command):
    spec, args, expected = RUN_CASES[name]
    if command == "plan" and name.startswith("storage_"):
        pytest.skip("plan writes nothing, so it does not check storage")
    monkeypatch.chdir(tmp_path)
    spec_path = tmp_path / "sweep.yaml"
    if isinstance(spec, bytes):
        spec_path.write_bytes(spec)
    else:
        spec_path.write_text(yaml.safe_dump({**spec, "storage": str(tmp_path / "runs")}))
    capsys.readouterr()
    assert main([command, str(spec_path), *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.yaml"]
    assert not Path("/proc/dtsweep-test-runs").exists() and not Path("/sys/dtsweep-test-runs").exists()


def test_grid_of_100000_plans_in_arithmetic_time_and_allow_large_lifts_the_bound(tmp_path, capsys):
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(yaml.safe_dump({**with_study(seed={"start": 0, "count": 100_000}), "storage": str(tmp_path / "runs")}))
    capsys.readouterr()
    assert main(["plan", str(spec_path)]) == 0
    assert "100000 trials" in capsys.readouterr().out
    spec_path.write_text(yaml.safe_dump({**with_study(seed={"start": 0, "count": 300_000}), "storage": str(tmp_path / "runs")}))
    assert main(["plan", str(spec_path)]) == 2
    assert main(["plan", str(spec_path), "--allow-large"]) == 0
    assert "300000 trials" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.yaml"]


# name -> (`data make` arguments, with {tmp}; text the one line must hold)
DATA_CASES = {
    "steps_zero": (["hopper-random", "--steps", "0", "--out", "{tmp}/x.hdf5"], "--steps 0 is not valid"),
    "steps_negative": (["hopper-random", "--steps", "-5", "--out", "{tmp}/x.hdf5"], "--steps -5 is not valid"),
    "seed_negative": (["hopper-random", "--seed", "-1", "--out", "{tmp}/x.hdf5"], "--seed -1 is not valid"),
    "unknown_env": (["hoper-random", "--out", "{tmp}/x.hdf5"], "unknown env 'hoper'"),
    "unknown_quality": (["hopper-expret", "--out", "{tmp}/x.hdf5"], "unknown dataset quality 'expret'"),
    "no_generator": (["hopper-expert", "--out", "{tmp}/x.hdf5"], "no generator for 'expert' datasets"),
    "versioned": (["hopper-random-v2", "--out", "{tmp}/x.hdf5"], "names a D4RL release"),
    "out_is_directory": (["hopper-random", "--out", "{tmp}/a_dir"], "is a directory"),
    "out_below_a_file": (["hopper-random", "--out", "{tmp}/a_file/x.hdf5"], "a_file is a file, not a directory"),
    "out_under_proc": (["hopper-random", "--out", "/proc/dtsweep-test.hdf5"], "cannot be written"),
    "out_under_sys": (["hopper-random", "--out", "/sys/dtsweep-test/x.hdf5"], "cannot be written"),
}


@pytest.mark.parametrize("name", DATA_CASES)
def test_data_make_bad_input_before_generating(tmp_path, capsys, monkeypatch, name):
    args, expected = DATA_CASES[name]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("not a directory")
    capsys.readouterr()
    assert main(["data", "make", *(a.format(tmp=tmp_path) for a in args)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data make: ") and expected in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir", "a_file"] and not any((tmp_path / "a_dir").iterdir())
