"""Provenance, one meaning per dataset name, D4RL-faithful evaluation, real data sources.

Real files in tmp dirs (D4RL's layout written with `write_d4rl_hdf5`, a Minari dataset
recorded with Minari's own DataCollector), real MuJoCo, a real local Ray Tune run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import gymnasium as gym
import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from dtsweep import cli
from dtsweep.data import (
    DatasetError,
    DatasetNotFoundError,
    DatasetSource,
    dataset_env,
    resolve_dataset,
    resolve_source,
    rollout_dataset,
    uniform_policy,
    write_d4rl_hdf5,
)
from dtsweep.models import ASSET_INITS, init_family, init_source
from dtsweep.models.backbones import ASSETS_DIR
from dtsweep.orchestrate import run_sweep
from dtsweep.schemas import PROVENANCE_COLUMNS, TRIALS_SCHEMA
from dtsweep.spec import SpecError, parse_spec
from dtsweep.store import Store, read_checkpoint_metadata, table_from_rows
from dtsweep.sweepdir import sweep_status
from dtsweep.train import TrialRunner

torch.set_num_threads(1)

MINARI_ID = "dtsweep/hopper-tiny-v0"

TINY = {
    "defaults": {
        "context_len": 3,
        "data": {"steps": 300, "seed": 0},
        "model": {"n_layer": 1, "n_embd": 16, "n_head": 1},
        "train": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 4, "warmup_steps": 1},
        "eval": {"episodes": 1, "max_steps": 5, "action_error_samples": 4},
        "checkpoint_epochs": ["final"],
    },
    "ray": {"num_cpus": 2, "max_failures": 0},
}


def tiny(storage, studies, name="prov") -> dict:
    return {**json.loads(json.dumps(TINY)), "name": name, "storage": str(storage), "studies": studies}


def study(name, dataset, **extra):
    return {"name": name, "init": "random", "dataset": [dataset], "seed": [0], **extra}


def sha256_of(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def record_minari(root) -> None:
    """A tiny Minari dataset of Hopper-v5 random actions, recorded by Minari itself."""
    from minari import DataCollector

    env = DataCollector(gym.make("Hopper-v5", max_episode_steps=40))
    env.action_space.seed(0)
    for ep in range(6):
        env.reset(seed=ep)
        done = False
        while not done:
            _, _, terminated, truncated, _ = env.step(env.action_space.sample())
            done = terminated or truncated
    env.create_dataset(dataset_id=MINARI_ID, algorithm_name="uniform random", author="dtsweep tests",
                       author_email="tests@example.org", code_permalink="tests/test_provenance.py",
                       description="tiny Hopper-v5 random-action dataset", eval_env="Hopper-v5")  # fmt: skip
    env.close()


@pytest.fixture(scope="module")
def sources(tmp_path_factory, data_cache):
    """D4RL's walker2d-medium-v2 (in a temp D4RL cache), a hopper file given by path (no
    card: D4RL's layout from elsewhere) and a Minari dataset, all small."""
    root = tmp_path_factory.mktemp("sources")
    old = {k: os.environ.get(k) for k in ("D4RL_DATASET_DIR", "MINARI_DATASETS_PATH")}
    os.environ["D4RL_DATASET_DIR"] = str(root / "d4rl")
    os.environ["MINARI_DATASETS_PATH"] = str(root / "minari")
    walker = root / "d4rl" / "walker2d_medium-v2.hdf5"
    write_d4rl_hdf5(walker, rollout_dataset("walker2d", uniform_policy(6), 300, seed=0, num_envs=2))
    hopper = root / "files" / "my-hopper.hdf5"
    write_d4rl_hdf5(hopper, rollout_dataset("hopper", uniform_policy(3), 300, seed=1, num_envs=2))
    record_minari(root / "minari")
    yield {"root": root, "walker": walker, "hopper": hopper}
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# --- one meaning per name -------------------------------------------------------------------


def test_unversioned_name_is_generated_data_even_with_d4rl_file_present(sources, tmp_path):
    d4rl_hopper = sources["root"] / "d4rl" / "hopper_medium-v2.hdf5"
    write_d4rl_hdf5(d4rl_hopper, rollout_dataset("hopper", uniform_policy(3), 50, seed=0, num_envs=1))
    try:
        assert resolve_dataset("hopper-medium-v2") == d4rl_hopper
        with pytest.raises(DatasetNotFoundError, match="not generated yet"):
            resolve_dataset("hopper-medium", steps=123, generate=False)
        generated = resolve_source("hopper-random", steps=200, seed=0)
        assert generated.origin == "generated" and generated.eval_env == "Hopper-v5"
        assert generated.path != str(d4rl_hopper)
        d4rl = resolve_source("hopper-medium-v2")
        assert (d4rl.origin, d4rl.eval_env, d4rl.sha256) == ("d4rl", "Hopper-v4", sha256_of(d4rl_hopper))
    finally:
        d4rl_hopper.unlink()


def test_file_dataset_id_hashes_bytes_not_path(sources, tmp_path):
    copy = tmp_path / "elsewhere" / "same.hdf5"
    copy.parent.mkdir()
    shutil.copy(sources["hopper"], copy)
    ids = [parse_spec(tiny(tmp_path, [study("s", str(p))])).trials()[0] for p in (sources["hopper"], copy)]
    assert ids[0].trial_id == ids[1].trial_id and ids[0].dataset != ids[1].dataset
    assert ids[0].dataset_sha256 == sha256_of(copy) and ids[0].env == "hopper"  # 11/3: hopper
    with h5py.File(copy, "r+") as f:  # other bytes, same path: another trial
        f["rewards"][0] += 1.0
    changed = parse_spec(tiny(tmp_path, [study("s", str(copy))])).trials()[0]
    assert changed.trial_id != ids[1].trial_id and changed.config_key != ids[1].config_key


def test_ambiguous_sizes_need_env(sources, tmp_path):
    raw = tiny(tmp_path, [study("s", str(sources["walker"]))])
    with pytest.raises(SpecError, match=r"17/6 do not tell the env \(ambiguous: halfcheetah or walker2d\)"):
        parse_spec(raw)
    trial = parse_spec(tiny(tmp_path, [study("s", str(sources["walker"]), env="walker2d")])).trials()[0]
    assert trial.env == "walker2d"
    with pytest.raises(SpecError, match="sizes 17/6 do not match hopper"):
        parse_spec(tiny(tmp_path, [study("s", str(sources["walker"]), env="hopper")]))
    assert dataset_env(f"minari:{MINARI_ID}") == "hopper"  # from Minari's env spec


# --- D4RL-faithful evaluation ----------------------------------------------------------------


def test_d4rl_walker_data_is_evaluated_on_walker2d_v4(sources, tmp_path):
    trial = parse_spec(tiny(tmp_path, [study("s", "walker2d-medium-v2")])).trials()[0]
    runner = TrialRunner(trial, Store(str(tmp_path / "sweep")), device=torch.device("cpu"))
    assert runner.dataset.origin == "d4rl" and runner.dataset.path == str(sources["walker"])
    result = runner.evaluate()
    assert np.isfinite(result["eval_return_mean"])
    evaluated = runner.eval_envs[0]
    assert evaluated.spec.id == "Walker2d-v4"
    # The MuJoCo model itself: v4 keeps D4RL's feet (left 1.9, right 0.9), v5 changed them.
    friction = evaluated.unwrapped.model.geom_friction[:, 0]
    v4, v5 = (gym.make(i).unwrapped.model.geom_friction[:, 0] for i in ("Walker2d-v4", "Walker2d-v5"))
    assert np.array_equal(friction, v4) and not np.array_equal(friction, v5)


def test_trial_refuses_bytes_other_than_the_drivers(sources, tmp_path):
    trial = parse_spec(tiny(tmp_path, [study("s", str(sources["hopper"]))])).trials()[0]
    good = resolve_source(trial.dataset, env=trial.env)
    wrong = DatasetSource(**{**good.to_dict(), "sha256": "0" * 64})
    with pytest.raises(DatasetError, match="refusing to train on other data"):
        TrialRunner(trial, Store(str(tmp_path / "sweep")), device=torch.device("cpu"), dataset=wrong)
    elsewhere = DatasetSource(**{**good.to_dict(), "path": str(tmp_path / "not-on-this-node.hdf5")})
    with pytest.raises(DatasetNotFoundError, match="is not on this node"):
        TrialRunner(trial, Store(str(tmp_path / "sweep")), device=torch.device("cpu"), dataset=elsewhere)


# --- a real run: every source, every provenance column --------------------------------------


@pytest.fixture(scope="module")
def provenance_sweep(sources, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    spec = parse_spec(tiny(storage, [
        study("generated", "hopper-random"),
        study("d4rl", "walker2d-medium-v2"),
        study("file", str(sources["hopper"])),
        study("minari", f"minari:{MINARI_ID}"),
    ]))  # fmt: skip
    summary = run_sweep(spec, log=lambda *_: None)
    return spec, summary


def test_provenance_columns_after_a_real_run(provenance_sweep, sources):
    import torch as torch_module

    spec, summary = provenance_sweep
    assert (summary.finished, summary.failed) == (4, 0)
    df = pd.read_parquet(f"{spec.sweep_dir}/trials.parquet").set_index("study")
    assert set(PROVENANCE_COLUMNS) <= set(df.columns)
    expected = {  # study -> (origin, eval env)
        "generated": ("generated", "Hopper-v5"),
        "d4rl": ("d4rl", "Walker2d-v4"),
        "file": ("d4rl", "Hopper-v4"),
        "minari": ("minari", "Hopper-v5"),
    }
    by_study = {t.study: t for t in spec.trials()}
    for name, (origin, eval_env) in expected.items():
        row, trial = df.loc[name], by_study[name]
        assert (row.dataset_origin, row.eval_env) == (origin, eval_env), name
        assert row.dataset_sha256 == sha256_of(row.dataset_source), name
        assert (row.init_family, row.init_source) == ("random", "none")
        assert row.config_key == trial.config_key and row.status == "finished"
        versions = json.loads(row.versions_json)
        assert set(versions) == {"dtsweep", "torch", "transformers", "gymnasium", "mujoco", "ray", "numpy", "pyarrow"}
        assert versions["torch"] == torch_module.__version__
        ck = pd.read_parquet(f"{spec.sweep_dir}/checkpoints.parquet")
        meta = read_checkpoint_metadata(Store(spec.sweep_dir).resolve_rel(ck[ck.trial_id == row.trial_id].path.iloc[0]))
        assert {k: meta["provenance"][k] for k in PROVENANCE_COLUMNS} == {k: row[k] for k in PROVENANCE_COLUMNS}
    assert df.loc["d4rl"].dataset_source == str(sources["walker"])
    assert df.loc["file"].dataset_source == str(sources["hopper"])
    assert sweep_status(spec.sweep_dir)["warnings"] == []


def test_status_warns_when_one_condition_read_different_bytes(provenance_sweep, capsys):
    spec, _ = provenance_sweep
    store = Store(spec.sweep_dir)
    rows = store.read_table("trials.parquet").to_pylist()
    original = store.read_bytes("trials.parquet")
    # Another seed of the generated condition that read other bytes (as a differently
    # regenerated file on another machine would).
    twin = {**next(r for r in rows if r["study"] == "generated"), "trial_id": "f" * 16, "seed": 1, "dataset_sha256": "ab" * 32}
    try:
        store.write_table("trials.parquet", table_from_rows(rows + [twin], TRIALS_SCHEMA))
        assert cli.main(["status", spec.sweep_dir]) == 0
        warnings = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("warning:")]
        assert len(warnings) == 1 and twin["config_key"] in warnings[0] and "2 different dataset files" in warnings[0]
    finally:
        store.write_bytes("trials.parquet", original)


# --- broken datasets: one line, exit 2, nothing written --------------------------------------


def _write_raw(path, **arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v)


def _good(n=20):
    rng = np.random.default_rng(0)
    return {
        "observations": rng.normal(size=(n, 11)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(n, 3)).astype(np.float32),
        "rewards": rng.normal(size=n).astype(np.float32),
        "terminals": np.zeros(n, bool),
        "timeouts": np.eye(n, dtype=bool)[-1],
    }


def _with(key, row, value):
    arrays = _good()
    arrays[key] = arrays[key].copy()
    arrays[key][row] = value
    return arrays


BROKEN = {  # case -> (arrays or None for no file, expected words of the line)
    "missing": (None, "does not exist"),
    "no_d4rl_keys": ({"observations": _good()["observations"], "actions": _good()["actions"]},
                     "not in D4RL's layout, missing ['rewards', 'terminals', 'timeouts']"),
    "mismatched_lengths": ({**_good(), "rewards": np.zeros(7, np.float32)}, "lengths differ: observations has 20 rows, {'rewards': 7}"),
    "nan_observations": (_with("observations", 4, np.nan), "observations holds NaN or inf (first at row 4)"),
    "inf_rewards": (_with("rewards", 9, np.inf), "rewards holds NaN or inf (first at row 9)"),
    "nan_actions": (_with("actions", 2, np.nan), "actions holds NaN or inf (first at row 2)"),
}  # fmt: skip


@pytest.mark.parametrize("case", BROKEN)
def test_broken_dataset_refused_with_one_line_nothing_written(case, tmp_path, capsys, data_cache):
    arrays, expected = BROKEN[case]
    path = tmp_path / "data" / f"{case}.hdf5"
    if arrays is not None:
        _write_raw(path, **arrays)
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(yaml.safe_dump(tiny(tmp_path / "runs", [study("s", str(path), env="hopper")])))
    assert cli.main(["run", str(spec_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], lines
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "runs").exists()


def test_missing_minari_dataset_is_one_line(tmp_path, capsys, sources):
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(yaml.safe_dump(tiny(tmp_path / "runs", [study("s", "minari:dtsweep/absent-v0", env="hopper")])))
    assert cli.main(["run", str(spec_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "'minari:dtsweep/absent-v0' is not in Minari's local store" in lines[0], lines
    assert not (tmp_path / "runs").exists()


# --- what an init is ------------------------------------------------------------------------


def test_init_family_reads_config_and_card_not_name(tmp_path):
    from transformers import GPT2Config, GPT2Model, ImageGPTConfig, ImageGPTModel

    # A GPT-2 checkpoint as `hf download gpt2 --local-dir` leaves it (tiny here: the rule
    # reads config.json's model_type and the absence of a dtsweep card, not the size).
    gpt2_dir = tmp_path / "models" / "gpt2"
    GPT2Model(GPT2Config(n_layer=1, n_embd=8, n_head=1, vocab_size=11, n_positions=16)).save_pretrained(gpt2_dir)
    assert (init_family(str(gpt2_dir)), init_source(str(gpt2_dir))) == ("gpt2", str(gpt2_dir.resolve()))
    igpt_dir = tmp_path / "models" / "some-image-model"
    ImageGPTModel(ImageGPTConfig(n_layer=1, n_embd=8, n_head=1, vocab_size=11, n_positions=16)).save_pretrained(igpt_dir)
    assert init_family(str(igpt_dir)) == "igpt"
    # dtsweep's own models under misleading names: their card says what they are.
    shutil.copytree(ASSETS_DIR / "chibit", tmp_path / "gpt2-large")
    shutil.copytree(ASSETS_DIR / "igpt-mini", tmp_path / "my-lm")
    assert init_family(str(tmp_path / "gpt2-large")) == "chibit"
    assert init_family(str(tmp_path / "my-lm")) == "igpt-mini"
    for name in ASSET_INITS:
        assert (init_family(name), init_source(name)) == (name, f"shipped:{name}")
    assert [init_family(i) for i in ("random", "random-ref", "gpt2", "igpt", "clip")] == [
        "random",
        "random-ref",
        "gpt2",
        "igpt",
        "clip",
    ]
    assert init_source("gpt2") == "hf:gpt2" and init_source("random") == "none"
