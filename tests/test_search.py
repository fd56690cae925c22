"""Search studies: `search:` validation, seeded sampling, and a real search whose driver is
killed mid-sample and rerun (Ray Tune + OptunaSearch on tiny models, real MuJoCo)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dtsweep.orchestrate import run_sweep
from dtsweep.search import fit_space, new_study, setting_values, suggest
from dtsweep.spec import SpecError, load_spec, parse_spec, search_value

ROOT = Path(__file__).resolve().parents[1]

SEARCH = {
    "parameters": {
        "train.grad_clip": {"log_uniform": [0.05, 10], "or": ["off"]},
        "train.lr": {"log_uniform": [1.0e-4, 1.0e-2]},
    },
    "objective": {"metric": "normalized_score", "at": "final"},
    "num_samples": 3,
    "concurrency": 1,
    "seed": 0,
}
TINY_SEARCH = {
    "name": "tiny-search",
    "studies": [{
        "name": "clip", "init": "random", "dataset": "hopper-random", "seed": [0], "context_len": 5,
        "data": {"steps": 3000, "seed": 0},
        "model": {"n_layer": 1, "n_embd": 16, "n_head": 1},
        "train": {"epochs": 4, "steps_per_epoch": 4, "batch_size": 8, "warmup_steps": 2},
        "eval": {"episodes": 2, "max_steps": 30, "action_error_samples": 16},
        "checkpoint_epochs": [0, "final"],
        "search": SEARCH,
    }],
    "ray": {"num_cpus": 2, "max_failures": 0},
}  # fmt: skip


def search_raw(storage=None, **search_changes) -> dict:
    raw = json.loads(json.dumps(TINY_SEARCH))
    if storage is not None:
        raw["storage"] = str(storage)
    raw["studies"][0]["search"].update(search_changes)
    return raw


# ---- spec


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"parameters": {"train.learning_rate": {"log_uniform": [1.0e-5, 1.0e-3]}}},
         "search.parameters.train.learning_rate: not a searchable setting; searchable: train.lr,"),
        ({"parameters": {"train.lr": {"loguniform": [1.0e-5, 1.0e-3]}}},
         "train.lr.loguniform: unknown key; did you mean 'log_uniform'?"),
        ({"parameters": {"train.lr": {"log_uniform": [0, 1.0e-3]}}},
         "train.lr.log_uniform[0]: 0 is not valid; expected a number > 0 (log scale)"),
        ({"parameters": {"train.lr": {"uniform": [1.0e-3, 1.0e-5]}}}, "expected [low, high] with low < high"),
        ({"parameters": {"train.lr": {"log_uniform": [1.0e-5, 1.0e-3], "or": ["off"]}}},
         "train.lr.or[0]: 'off' is not valid; expected a number > 0.0"),
        ({"parameters": {"train.batch_size": {"uniform": [8, 64]}}},
         "train.batch_size: 'uniform' is not valid; expected a distribution for integer values: int, log_int, categorical"),
        ({"parameters": {"train.batch_size": {"int": [0, 64]}}}, "train.batch_size.int[0]: 0 is not valid; expected an integer >= 1"),
        ({"parameters": {"train.dropout": {"uniform": [0.0, 1.0]}}}, "train.dropout.uniform[1]: 1.0 is not valid; expected a probability in [0, 1)"),
        ({"parameters": {"train.grad_clip": {"categorical": [0.25, "off", None]}}}, "distinct values"),
        ({"parameters": {"train.epochs": {"int": [1, 4]}}}, "train.epochs: not a searchable setting"),
        ({"parameters": {"model.n_embd": {"categorical": [16, 24]}, "model.n_head": {"categorical": [1, 16]}}},
         "model.n_head: 16 is not valid; expected a divisor of every sampled model.n_embd (not of 24)"),
        ({"parameters": {}}, "search.parameters: {} is not valid; expected a non-empty mapping"),
        ({"objective": {"metric": "normalised_score"}}, "(did you mean 'normalized_score'?)"),
        ({"objective": {"metric": "action_error", "direction": "maximize"}},
         "objective.direction: 'maximize' is not valid; expected 'minimize' for action_error (lower is better)"),
        ({"objective": {"metric": "action_error", "at": 9}}, "objective.at: 9 is not valid; expected 'final', 'best' or an epoch in 1..4"),
        ({"num_samples": 0}, "search.num_samples: 0 is not valid; expected an integer >= 1"),
        ({"concurrency": 1.5}, "search.concurrency: 1.5 is not valid"),
        ({"scheduler": "hyperband"}, "search.scheduler: 'hyperband' is not valid; expected one of asha"),
        ({"scheduler": {"asha": {"grace_period": 5}}}, "asha.grace_period: 5 is not valid; expected an integer in 1..4"),
        ({"scheduler": {"asha": {"reduction_factor": 1}}}, "asha.reduction_factor: 1 is not valid; expected a number > 1.0"),
        ({"samples": 4}, "search.samples: unknown key; did you mean 'num_samples'?"),
    ],
)  # fmt: skip
def test_bad_search_blocks_name_field_value_and_allowed(change, needle):
    with pytest.raises(SpecError) as e:
        parse_spec(search_raw(**change))
    msg = str(e.value)
    assert needle in msg and msg.startswith("studies[0].search") and "\n" not in msg


def test_model_settings_are_searchable_only_for_random_inits():
    raw = search_raw(parameters={"model.n_layer": {"int": [1, 3]}})
    parse_spec(raw)
    raw["studies"][0]["init"] = ["random", "gpt2"]
    with pytest.raises(SpecError, match=r"model.n_layer: model settings only apply to random inits .* \['gpt2'\]"):
        parse_spec(raw)


def test_search_study_groups_its_grid_and_has_no_grid_trials():
    raw = search_raw()
    raw["studies"][0].update(init=["random", "random-ref"], seed=[0, 1])
    raw["studies"].append({**{k: v for k, v in raw["studies"][0].items() if k != "search"}, "name": "grid"})
    spec = parse_spec(raw)
    search_study, grid_study = spec.studies
    assert len(spec.grid(search_study)) == 4  # init × seed: one search each
    assert {t.study for t in spec.trials()} == {"grid"} and len(spec.trials()) == 4
    # A sampled setting lands in the trial like a YAML value ("off" = no clipping) and
    # changes its identity; the same settings as a grid trial give the grid trial's id.
    base = spec.grid(search_study)[0]
    values = setting_values(search_study.search.parameters, {"train.grad_clip:choice": "off", "train.lr": 1e-3})
    from dtsweep.spec import with_search_values

    t = with_search_values(base, values)
    assert (t.train.grad_clip, t.train.lr, search_value(t, "train.grad_clip")) == (None, 1e-3, None)
    assert t.trial_id != base.trial_id
    assert with_search_values(base, {"train.lr": base.train.lr}).trial_id == spec.grid(grid_study)[0].trial_id


# ---- sampling


def draws(cfg, n: int, group_seed: int = 0, history=(), queued=()) -> list[dict]:
    """The first n parameter sets a group's study proposes (random phase), as the search draws them."""
    study = new_study(cfg, group_seed, list(history))
    for params in queued:
        study.enqueue_trial(params)
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(suggest(trial, cfg.parameters))
    return out


def test_sampled_parameters_are_seeded():
    cfg = parse_spec(search_raw(num_samples=8)).studies[0].search
    first = draws(cfg, 8)
    assert first == draws(cfg, 8)
    assert first != draws(cfg, 8, group_seed=1)
    assert draws(parse_spec(search_raw(seed=1)).studies[0].search, 8) != first
    # Both branches of the conditional clip parameter are drawn, each within the space.
    assert {p["train.grad_clip:choice"] for p in first} == {"off", "log_uniform(0.05, 10)"}
    for p in first:
        assert fit_space(cfg.parameters, p) is not None
        assert ("train.grad_clip" in p) == (p["train.grad_clip:choice"] != "off")
        assert 1e-4 <= p["train.lr"] <= 1e-2


def test_resumed_study_continues_queued_samples_and_draws_new_ones():
    cfg = parse_spec(search_raw()).studies[0].search
    first = draws(cfg, 4)
    history = [{"params_json": json.dumps(p), "status": "finished", "objective": float(i)} for i, p in enumerate(first[:2])]
    history.append({"params_json": json.dumps(first[2]), "status": "stopped", "objective": None, "intermediate": {1: 0.5}})
    resumed = draws(cfg, 3, history=history, queued=[first[3]])
    assert resumed[0] == first[3]  # the interrupted sample comes back first, unchanged
    # The sampler is re-seeded from the history size: a fresh draw repeats no earlier sample
    # (re-seeding with the first run's seed would replay first[0], first[1], ...).
    assert all(p not in first for p in resumed[1:])
    assert resumed == draws(cfg, 3, history=history, queued=[first[3]])
    # A sample outside an edited space is recognised (and then ignored by the search).
    assert fit_space(cfg.parameters, {"train.lr": 1e-3}) is None
    assert fit_space(cfg.parameters, {**first[0], "train.lr": 0.5}) is None


# ---- a real search, killed mid-sample and rerun


def _sample_mid_training(sweep: Path, sample: int) -> tuple[str, int] | None:
    """(trial_id, epochs written) once `sample` is running with a trained epoch written."""
    if not (sweep / "search.parquet").exists():
        return None
    rows = pd.read_parquet(sweep / "search.parquet")
    row = rows[rows["sample"] == sample]
    if row.empty:
        return None
    tid, status = row["trial_id"].iloc[0], row["status"].iloc[0]
    assert status == "running", f"sample {sample} became {status} before the driver was killed"
    metrics = sweep / "metrics" / f"{tid}.parquet"
    if not metrics.exists():
        return None
    epochs = pd.read_parquet(metrics)["epoch"]
    return (tid, int(epochs.max())) if epochs.max() >= 1 else None


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for this file's in-process runs (run_sweep uses a running Ray as is)."""
    from dtsweep.cluster import ray_session

    with ray_session(num_cpus=2):
        yield


@pytest.fixture(scope="module")
def resumed_search(tmp_path_factory, data_cache, local_ray):
    """A 3-sample search run by the CLI, its driver (and its Ray) killed with SIGKILL while
    sample 1 trains, then rerun in this process to completion."""
    storage = tmp_path_factory.mktemp("runs")
    raw = search_raw(storage)
    # Long enough epochs that sample 1, seen mid-training, is still training when it is killed
    # (4 steps per epoch finish in milliseconds on an idle machine).
    raw["studies"][0]["train"]["steps_per_epoch"] = 150
    spec_file = storage / "search.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    sweep = storage / "tiny-search"
    log = open(storage / "driver.log", "w")
    driver = subprocess.Popen([sys.executable, "-m", "dtsweep", "run", str(spec_file)], stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "DTSWEEP_DATA_DIR": str(data_cache)}, start_new_session=True)  # fmt: skip
    killed_at, deadline = None, time.time() + 420
    try:
        while killed_at is None and time.time() < deadline and driver.poll() is None:
            killed_at = _sample_mid_training(sweep, 1)
            time.sleep(0.1)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert killed_at is not None, (storage / "driver.log").read_text()[-3000:]
    before = pd.read_parquet(sweep / "search.parquet").set_index("sample")
    tid0 = before.loc[0, "trial_id"]
    sample0 = (sweep / "metrics" / f"{tid0}.parquet").read_bytes(), (sweep / "metrics" / f"{tid0}.parquet").stat().st_mtime

    lines = []
    t0 = time.time()
    summary = run_sweep(parse_spec(raw), log=lines.append)
    return {"spec": parse_spec(raw), "sweep": sweep, "before": before, "killed_at": killed_at, "sample0": sample0,
            "summary": summary, "lines": lines, "rerun_s": time.time() - t0}  # fmt: skip


def test_rerun_continues_the_interrupted_sample_and_repeats_no_finished_one(resumed_search):
    r = resumed_search
    before, sweep = r["before"], r["sweep"]
    assert list(before["status"]) == ["finished", "running"]
    after = pd.read_parquet(sweep / "search.parquet").set_index("sample")
    assert list(after.index) == [0, 1, 2] and set(after["status"]) == {"finished"}
    assert after["trial_id"].nunique() == 3
    # Sample 0 was not trained again: its metrics file is untouched.
    tid0 = before.loc[0, "trial_id"]
    path = sweep / "metrics" / f"{tid0}.parquet"
    assert (path.read_bytes(), path.stat().st_mtime) == r["sample0"]
    # Sample 1 is the same sample (same settings, same trial) finished by the second run,
    # with one metrics row per epoch (the killed epoch is not duplicated).
    assert after.loc[1, "trial_id"] == before.loc[1, "trial_id"] == r["killed_at"][0]
    assert after.loc[1, "params_json"] == before.loc[1, "params_json"]
    m1 = pd.read_parquet(sweep / "metrics" / f"{after.loc[1, 'trial_id']}.parquet")
    assert sorted(m1["epoch"]) == [0, 1, 2, 3, 4]
    s = r["summary"]
    assert (s.total, s.skipped, s.ran, s.finished, s.failed) == (3, 1, 2, 3, 0)
    assert any("1 of 3 samples done, 1 to continue, 1 new to draw" in line for line in r["lines"])


def test_sampled_parameters_are_those_of_the_seeded_sampler(resumed_search):
    r = resumed_search
    cfg = r["spec"].studies[0].search
    after = pd.read_parquet(r["sweep"] / "search.parquet").set_index("sample")
    params = [json.loads(p) for p in after["params_json"]]
    # First run: the sampler seeded for an empty history; second run: for one finished
    # sample, after the queued interrupted one.
    assert params[:2] == draws(cfg, 2)
    history = [{"params_json": after.loc[0, "params_json"], "status": "finished", "objective": after.loc[0, "objective"]}]
    assert params[2] == draws(cfg, 2, history=history, queued=[params[1]])[1]
    # The value columns hold what each trial ran with.
    for p, (_, row) in zip(params, after.iterrows()):
        v = setting_values(cfg.parameters, p)
        assert row["train.lr"] == v["train.lr"]
        assert (pd.isna(row["train.grad_clip"]) and v["train.grad_clip"] == "off") or row["train.grad_clip"] == v[
            "train.grad_clip"
        ]


def test_samples_write_the_grid_outputs_and_their_objective(resumed_search):
    sweep = resumed_search["sweep"]
    search = pd.read_parquet(sweep / "search.parquet")
    trials = pd.read_parquet(sweep / "trials.parquet").set_index("trial_id")
    metrics = pd.read_parquet(sweep / "metrics.parquet")
    checkpoints = pd.read_parquet(sweep / "checkpoints.parquet")
    for _, row in search.iterrows():
        tid = row["trial_id"]
        assert trials.loc[tid, "status"] == "finished" and trials.loc[tid, "study"] == "clip"
        config = json.loads(trials.loc[tid, "config_json"])
        assert config["train"]["lr"] == row["train.lr"]
        m = metrics[metrics["trial_id"] == tid]
        assert sorted(m["epoch"]) == [0, 1, 2, 3, 4]
        assert row["objective"] == m.loc[m["epoch"] == 4, "normalized_score"].iloc[0] and row["objective_epoch"] == 4
        assert sorted(checkpoints[checkpoints["trial_id"] == tid]["epoch"]) == [0, 4]
    assert (search["metric"] == "normalized_score").all() and (search["direction"] == "maximize").all()


def test_best_fragment_is_a_grid_study_of_the_best_sample(resumed_search):
    sweep = resumed_search["sweep"]
    search = pd.read_parquet(sweep / "search.parquet")
    best = search.loc[search["objective"].idxmax()]
    (fragment,) = (sweep / "search" / "clip").glob("best_*.yaml")
    assert fragment.name == "best_random-hopper-random-K5-seed0.yaml"
    study = yaml.safe_load(fragment.read_text())
    confirm = parse_spec({"name": "confirm", "defaults": {"train": {"lr": 0.5, "epochs": 40}}, "studies": [study]})
    (trial,) = confirm.trials()
    assert trial.trial_id == best["trial_id"]  # a grid run of it would reuse the search's trial
    assert search_value(trial, "train.lr") == best["train.lr"]
    more = parse_spec({"name": "confirm", "studies": [{**study, "seed": {"start": 0, "count": 5}}]}).trials()
    assert [t.seed for t in more] == [0, 1, 2, 3, 4] and more[0].trial_id == best["trial_id"]
    assert any(f"best normalized_score (final epoch) = {best['objective']:.4g}" in line for line in resumed_search["lines"])


def test_rerun_of_a_finished_search_trains_nothing_and_changes_nothing(resumed_search):
    sweep, spec = resumed_search["sweep"], resumed_search["spec"]
    files = {p: (p.stat().st_mtime, p.read_bytes()) for p in sweep.rglob("*") if p.is_file() and "_tune" not in p.parts}
    summary = run_sweep(spec, log=lambda *_: None)
    assert (summary.ran, summary.skipped, summary.finished) == (0, 3, 3)
    for p, (mtime, data) in files.items():
        assert p.stat().st_mtime == mtime and p.read_bytes() == data, p


def test_a_sample_equal_to_a_training_one_waits_and_reuses_its_trial(tmp_path, data_cache, local_ray):
    # One possible setting and two concurrent samples: the second proposal is the trial
    # the first is training; it waits for it, then reuses its outputs (no second training).
    raw = search_raw(tmp_path, parameters={"train.lr": {"categorical": [1e-3]}}, num_samples=2, concurrency=2)
    summary = run_sweep(parse_spec(raw), log=lambda *_: None)
    assert (summary.ran, summary.finished, summary.failed) == (2, 2, 0)
    sweep = tmp_path / "tiny-search"
    search = pd.read_parquet(sweep / "search.parquet").set_index("sample")
    assert search["trial_id"].nunique() == 1 and list(search["reused"]) == [False, True]
    assert search.loc[0, "objective"] == search.loc[1, "objective"]
    (run_dir,) = (sweep / "_tune").iterdir()
    assert len([d for d in run_dir.iterdir() if d.is_dir()]) == 2  # two Tune trials: one trained, one reused
    tid = search["trial_id"].iloc[0]
    # Trial directories are named `<init>-<dataset>-K..-s<seed>-<tid[:8]>`; Tune adds `_<4 hex>`
    # to the second trial of the same name (the reused one).
    (trained,) = [d for d in run_dir.iterdir() if d.name.endswith(f"-{tid[:8]}")]
    results = [json.loads(line) for line in (trained / "result.json").read_text().splitlines()]
    assert [r["epoch"] for r in results] == [0, 1, 2, 3, 4]
    assert pd.read_parquet(sweep / "trials.parquet").set_index("trial_id").loc[tid, "status"] == "finished"


def test_report_plots_objective_against_clip_norm(resumed_search, tmp_path):
    import shutil

    from dtsweep.report import write_report

    sweep = tmp_path / "sweep"
    shutil.copytree(resumed_search["sweep"], sweep, ignore=shutil.ignore_patterns("_tune"))
    md = write_report(sweep, n_boot=50).read_text()
    assert (sweep / "report" / "figures" / "search_objective.png").stat().st_size > 10_000
    assert "figures/search_objective.png" in md
    assert "3 trials of search studies (clip) are left out of the seed statistics" in md


def test_sweep_files_are_valid():
    quick = load_spec(ROOT / "sweeps" / "search-quick.yaml")
    (study,) = quick.studies
    assert study.search.num_samples >= 4 and study.init == ("random",) and study.dataset == ("hopper-random",)
    clipping = load_spec(ROOT / "sweeps" / "igpt-clipping.yaml")
    inits = {i for st in clipping.studies for i in st.init}
    assert inits == {"igpt", "gpt2", "igpt-mini", "chibit"}
    for st in clipping.studies:
        clip = {p.path: p for p in st.search.parameters}["train.grad_clip"]
        assert (clip.distribution, clip.low, clip.high, clip.alternatives) == ("log_uniform", 0.05, 10.0, (False,))
        assert "train.lr" in {p.path for p in st.search.parameters} and st.dataset == ("hopper-medium",)


def test_bare_yaml_off_means_no_clipping():
    # YAML 1.1 reads a bare `off` as false; in a grid value and as a search alternative it
    # means no clipping, like "off" and null.
    raw = yaml.safe_load("""
name: t
studies:
  - {name: grid, init: random, dataset: hopper-random, seed: [0], train: {grad_clip: off}}
  - name: search
    init: random
    dataset: hopper-random
    seed: [0]
    search:
      parameters: {train.grad_clip: {log_uniform: [0.05, 10], or: [off]}}
      objective: {metric: normalized_score}
      num_samples: 2
""")
    spec = parse_spec(raw)
    assert spec.trials()[0].train.grad_clip is None
    params = spec.studies[1].search.parameters
    off = setting_values(params, {"train.grad_clip:choice": False})
    from dtsweep.spec import with_search_values

    assert with_search_values(spec.grid(spec.studies[1])[0], off).trial_id == spec.trials()[0].trial_id
