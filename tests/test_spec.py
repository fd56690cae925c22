"""Spec expansion, validation and trial identity."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from dtsweep.spec import SpecError, Trial, load_spec, parse_spec, resolve_checkpoint_epochs

ROOT = Path(__file__).resolve().parents[1]

BASE = {
    "name": "t",
    "storage": "runs",
    "studies": [
        {"name": "a", "init": ["random", "random-ref"], "dataset": ["hopper-random", "walker2d-random"], "seed": [0, 1, 2]}
    ],
}


def spec_with(**study_changes):
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    raw["studies"][0].update(study_changes)
    return raw


def test_grid_is_cartesian_product_per_study_and_union_across_studies():
    raw = spec_with(context_len=[1, 20])
    raw["studies"].append(
        {"name": "b", "init": "random", "env": ["hopper"], "quality": "random", "seed": {"start": 5, "count": 2}}
    )
    trials = parse_spec(raw).trials()
    a = [t for t in trials if t.study == "a"]
    b = [t for t in trials if t.study == "b"]
    assert len(a) == 2 * 2 * 2 * 3
    assert [t.seed for t in b] == [5, 6] and {t.dataset for t in b} == {"hopper-random"}
    assert len({t.trial_id for t in trials}) == len(trials)
    assert {(t.init, t.env, t.context_len, t.seed) for t in a} == {
        (i, e, k, s) for i in ("random", "random-ref") for e in ("hopper", "walker2d") for k in (1, 20) for s in (0, 1, 2)
    }


def test_paper_defaults_applied():
    t = parse_spec(BASE).trials()[0]
    assert (t.train.batch_size, t.train.lr, t.train.weight_decay, t.train.grad_clip) == (64, 1e-4, 1e-4, 0.25)
    assert (t.train.epochs, t.train.steps_per_epoch, t.context_len) == (40, 2500, 20)
    assert (t.train.dropout.resid, t.train.dropout.attn, t.train.dropout.embd) == (0.2, 0.1, 0.1)
    assert t.target_return == 3600.0 and t.checkpoint_epochs == (0, 1, 4, 10, 40)


def test_defaults_merge_key_by_key_with_study_sections():
    raw = spec_with(train={"epochs": 10})
    raw["defaults"] = {"train": {"warmup_steps": 5000, "epochs": 40}}
    t = parse_spec(raw).trials()[0]
    assert (t.train.epochs, t.train.warmup_steps) == (10, 5000)
    assert t.checkpoint_epochs == (0, 1, 4, 10)


def test_trial_id_stable_and_sensitive_to_result_fields_only():
    t1 = parse_spec(BASE).trials()
    t2 = parse_spec(BASE).trials()
    assert [t.trial_id for t in t1] == [t.trial_id for t in t2]
    # A known value pins the hash function itself across code changes (bump RESULT_VERSION deliberately).
    ids = {t.trial_id for t in t1}
    changed = parse_spec(spec_with(train={"lr": 3e-4})).trials()
    assert ids.isdisjoint({t.trial_id for t in changed})
    # Resources and storage do not change what a trial computes.
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    raw["resources"] = {"default": {"cpu": 4, "gpu": 0.5}}
    raw["storage"] = "elsewhere"
    assert {t.trial_id for t in parse_spec(raw).trials()} == ids
    # Another env's target return does not change a hopper trial.
    other = parse_spec(spec_with(eval={"target_return": {"walker2d": 1234}})).trials()
    hop = lambda ts: {t.trial_id for t in ts if t.env == "hopper"}  # noqa: E731
    assert hop(other) == hop(t1)


def test_adding_seeds_adds_only_new_trials():
    before = {t.trial_id for t in parse_spec(BASE).trials()}
    after = {t.trial_id for t in parse_spec(spec_with(seed=[0, 1, 2, 3])).trials()}
    assert before < after and len(after - before) == 4


def test_trial_dict_round_trip():
    from dtsweep.spec import Trial

    for t in parse_spec(spec_with(train={"grad_clip": "off"})).trials():
        assert Trial.from_dict(t.to_dict()) == t
        assert t.train.grad_clip is None


def test_checkpoint_epochs_resolution():
    assert resolve_checkpoint_epochs((0, 1, 4, 10, "final"), 3) == (0, 1, 3)
    assert resolve_checkpoint_epochs((0, "final"), 40) == (0, 40)


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"init": ["random", "gtp2"]}, "unknown init 'gtp2' (did you mean 'gpt2'?)"),
        ({"context_len": 0}, "context_len: 0 is not valid; expected an integer >= 1"),
        ({"train": {"lr": "fast"}}, "train.lr: 'fast' is not valid; expected a number > 0.0"),
        ({"trian": {"lr": 1e-3}}, "studies[0].trian: unknown key; did you mean 'train'?"),
        ({"train": {"learning_rate": 1e-3}}, "unknown key"),
        ({"dataset": ["hopper-mediun"]}, "unknown dataset quality 'mediun'"),
        ({"dataset": ["ant-medium"]}, "unknown env 'ant'"),
        ({"seed": [0, 0]}, "distinct seeds"),
        ({"init": "gpt2", "swap_block": [0]}, "block swaps need a random init"),
        ({"train": {"dropout": {"resid": 1.5}}}, "a probability in [0, 1)"),
        ({"train": {"epochs": 2.5}}, "train.epochs: 2.5 is not valid; expected an integer >= 1"),
    ],
)
def test_bad_specs_name_field_value_and_allowed(change, needle):
    with pytest.raises(SpecError) as e:
        parse_spec(spec_with(**change))
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_swap_block_out_of_range_for_depth():
    with pytest.raises(SpecError, match=r"swap_block: 12 is not valid; expected a block index in 0..11"):
        parse_spec(spec_with(init="random", swap_block=[0, 12]))


def test_malformed_yaml_is_one_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nstudies: [\n  - init: random\n")
    with pytest.raises(SpecError, match="malformed YAML at line"):
        load_spec(p)


def test_cli_bad_spec_exits_2_with_one_line_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    raw = spec_with(init="gtp2")
    raw["storage"] = str(tmp_path / "out")
    bad.write_text(yaml.safe_dump(raw))
    r = subprocess.run([sys.executable, "-m", "dtsweep", "run", str(bad)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "gtp2" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_paper_plan_lists_every_condition_with_ten_seeds():
    spec = load_spec(ROOT / "sweeps" / "paper.yaml")
    trials = spec.trials()
    cond = {}
    for t in trials:
        cond.setdefault((t.study, t.init, t.env, t.context_len, t.swap_block), set()).add(t.seed)
    assert all(seeds == set(range(10)) for seeds in cond.values())
    expected = (
        {("pretraining", i, e, 20, None) for i in ("random", "gpt2", "igpt") for e in ("hopper", "halfcheetah", "walker2d")}
        | {("no-context", i, e, 1, None) for i in ("random", "gpt2") for e in ("hopper", "halfcheetah", "walker2d")}
        | {("block-swap", "random", e, 1, b) for e in ("hopper", "halfcheetah", "walker2d") for b in range(12)}
    )
    assert set(cond) == expected
    assert all(t.epochs == 10 for t in trials if t.study == "block-swap")
    assert len(trials) == len(expected) * 10


def test_cli_plan_json(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dtsweep", "plan", str(ROOT / "sweeps" / "paper.yaml"), "--json"],
                       capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    import json

    out = json.loads(r.stdout)
    assert out["total_trials"] == len(out["trials"]) == 510
    keys = {"trial_id", "study", "init", "env", "dataset", "context_len", "swap_block", "seed", "epochs"}
    assert keys <= set(out["trials"][0])
    assert out["gpu_hours"] > 0 and out["storage_gb"] > 0


def test_example_in_docstring_of_yaml_is_valid():
    text = textwrap.dedent((ROOT / "sweeps" / "quickstart.yaml").read_text())
    spec = parse_spec(yaml.safe_load(text))
    assert len(spec.trials()) >= 4 and len({t.init for t in spec.trials()}) >= 2


def test_dataset_names_keep_their_ids_file_paths_hash_their_bytes(tmp_path, data_cache):
    """Named datasets carry no sha256 (ids of existing specs unchanged); a file path's id is
    made from the file's bytes, so the same bytes elsewhere are the same trial."""
    from dtsweep.data import rollout_dataset, uniform_policy, write_d4rl_hdf5

    named = parse_spec(BASE).trials()
    assert all(t.dataset_sha256 is None for t in named)
    # A ledger written before the field existed (config_json without it) gives the same id.
    old_dict = {k: v for k, v in named[0].to_dict().items() if k != "dataset_sha256"}
    assert Trial.from_dict(old_dict).trial_id == named[0].trial_id
    a, b = tmp_path / "a" / "d.hdf5", tmp_path / "b" / "d.hdf5"
    arrays = rollout_dataset("hopper", uniform_policy(3), 40, seed=0, num_envs=1)
    write_d4rl_hdf5(a, arrays)
    write_d4rl_hdf5(b, arrays)  # the writer is deterministic: same content, same bytes
    trials = [parse_spec(spec_with(dataset=[str(p)])).trials()[0] for p in (a, b)]
    assert trials[0].trial_id == trials[1].trial_id and trials[0].env == "hopper"


def test_dataset_spec_errors_are_one_line(tmp_path, data_cache):
    for dataset, env, needle in (
        (str(tmp_path / "none.hdf5"), None, f"dataset file {tmp_path / 'none.hdf5'} does not exist"),
        ("hopper-medium", "walker2d", "dataset 'hopper-medium' is a hopper dataset, not walker2d"),
    ):
        raw = spec_with(dataset=[dataset], **({"env": env} if env else {}))
        with pytest.raises(SpecError) as info:
            parse_spec(raw)
        assert "\n" not in str(info.value) and needle in str(info.value)


def test_checkpoint_dtype_default_keeps_ids_other_dtypes_are_other_trials():
    ids = [t.trial_id for t in parse_spec(BASE).trials()]
    explicit = parse_spec(spec_with(checkpoint_dtype="float32")).trials()
    assert [t.trial_id for t in explicit] == ids and {t.checkpoint_dtype for t in explicit} == {"float32"}
    half = parse_spec(spec_with(checkpoint_dtype="bfloat16")).trials()
    assert {t.checkpoint_dtype for t in half} == {"bfloat16"} and set(ids).isdisjoint(t.trial_id for t in half)
    # A trial dict written before the setting existed reads as float32, with its old id.
    old = explicit[0].to_dict()
    old.pop("checkpoint_dtype")
    assert Trial.from_dict(old).trial_id == ids[0]
    with pytest.raises(SpecError, match="checkpoint_dtype"):
        parse_spec(spec_with(checkpoint_dtype="float8"))


def test_plan_storage_splits_checkpoints_and_resume_states():
    from dtsweep.costs import plan_sweep

    full = plan_sweep(parse_spec(BASE))
    half = plan_sweep(parse_spec(spec_with(checkpoint_dtype="float16")))
    assert full["checkpoint_storage_gb"] > 0 and full["resume_state_gb_per_trial"] > 0
    assert half["checkpoint_storage_gb"] == pytest.approx(full["checkpoint_storage_gb"] / 2, rel=0.01)
    assert half["resume_state_gb_per_trial"] == full["resume_state_gb_per_trial"]  # training state stays fp32
    fewer = plan_sweep(parse_spec(spec_with(checkpoint_epochs=["final"])))
    assert fewer["checkpoint_storage_gb"] < full["checkpoint_storage_gb"]
    assert full["storage_gb"] == pytest.approx(full["checkpoint_storage_gb"] + full["metrics_storage_gb"], abs=0.002)
