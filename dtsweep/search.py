"""Search studies: Optuna (TPE) samples training settings, Ray Tune runs the samples.

A study with a `search:` block samples settings instead of listing them:

    studies:
      - name: clipping
        init: [igpt, gpt2]
        dataset: hopper-medium
        seed: [0]
        search:
          parameters:
            train.grad_clip: {log_uniform: [0.05, 10], or: [off]}   # a draw, or no clipping
            train.lr: {log_uniform: [1.0e-5, 1.0e-3]}
          objective: {metric: normalized_score, at: final}        # direction: maximize
          num_samples: 24          # per group
          concurrency: 4           # samples of a group training at once
          random_samples: 10       # random draws before TPE models the results
          scheduler: {asha: {grace_period: 4, reduction_factor: 3}}   # optional
          seed: 0

Groups. Every point of the study's grid (init × dataset × context_len × swap_block × seed)
is one *group* with its own search: igpt and gpt2 get separate best settings, and each
seed of the list runs a replicate search (the spread of their best settings shows how
noisy the search is). A group's sampler is seeded from (search.seed, the group's training
seed), so groups that differ only in init or dataset see the same random proposals first:
their searches start paired.

Samples are trials. A sample's settings are applied to the group's trial
(`dtsweep.spec.with_search_values`), which gets its usual content-hashed trial_id and writes
metrics, checkpoints and its trials.parquet row exactly like a grid trial. A sample whose
trial already finished (an earlier sample, a grid study) is not trained again: its stored
metrics are reused.

Outputs, besides the usual ones of every trial:

    search.parquet                          one row per sample (columns below)
    search/<study>/best_<group>.yaml        the group's best finished sample as a grid study
                                            mapping: paste it under `studies:` of a sweep

search.parquet columns: the trial columns (trial_id, study, init, env, dataset,
context_len, swap_block, seed), then `group` (e.g. "igpt-hopper-medium-K20-seed0"),
`sample` (0, 1, ... within the group, in the order Optuna proposed them), `status`
(running | finished | stopped (by ASHA) | failed), `objective` (null unless finished),
`objective_epoch` (the epoch it was read at), `metric`, `at`, `direction`, `epochs_done`,
`reused` (the trial had already finished: nothing was trained), `error`, `updated_at`,
`params_json` (Optuna's own parameter names and values, incl. the `<path>:choice` switch of
a parameter with `or:` values), and one column per searched path (`train.lr`,
`train.grad_clip`, ...) holding the value the trial ran with (null grad_clip: no clipping).

Resume. search.parquet is the source of truth, not Tune's or Optuna's saved state: each
run rebuilds every group's Optuna study in memory from it, re-computing objectives from
the metrics files (so changing the objective re-scores old samples). Finished, stopped
and failed samples count towards num_samples and are never proposed again; samples left
`running` by an interrupted driver are queued first and resume their trial from its last
Tune checkpoint. The sampler is re-seeded from the history size, so a resumed search does
not replay the random draws of the first run. Samples whose settings fall outside an
edited search space are kept in the file but ignored.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
import pandas as pd
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from dtsweep.cluster import ray_session, use_gpus
from dtsweep.inputs import dataset_key, prepare_datasets, publish_datasets, publish_inits, trial_inits
from dtsweep.schemas import search_schema
from dtsweep.spec import (
    SEARCHABLE,
    Objective,
    SearchConfig,
    SearchParam,
    Study,
    SweepSpec,
    Trial,
    search_value,
    with_search_values,
)
from dtsweep.store import Store, table_from_rows, to_numpy_rows
from dtsweep.sweepdir import Ledger, RunSummary, compact, epochs_done, latest_resume_checkpoints
from dtsweep.train.loop import trial_provenance
from dtsweep.tuning import build_tuner, fit_errors, job_config, job_of, progress_callback, run_name, train_trial

SEARCH_FILE = "search.parquet"
SWITCH = ":choice"  # Optuna name suffix of the "range or alternative" pick of an `or:` parameter

# Optuna trial state of each sample status that is a result (running samples are not told).
_STATES = {"finished": TrialState.COMPLETE, "stopped": TrialState.PRUNED, "failed": TrialState.FAIL}


# --------------------------------------------------------------------------------------
# The search space: spec parameters <-> Optuna parameters <-> trial settings
# --------------------------------------------------------------------------------------


def range_label(p: SearchParam) -> str:
    """The switch choice meaning "draw from the range" of a parameter with `or:` values."""
    return f"{p.distribution}({p.low:g}, {p.high:g})"


def _distribution(p: SearchParam) -> BaseDistribution:
    if p.distribution == "categorical":
        return CategoricalDistribution(p.choices)
    log = p.distribution.startswith("log_")
    if p.distribution in ("int", "log_int"):
        return IntDistribution(int(p.low), int(p.high), log=log)
    return FloatDistribution(float(p.low), float(p.high), log=log)


def walk_space(params: tuple, pick: Callable[[str, BaseDistribution], Any]) -> dict[str, Any]:
    """Run the conditional space once; `pick(name, distribution)` chooses each value.

    Returns Optuna's parameters {name: value}: one per searched path, plus
    "<path>:choice" for a path with `or:` values, whose range is only drawn from (and
    named) when the switch picked the range.
    """
    raw: dict[str, Any] = {}
    for p in params:
        if p.alternatives:
            name = p.path + SWITCH
            raw[name] = pick(name, CategoricalDistribution((range_label(p), *p.alternatives)))
            if raw[name] != range_label(p):
                continue
        raw[p.path] = pick(p.path, _distribution(p))
    return raw


def suggest(trial: optuna.Trial, params: tuple) -> dict[str, Any]:
    """Define-by-run space for Optuna (and Ray's OptunaSearch): draws every parameter."""

    def pick(name: str, d: BaseDistribution) -> Any:
        if isinstance(d, CategoricalDistribution):
            return trial.suggest_categorical(name, d.choices)
        if isinstance(d, IntDistribution):
            return trial.suggest_int(name, d.low, d.high, log=d.log)
        return trial.suggest_float(name, d.low, d.high, log=d.log)

    return walk_space(params, pick)


def _contains(d: BaseDistribution, v: Any) -> bool:
    if isinstance(d, CategoricalDistribution):
        return any(v == c and type(v) is type(c) for c in d.choices)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    if isinstance(d, IntDistribution) and not float(v).is_integer():
        return False
    return d.low <= v <= d.high


def fit_space(params: tuple, raw: dict) -> dict[str, BaseDistribution] | None:
    """Distributions of the Optuna parameters `raw`, or None if `raw` is not a sample of
    the space `params` (a history sample from before the space was edited)."""
    dists: dict[str, BaseDistribution] = {}

    def pick(name: str, d: BaseDistribution) -> Any:
        if name not in raw or not _contains(d, raw[name]):
            raise KeyError(name)
        dists[name] = d
        return raw[name]

    try:
        walk_space(params, pick)
    except KeyError:
        return None
    return dists if set(dists) == set(raw) else None


def setting_values(params: tuple, raw: dict) -> dict[str, Any]:
    """Optuna's parameters -> {searched path: value for the trial} ("off" stays "off")."""
    out = {}
    for p in params:
        switch = raw.get(p.path + SWITCH)
        out[p.path] = raw[p.path] if switch is None or switch == range_label(p) else switch
    return out


# --------------------------------------------------------------------------------------
# Sampler, history and objective
# --------------------------------------------------------------------------------------


def make_sampler(cfg: SearchConfig, group_seed: int, n_history: int) -> optuna.samplers.TPESampler:
    """Seeded TPE: multivariate (lr and clip norm interact) with `group` decomposition, which
    models a conditional space (the clip norm exists only when clipping is on) directly.

    The seed mixes the history size in: a resumed search must not replay the random draws
    that the first run already made.
    """
    seed = int(np.random.SeedSequence([cfg.seed, group_seed, n_history]).generate_state(1)[0])
    with warnings.catch_warnings():
        # `group` has been "experimental" since Optuna 2.8; it is the documented way to use
        # multivariate TPE on conditional spaces.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=cfg.random_samples, multivariate=True, group=True, constant_liar=True
        )


def new_study(cfg: SearchConfig, group_seed: int, history: list[dict], name: str = "search", storage: Any = None) -> optuna.Study:
    """An Optuna study (in memory unless `storage` is given) holding `history` (rows of
    search.parquet with a result status and fit_space params), with a sampler seeded for
    that history."""
    study = optuna.create_study(
        storage=storage or optuna.storages.InMemoryStorage(),
        sampler=make_sampler(cfg, group_seed, len(history)),
        study_name=name,
        direction=cfg.objective.direction,
    )
    for row in history:
        raw = json.loads(row["params_json"])
        state = _STATES[row["status"]]
        study.add_trial(
            optuna.trial.create_trial(
                params=raw,
                distributions=fit_space(cfg.parameters, raw),
                value=row["objective"] if state == TrialState.COMPLETE else None,
                intermediate_values=row.get("intermediate") or None,
                state=state,
            )
        )
    return study


def objective_of(metrics: pd.DataFrame, obj: Objective, epochs: int) -> tuple[float | None, int | None]:
    """(value, epoch) of the objective in a trial's metrics rows; (None, None) if not reached.

    metrics: rows of metrics/<trial_id>.parquet (one per epoch). Epoch 0 (before training)
    never counts; "best" is the best evaluated epoch in the objective's direction.
    """
    m = metrics[(metrics["epoch"] >= 1) & metrics[obj.metric].notna()]
    if obj.at == "best":
        if m.empty:
            return None, None
        i = m[obj.metric].idxmax() if obj.direction == "maximize" else m[obj.metric].idxmin()
        return float(m.loc[i, obj.metric]), int(m.loc[i, "epoch"])
    epoch = epochs if obj.at == "final" else int(obj.at)
    row = m[m["epoch"] == epoch]
    return (float(row[obj.metric].iloc[0]), epoch) if len(row) else (None, None)


def _intermediate(metrics: pd.DataFrame, metric: str) -> dict[int, float]:
    m = metrics[(metrics["epoch"] >= 1) & metrics[metric].notna()]
    return {int(e): float(v) for e, v in zip(m["epoch"], m[metric])}


def best_row(rows: list[dict], obj: Objective) -> dict | None:
    """The finished sample with the best objective (ties: the earliest sample)."""
    done = [r for r in rows if r["status"] == "finished" and r["objective"] is not None]
    if not done:
        return None
    sign = -1.0 if obj.direction == "maximize" else 1.0
    return min(done, key=lambda r: (sign * r["objective"], r["sample"]))


# --------------------------------------------------------------------------------------
# Groups and search.parquet
# --------------------------------------------------------------------------------------


@dataclass
class Group:
    """One point of a search study's grid: a search of its own."""

    study: Study
    base: Trial  # the point's trial before sampled settings are applied

    @property
    def key(self) -> str:
        t = self.base
        swap = f"-swap{t.swap_block}" if t.swap_block is not None else ""
        raw = f"{t.init}-{t.dataset}-K{t.context_len}{swap}-seed{t.seed}"
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", raw.strip("/"))

    def trial(self, raw: dict) -> Trial:
        return with_search_values(self.base, setting_values(self.study.search.parameters, raw))


def search_groups(spec: SweepSpec) -> list[Group]:
    return [Group(st, t) for st in spec.studies if st.search is not None for t in spec.grid(st)]


class SearchTable:
    """search.parquet: one row per (study, group, sample), rewritten atomically on each change.

    Rows of studies or groups the current spec no longer has are kept.
    """

    def __init__(self, store: Store):
        self.store = store
        old = store.read_table(SEARCH_FILE).to_pylist() if store.exists(SEARCH_FILE) else []
        self.rows: dict[tuple, dict] = {(r["study"], r["group"], r["sample"]): r for r in old}

    def group_rows(self, group: Group) -> list[dict]:
        rows = [r for (s, g, _), r in self.rows.items() if s == group.study.name and g == group.key]
        return sorted(rows, key=lambda r: r["sample"])

    def put(self, row: dict) -> None:
        row = {**row, "updated_at": dt.datetime.now(dt.timezone.utc)}
        self.rows[(row["study"], row["group"], row["sample"])] = row
        self.write()

    def write(self) -> None:
        schema = search_schema({k: SEARCHABLE[k] for r in self.rows.values() for k in r if k in SEARCHABLE})
        rows = sorted(self.rows.values(), key=lambda r: (r["study"], r["group"], r["sample"]))
        self.store.write_table(SEARCH_FILE, table_from_rows(rows, schema))


def sample_row(group: Group, sample: int, raw: dict, trial: Trial, status: str, **extra) -> dict:
    obj = group.study.search.objective
    return {
        **trial.columns(),
        "group": group.key,
        "sample": sample,
        "status": status,
        "objective": None,
        "objective_epoch": None,
        "metric": obj.metric,
        "at": str(obj.at),
        "direction": obj.direction,
        "epochs_done": 0,
        "reused": False,
        "error": None,
        "params_json": json.dumps(raw, sort_keys=True),
        **{p.path: search_value(trial, p.path) for p in group.study.search.parameters},
        **extra,
    }


def _read_metrics(store: Store, trial_id: str) -> pd.DataFrame:
    rel = f"metrics/{trial_id}.parquet"
    if not store.exists(rel):
        return pd.DataFrame({"epoch": pd.Series([], dtype="int64")})
    return store.read_pandas(rel)


def score(store: Store, group: Group, row: dict, error: str | None = None) -> dict:
    """`row` with status, objective and epochs_done read from the trial's metrics file."""
    trial_id, epochs = row["trial_id"], group.base.epochs
    m = _read_metrics(store, trial_id)
    obj = group.study.search.objective
    done = int(m["epoch"].max()) if len(m) else 0
    value, epoch = objective_of(m, obj, epochs) if obj.metric in m else (None, None)
    if error is not None or row["status"] == "failed":
        status = "failed"
    elif done >= epochs:
        status = "finished" if value is not None else "failed"
        error = error if value is not None else f"no {obj.metric} at epoch {obj.at}"
    else:
        status = "stopped"
    return {**row, "status": status, "objective": value if status == "finished" else None,
            "objective_epoch": epoch if status == "finished" else None, "epochs_done": done,
            "error": error if status == "failed" else None,
            "intermediate": _intermediate(m, obj.metric) if obj.metric in m else {}}  # fmt: skip


# --------------------------------------------------------------------------------------
# Tune: the trainable and the searcher
# --------------------------------------------------------------------------------------


def search_trial(config: dict) -> None:
    """Tune trainable of one sample: `train_trial`, or, when the sample's trial already
    finished (config["job"]["reuse"]), one report of its stored last epoch (no training)."""
    job = job_of(config)
    if not job["reuse"]:
        train_trial(config)
        return
    from ray import tune

    m = _read_metrics(Store(job["sweep_dir"]), job["trial_id"]).sort_values("epoch")
    (last,) = to_numpy_rows(m.tail(1))
    tune.report({k: v for k, v in last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})


@dataclass
class GroupRun:
    """The driver's state while one group's samples run: the bridge between Optuna's
    trials, Tune's trials and the sweep directory."""

    group: Group
    store: Store
    table: SearchTable
    ledger: Ledger
    resume: dict  # trial_id -> (epoch, Tune checkpoint) of earlier runs
    has_gpu: bool
    sources: dict  # dtsweep.inputs.dataset_key -> DatasetSource, resolved and published by the driver
    inits: dict  # init as written -> its published copy (dtsweep.inputs.publish_inits)
    log: Callable
    continuing: dict  # trial_id -> sample number of an interrupted sample, queued first
    next_sample: int
    live: dict = field(default_factory=dict)  # trial_id -> sample, training now
    by_tune: dict = field(default_factory=dict)  # Tune trial id -> (sample, raw, Trial)
    ran: dict = field(default_factory=dict)  # trial_id -> its latest sample started in this run
    started: int = 0  # samples started in this run

    def __getstate__(self) -> dict:
        # Tune pickles its search algorithm (and this run with it) into tuner.pkl, which dtsweep
        # never restores (search.parquet is the resume state); `log` may be a function pickle
        # cannot name (print, after a library replaced builtins.print).
        return {**self.__dict__, "log": None}

    def start(self, tune_id: str, raw: dict, trial: Trial) -> dict:
        """Record a new sample as running; returns its Tune config (`train_trial`'s)."""
        tid = trial.trial_id
        sample = self.continuing.pop(tid, None)
        if sample is None:
            sample, self.next_sample = self.next_sample, self.next_sample + 1
        reuse = epochs_done(self.store, tid) >= trial.epochs
        self.table.put(sample_row(self.group, sample, raw, trial, "running", reused=reuse))
        if not reuse or tid not in self.ledger.rows:  # a reused trial keeps its row (maybe a grid study's)
            self.ledger.trials[tid] = trial
            self.ledger.set_provenance(trial_provenance([trial], self.sources))
            self.ledger.set(tid, "finished" if reuse else "running")
        self.live[tid] = sample
        self.by_tune[tune_id] = (sample, raw, trial)
        self.ran[tid] = sample
        self.started += 1
        values = " ".join(f"{p.path}={_fmt(p.path, search_value(trial, p.path))}" for p in self.group.study.search.parameters)
        self.log(f"  sample {sample} -> trial {tid}{' (already trained: reused)' if reuse else ''}: {values}")
        resume = self.resume.get(tid, (None, None))[1] if not reuse else None
        source = self.sources[dataset_key(trial)]
        return job_config(trial, self.store, has_gpu=self.has_gpu, dataset=source.to_dict(), resume_from=resume, reuse=reuse,
                          inits=trial_inits(trial, self.inits))  # fmt: skip

    def finish(self, tune_id: str, error: bool) -> dict:
        """Score a sample Tune is done with; returns its search.parquet row (with `intermediate`)."""
        sample, raw, trial = self.by_tune.pop(tune_id)
        self.live.pop(trial.trial_id, None)
        row = self.table.rows[(self.group.study.name, self.group.key, sample)]
        row = score(self.store, self.group, {**row, "status": "running"}, "error (see trials.parquet)" if error else None)
        self.table.put({k: v for k, v in row.items() if k != "intermediate"})
        if not row["reused"]:
            self.ledger.set(trial.trial_id, row["status"], row["error"])
        obj = "" if row["objective"] is None else f" {row['metric']}@{row['at']} = {row['objective']:.4g}"
        self.log(f"  sample {sample} {row['status']}{obj}")
        return row


def _fmt(path: str, v: Any) -> str:
    if v is None:  # grad_clip None: no clipping; a model setting None: the init's own
        return "off" if path == "train.grad_clip" else "default"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _searcher_class():
    from ray.tune.search.optuna import OptunaSearch

    class GroupSearch(OptunaSearch):
        """OptunaSearch whose samples become dtsweep trials, scored from the sweep directory.

        Objectives are read from the metrics files when Tune is done with a trial (so a
        trial resumed from a checkpoint, or reused, is scored on all its epochs). A sample
        whose trial is training under another sample waits until that one finishes and is
        then reused, so two Tune trials never write the same trial's files.
        """

        def __init__(self, run: GroupRun, **kwargs):
            super().__init__(**kwargs)
            self.run = run
            self.parked = None  # (Optuna trial, raw, Trial) waiting for its duplicate

        def suggest(self, trial_id: str) -> dict | None:
            if self.parked is not None:
                ot_trial, raw, trial = self.parked
                if trial.trial_id in self.run.live:
                    return None
                self.parked = None
                self._ot_trials[trial_id] = ot_trial
            else:
                super().suggest(trial_id)
                ot_trial = self._ot_trials[trial_id]
                raw = dict(ot_trial.params)
                trial = self.run.group.trial(raw)
                if trial.trial_id in self.run.live:
                    self.parked = (self._ot_trials.pop(trial_id), raw, trial)
                    return None
            return self.run.start(trial_id, raw, trial)

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            pass  # scored from the metrics file at the end (see class docstring)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if trial_id in self._completed_trials or trial_id not in self.run.by_tune:
                return
            self._completed_trials.add(trial_id)
            ot_trial = self._ot_trials[trial_id]
            row = self.run.finish(trial_id, error)
            state = _STATES[row["status"]]
            for epoch, v in row["intermediate"].items():
                ot_trial.report(v, epoch)
            self._ot_study.tell(ot_trial, row["objective"] if state == TrialState.COMPLETE else None, state=state)

        def save_to_dir(self, checkpoint_dir: str, session_str: str = "default") -> None:
            pass  # search.parquet is the resume state; Tune's searcher checkpoint is not used

    return GroupSearch


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------


def run_searches(spec: SweepSpec, store: Store, ledger: Ledger, *, address: str | None = None,
                 retry_failed: bool = False, log=print) -> RunSummary:  # fmt: skip
    """Run every search group of `spec` (called by `dtsweep.orchestrate.run_sweep`, which holds
    the lease and ran the grid studies). Returns counts where each sample counts as a trial
    (total = num_samples per group)."""
    groups = search_groups(spec)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    table = SearchTable(store)
    plans = [(g, *_plan_group(g, store, table, retry_failed, log)) for g in groups]
    todo = [p for p in plans if p[3] > 0]
    for row in table.rows.values():  # a sample ASHA stopped stays stopped, whatever its trial's row says
        if row["status"] == "stopped" and ledger.rows.get(row["trial_id"], {}).get("status") == "pending":
            ledger.rows[row["trial_id"]]["status"] = "stopped"
    ran = 0
    if todo:
        bases = [g.base for g, *_ in todo]
        # Every node reads the published copies, not the driver's files (dtsweep.inputs).
        sources = publish_datasets(store, prepare_datasets(bases, log=log), log=log)
        inits = publish_inits(store, bases, log=log)
        with ray_session(address, num_cpus=spec.ray.num_cpus):
            has_gpu = use_gpus(spec.ray.gpu, any(g.base.resources.gpu > 0 for g, *_ in todo), log=log)
            for group, history, continuing, remaining in todo:
                ran += _fit_group(spec, group, history, continuing, remaining, store, table, ledger, has_gpu, sources, inits, log)
                _report_best(store, group, table.group_rows(group), log)
    for group, *_ in plans:
        if all(group is not g for g, *_ in todo):
            _report_best(store, group, table.group_rows(group), log)
    if ran:
        compact(store)

    total = skipped = finished = failed = 0
    for group, history, *_ in plans:
        rows = table.group_rows(group)
        total += group.study.search.num_samples
        skipped += len(history)
        finished += sum(r["status"] == "finished" for r in rows)
        failed += sum(r["status"] == "failed" for r in rows)
    return RunSummary(store.uri(), total, skipped, ran, finished, failed)


def _plan_group(group: Group, store: Store, table: SearchTable, retry_failed: bool, log) -> tuple[list, dict, int]:
    """(history, continuing, remaining) of a group from search.parquet.

    history: rows with a result, re-scored from the metrics files (told to Optuna);
    continuing: trial_id -> sample of the samples to run again first (interrupted, or
    failed with --retry-failed); remaining: new samples still to draw.
    """
    cfg = group.study.search
    history, continuing, ignored, changed = [], {}, 0, False
    for row in table.group_rows(group):
        if fit_space(cfg.parameters, json.loads(row["params_json"])) is None:
            ignored += 1
            continue
        if row["status"] == "running" or (retry_failed and row["status"] == "failed"):
            continuing[row["trial_id"]] = row["sample"]
            continue
        rescored = score(store, group, row, row["error"] if row["status"] == "failed" else None)
        kept = {k: v for k, v in rescored.items() if k != "intermediate"}
        if kept != row:
            table.rows[(row["study"], row["group"], row["sample"])] = kept
            changed = True
        history.append(rescored)
    if changed:
        table.write()
    remaining = cfg.num_samples - len(history) - len(continuing)
    log(f"search {group.study.name} [{group.key}]: {len(history)} of {cfg.num_samples} samples done, "
        f"{len(continuing)} to continue, {max(remaining, 0)} new to draw"
        + (f" ({ignored} outside the current space, ignored)" if ignored else ""))  # fmt: skip
    return history, continuing, max(remaining, 0) + len(continuing)


def _fit_group(spec, group: Group, history, continuing, n_run, store, table, ledger, has_gpu, sources, inits, log) -> int:
    """Run `n_run` samples of one group (the continuing ones first) as one Tune experiment.

    Returns the number of samples started. Raises KeyboardInterrupt if Tune stopped
    with samples still running (Ctrl-C): they continue on the next run.
    """
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    cfg, label = group.study.search, f"search {group.study.name} [{group.key}]"
    storage = optuna.storages.InMemoryStorage()
    study = new_study(cfg, group.base.seed, history, name=f"{group.study.name}/{group.key}", storage=storage)
    params_of = {s: json.loads(table.rows[(group.study.name, group.key, s)]["params_json"]) for s in continuing.values()}
    for s in sorted(params_of):
        study.enqueue_trial(params_of[s])
    run = GroupRun(
        group=group, store=store, table=table, ledger=ledger, resume=latest_resume_checkpoints(store),
        has_gpu=has_gpu, sources=sources, inits=inits, log=log, continuing=dict(continuing),
        next_sample=1 + max((r["sample"] for r in table.group_rows(group)), default=-1),
    )  # fmt: skip
    obj = cfg.objective
    mode = "max" if obj.direction == "maximize" else "min"
    # metric=None: OptunaSearch then names it "_metric", which Tune does not require in
    # results; objectives come from the metrics files (GroupSearch.on_trial_complete).
    searcher = _searcher_class()(
        run, space=lambda t: suggest(t, cfg.parameters), metric=None, mode=mode,
        sampler=study.sampler, storage=storage, study_name=study.study_name,
    )  # fmt: skip
    scheduler = None
    if cfg.scheduler is not None:
        scheduler = ASHAScheduler(
            time_attr="epoch", metric=obj.metric, mode=mode, max_t=group.base.epochs,
            grace_period=cfg.scheduler.grace_period, reduction_factor=cfg.scheduler.reduction_factor,
        )  # fmt: skip

    tuner = build_tuner(
        search_trial, spec=spec, store=store, name=run_name(f"search-{group.study.name}-{group.key}"),
        has_gpu=has_gpu, callbacks=[progress_callback(n_total=n_run, n_done=0, work_epochs=n_run * group.base.epochs, label=label)],
        search_alg=ConcurrencyLimiter(searcher, max_concurrent=cfg.concurrency), scheduler=scheduler, num_samples=n_run,
        # A sample's worker stays for the next sample (same resources): importing torch
        # and building the data in a fresh worker costs more than a small sample's training.
        reuse_actors=True,
    )  # fmt: skip
    # Error lines for the failed samples of this run (the searcher only learns "error").
    for tid, msg in fit_errors(tuner.fit()).items():
        if msg is not None:
            key = (group.study.name, group.key, run.ran[tid])
            table.put({**table.rows[key], "error": msg})
            ledger.set(tid, "failed", msg)
    if run.live:
        log(f"{label}: interrupted with {len(run.live)} samples running; run the same command again to continue")
        raise KeyboardInterrupt
    return run.started


def best_study(group: Group, row: dict) -> dict:
    """The best sample as a grid study mapping (every setting resolved, so the sweep that
    includes it cannot change it through its defaults); its trial has the sample's trial_id."""
    t = group.trial(json.loads(row["params_json"]))
    d = t.to_dict()
    study = {"name": f"{group.study.name}-best-{group.key}", "init": t.init, "dataset": t.dataset,
             "context_len": t.context_len, "seed": [t.seed]}  # fmt: skip
    if t.swap_block is not None:
        study.update(swap_block=t.swap_block, swap_from=t.swap_from)
    study.update(train=d["train"], eval=d["eval"], data=d["data"])
    if t.model:
        study["model"] = dict(t.model)
    study["checkpoint_epochs"] = list(t.checkpoint_epochs)
    if t.checkpoint_dtype != "float32":  # part of the trial id when set
        study["checkpoint_dtype"] = t.checkpoint_dtype
    return study


def _report_best(store: Store, group: Group, rows: list[dict], log) -> None:
    cfg = group.study.search
    best = best_row(rows, cfg.objective)
    label = f"search {group.study.name} [{group.key}]"
    if best is None:
        log(f"{label}: no finished sample yet")
        return
    n = sum(r["status"] == "finished" for r in rows)
    values = " ".join(f"{p.path}={_fmt(p.path, best[p.path])}" for p in cfg.parameters)
    what = (
        f"{cfg.objective.metric} ({cfg.objective.at} epoch)"
        if cfg.objective.at in ("final", "best")
        else f"{cfg.objective.metric} (epoch {cfg.objective.at})"
    )
    header = (
        f"# Best of search study {group.study.name!r}, group {group.key}: {what} = {best['objective']:.6g}\n"
        f"# (sample {best['sample']}, trial {best['trial_id']}, best of {n} finished samples).\n"
        f"# A grid study: paste it under `studies:` of a sweep; a single seed's best is optimistic,\n"
        f"# so widen `seed` to confirm it, e.g. seed: {{start: 0, count: 10}}.\n"
    )
    text = header + yaml.safe_dump(best_study(group, best), sort_keys=False)
    rel = f"search/{group.study.name}/best_{group.key}.yaml"
    if not store.exists(rel) or store.read_bytes(rel).decode() != text:
        store.write_bytes(rel, text.encode())
    log(
        f"{label}: best {what} = {best['objective']:.4g} with {values} (sample {best['sample']}, trial {best['trial_id']}) -> {store.uri(rel)}"
    )
