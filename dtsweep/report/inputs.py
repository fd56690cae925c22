"""What the report reads from a sweep directory, and what it says when something is missing.

The column names the report relies on are all here, in `DIAGNOSTIC_COLUMNS` and the
constants below, so aligning the report with a changed output schema is a one-place edit.

Everything is read through `dtsweep.store.Store`, so a sweep on object storage (`s3://`,
`gs://`, `file://`) reads exactly like a local one.

Conditions. Trials that differ in anything but the seed are different conditions (DESIGN
§7): every trial carries `config_key` (its non-seed identity) and the keys the findings
match conditions on (`variant`, `match`, see `Sweep.keys`); nothing groups by init name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from dtsweep.spec import HASHED_WHEN_SET, RESULT_FIELDS, TrainConfig, config_key
from dtsweep.store import Store

FINISHED = "finished"  # trials.parquet status of a trial whose final epoch is written
TRIAL_COLUMNS = ["trial_id", "study", "init", "env", "dataset", "context_len", "swap_block", "seed"]
# Columns the report adds to every trial, metrics and diagnostics row (from the ledger).
CONDITION_COLUMNS = ["config_key", "init_family", "condition", "variant", "match"]
MAIN_K = 20  # context length of the papers' main runs (K=20)
NO_CONTEXT_K = 1  # K=1: the no-context runs, block swaps and attention analysis
ATTENTION_EPOCH = 4  # Takagi compares attention distance at epoch 4 with epoch 0
GRAD_CLIP = 0.25  # max grad norm of both papers; drawn as a line on the gradient figure

# What an init *is*: its family (trials.parquet `init_family`) -> modality of its pretraining
# data. The findings compare modalities ("language" vs "none"), never init names, so a local
# directory `init: /models/gpt2` with init_family gpt2 counts as GPT-2.
MODALITY: dict[str, str] = {
    "gpt2": "language", "chibit": "language", "clip": "language",
    "igpt": "image", "igpt-mini": "image",
    "random": "none", "random-ref": "none",
}  # fmt: skip
# Families trained offline by dtsweep itself at a small size (DESIGN §5): their comparisons
# are labelled "mini scale" and kept apart from the paper-scale ones (gpt2, igpt, clip).
MINI_FAMILIES = frozenset({"chibit", "igpt-mini"})
UNKNOWN_FAMILY = "unknown"

# Identity fields that only say which env a condition ran on: dropped to pair conditions
# across envs (the envs are strata of one comparison), and the fields that say what the init
# is (random inits' architecture overrides live in `model`).
STRATUM_FIELDS = ("env", "dataset", "eval.target_return")
INIT_FIELDS = ("init", "model")

# Columns each diagnostic kind must have (besides trial_id and the trial columns) for the
# figures and findings that read it. One row per measured value:
#   cka:       one row per (trial, layer, token): layer "h.3.mlp.c_fc", block 3,
#              token "return" | "state" | "action", cka in [0, 1] (epoch 0 vs final, plug-in
#              estimator), cka_debiased (the unbiased-HSIC estimator; optional, finding 1's
#              verdict needs it)
#   mine:      one row per (trial, block, position, which): position = token index in
#              the context, token its type, which "X" (I(X;T)) or "Y" (I(Y;T)), mi_nats
#   params:    one row per (trial, tensor): block, l2 distance and cosine similarity of the
#              tensor between epoch 0 and the final epoch
#   gradients: three row types in one file, told apart by which columns are set:
#              per-sample rows (grad_norm before clipping, grad_norm_clipped), one summary
#              row per trial (confusion = minimum pairwise cosine of clipped gradients),
#              per-tensor rows (tensor, share of the gradient norm)
#   attention: one row per (trial, epoch, block, head): distance_tokens, the mean over
#              queries of sum_j attn[i, j] |i - j|
DIAGNOSTIC_COLUMNS: dict[str, list[str]] = {
    "cka": ["layer", "block", "token", "cka"],
    "mine": ["block", "position", "token", "which", "mi_nats"],
    "params": ["tensor", "block", "l2", "cosine"],
    "gradients": ["grad_norm", "grad_norm_clipped", "confusion", "tensor", "share"],
    "attention": ["epoch", "block", "head", "distance_tokens"],
}

# What reading a sweep's bad data raises (a column missing or of the wrong type, an empty
# selection, an unreadable Parquet file): the builders of figures, tables and findings turn
# these into a "missing" line naming what failed and why, never a traceback.
DATA_ERRORS = (KeyError, ValueError, TypeError, IndexError, pa.ArrowException)


class MissingData(Exception):
    """A figure, table or finding cannot be computed; the message says what to run or add."""


@dataclass
class Sweep:
    """The outputs of one sweep, loaded once.

    metrics: one row per (trial, epoch) of the *finished* trials, with the trial columns and
        CONDITION_COLUMNS.
    trials: every trial of the ledger (or, without trials.parquet, those seen in metrics),
        with CONDITION_COLUMNS.
    diagnostics: {kind: DataFrame} for the kinds whose file exists (with the same columns).
    notes: what was left out and why, for the report's "missing" section.
    identity: {trial_id: {field: canonical JSON value}}: the result-determining fields of
        each trial except the seed (from config_json), or, when the ledger cannot say,
        study/init/env/dataset/context_len/swap_block (`from_config` False).
    """

    root: str
    store: Store
    metrics: pd.DataFrame | None
    trials: pd.DataFrame
    diagnostics: dict[str, pd.DataFrame]
    notes: list[str] = field(default_factory=list)
    search: pd.DataFrame | None = None  # search.parquet of search studies, if any
    warnings: list[str] = field(default_factory=list)  # problems with the data itself
    identity: dict[str, dict[str, str]] = field(default_factory=dict)
    from_config: bool = True

    @property
    def name(self) -> str:
        return self.root.rstrip("/").rsplit("/", 1)[-1]

    @classmethod
    def load(cls, sweep_dir: str) -> Sweep:
        store = Store(str(sweep_dir))
        if not store.exists():
            raise FileNotFoundError(f"sweep directory {sweep_dir} does not exist")
        notes: list[str] = []
        metrics = _read_metrics(store)
        search = store.read_pandas("search.parquet") if store.exists("search.parquet") else None
        if search is not None and metrics is not None:
            # Samples of a search differ in their settings, not only in their seed: they
            # are not replicates, so they stay out of every seed statistic.
            studies = set(search["study"])
            n = metrics.loc[metrics["study"].isin(studies), "trial_id"].nunique()
            metrics = metrics[~metrics["study"].isin(studies)]
            if n:
                notes.append(f"{n} trials of search studies ({', '.join(sorted(studies))}) are left out of the seed "
                             "statistics; see the `search_objective` figure and search.parquet.")  # fmt: skip
        if store.exists("trials.parquet"):
            trials = store.read_pandas("trials.parquet")
            if "status" not in trials.columns:
                trials = trials.assign(status=FINISHED)
                notes.append("`trials.parquet` has no status column: every trial is taken as finished.")
        elif metrics is not None:
            trials = metrics[TRIAL_COLUMNS].drop_duplicates("trial_id").assign(status=FINISHED)
            notes.append("no `trials.parquet`: every trial in the metrics is taken as finished.")
        else:
            trials = pd.DataFrame(columns=TRIAL_COLUMNS + ["status"])
        if search is not None and "study" in trials.columns:
            trials = trials[~trials["study"].isin(set(search["study"]))]
        trials, identity, from_config = _conditions(trials, notes)
        warnings = _dataset_warnings(trials)

        unfinished = trials[trials["status"] != FINISHED]
        if len(unfinished):
            counts = ", ".join(f"{n} {s}" for s, n in unfinished["status"].value_counts().items())
            notes.append(f"{len(unfinished)} of {len(trials)} trials are not finished ({counts}) and are left out.")
        finished = trials[trials["status"] == FINISHED]
        if metrics is not None:
            metrics = _with_trial_columns(metrics[metrics["trial_id"].isin(finished["trial_id"])], finished)
            metrics = metrics.reset_index(drop=True)
            if metrics.empty:
                metrics = None
        if metrics is None:
            notes.append(
                "no finished trial with metrics: run `dtsweep run SPEC` "
                "(metrics.parquet, or metrics/<trial_id>.parquet while a sweep runs)."
            )

        diagnostics = {}
        for kind in DIAGNOSTIC_COLUMNS:
            rel = f"diagnostics/{kind}.parquet"
            if store.exists(rel):
                df = store.read_pandas(rel)
                if "trial_id" not in df.columns:
                    notes.append(f"`{rel}` has no trial_id column and is left out.")
                    continue
                diagnostics[kind] = _with_trial_columns(df[df["trial_id"].isin(finished["trial_id"])], finished)
        return cls(str(sweep_dir), store, metrics, trials, diagnostics, notes, search, warnings, identity, from_config)

    def require_metrics(self) -> pd.DataFrame:
        if self.metrics is None:
            raise MissingData(f"needs finished trials in {self.root}: run `dtsweep run SPEC`")
        return self.metrics

    def diag(self, kind: str) -> pd.DataFrame:
        """diagnostics/<kind>.parquet, or MissingData naming the command that writes it.

        Raises MissingData too when a column the report reads is absent (listed in
        DIAGNOSTIC_COLUMNS), so a schema mismatch shows up in the report, not as a KeyError.
        """
        if kind not in self.diagnostics:
            raise MissingData(f"needs diagnostics kind '{kind}': run `dtsweep diagnose {self.root} --kinds {kind}`")
        df = self.diagnostics[kind]
        needed = DIAGNOSTIC_COLUMNS[kind] + ["init", "env", "context_len", "swap_block", "seed"] + CONDITION_COLUMNS
        absent = [c for c in needed if c not in df.columns]
        if absent:
            raise MissingData(f"diagnostics/{kind}.parquet lacks columns {absent} (has {sorted(df.columns)})")
        if df.empty:
            raise MissingData(f"diagnostics/{kind}.parquet has no rows of finished trials")
        return df

    def keys(self, df: pd.DataFrame, drop: tuple[str, ...] = (), variant: bool = True) -> pd.DataFrame:
        """`df` (with trial_id) with `match` (and `variant` unless variant=False) recomputed
        leaving out the identity fields named in `drop` too.

        variant: the condition without the env (trials of one variant on different envs are
        strata of one comparison); match: the variant without the init, so conditions with the
        same `match` differ only in their init. `drop` names identity fields (e.g.
        "context_len", "swap_block") that may also differ between matched conditions.
        """
        ids = df["trial_id"].astype(str)
        match = {t: _key(self.identity.get(t, {}), STRATUM_FIELDS + INIT_FIELDS + drop) for t in ids.unique()}
        df = df.assign(match=ids.map(match).to_numpy())
        if variant:
            keyed = {t: _key(self.identity.get(t, {}), STRATUM_FIELDS + drop) for t in ids.unique()}
            df = df.assign(variant=ids.map(keyed).to_numpy())
        return df


def _read_metrics(store: Store) -> pd.DataFrame | None:
    """The compacted metrics.parquet, else the per-trial files of a sweep still running."""
    if store.exists("metrics.parquet"):
        return store.read_pandas("metrics.parquet")
    files = store.list("metrics", ".parquet")
    if not files:
        return None
    return pd.concat([store.read_pandas(f) for f in files], ignore_index=True)


def _with_trial_columns(df: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """Add the condition columns (and trial columns an old diagnostics file lacks) from the
    ledger: the ledger is the one source of what a trial is."""
    cols = [c for c in TRIAL_COLUMNS + CONDITION_COLUMNS if c != "trial_id" and c in trials.columns]
    replace = [c for c in CONDITION_COLUMNS if c in df.columns]
    lacking = [c for c in cols if c not in df.columns or c in replace]
    if not lacking:
        return df
    return df.drop(columns=replace).merge(trials[["trial_id", *lacking]], on="trial_id", how="left")


# ---- conditions: config_key, init_family and the matching keys


def _identity_from_config(d: dict) -> dict[str, str]:
    """Flat {field: canonical JSON} of a trial dict's result-determining fields except the
    seed; `train.*` fields that only enter the trial id when set are left out at their
    defaults, as in spec.config_key, so trials written before a field existed still match."""
    out: dict[str, str] = {}
    unset = dataclasses.asdict(TrainConfig())
    for name in RESULT_FIELDS:
        if name == "seed":
            continue
        value = d[name]
        if isinstance(value, dict):
            for k, v in value.items():
                if name == "train" and k in HASHED_WHEN_SET and v == unset[k]:
                    continue
                if name == "eval" and k == "target_return":
                    v = v.get(d["env"]) if isinstance(v, dict) else v
                out[f"{name}.{k}"] = json.dumps(v, sort_keys=True)
        else:
            out[name] = json.dumps(value, sort_keys=True)
    return out


FALLBACK_FIELDS = ("study", "init", "env", "dataset", "context_len", "swap_block")


def _identity_from_columns(row: dict) -> dict[str, str]:
    return {f: json.dumps(None if pd.isna(row.get(f)) else _plain(row.get(f))) for f in FALLBACK_FIELDS}


def _plain(v):
    return v.item() if isinstance(v, np.generic) else v


def _key(identity: dict[str, str], drop: tuple[str, ...]) -> str:
    """16-hex-digit hash of the identity fields not named in `drop` (a name drops the field
    and, for a section such as "model", every "model.*" field)."""
    kept = {k: v for k, v in identity.items() if k not in drop and k.split(".", 1)[0] not in drop}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def _conditions(trials: pd.DataFrame, notes: list[str]) -> tuple[pd.DataFrame, dict, bool]:
    """trials with CONDITION_COLUMNS added; the identity of each trial; whether it came from
    the trials' configurations (else the fallback columns, which the notes then mention)."""
    trials = trials.reset_index(drop=True)
    rows = trials.to_dict("records")
    identity: dict[str, dict[str, str]] = {}
    from_config = "config_json" in trials.columns and len(trials) > 0
    keys: list[str] = []
    if from_config:
        try:
            for r in rows:
                d = json.loads(r["config_json"])
                identity[str(r["trial_id"])] = _identity_from_config(d)
                keys.append(config_key(d))
        except (TypeError, KeyError, AttributeError, json.JSONDecodeError):
            from_config = False
    if not from_config:
        identity = {str(r["trial_id"]): _identity_from_columns(r) for r in rows}
        keys = [_key(identity[str(r["trial_id"])], ()) for r in rows]
        if len(trials):
            notes.append(
                "the ledger has no readable `config_json`: conditions are told apart by (study, init, dataset, "
                "context_len, swap_block) only, so trials of one study that differ in a training setting would "
                "be pooled."
            )
    if "config_key" in trials.columns:
        # The ledger's own key wins; rows written before it existed use the computed one.
        trials["config_key"] = trials["config_key"].where(trials["config_key"].notna(), pd.Series(keys, dtype=object))
    else:
        trials["config_key"] = pd.Series(keys, dtype=object)

    guessed = []
    family = trials["init_family"] if "init_family" in trials.columns else pd.Series([None] * len(trials), dtype=object)
    for i, r in enumerate(rows):
        if family.iloc[i] is None or pd.isna(family.iloc[i]):
            name = str(r.get("init"))
            family.iloc[i] = name if name in MODALITY else UNKNOWN_FAMILY
            guessed.append(name)
    trials["init_family"] = family.astype(object)
    if guessed:
        unknown = sorted({n for n in guessed if n not in MODALITY})
        notes.append(
            f"{len(guessed)} trials have no `init_family` in the ledger: their family is taken from the init name"
            + (f"; unknown for {', '.join(unknown)} (left out of the findings)" if unknown else "")
            + "."
        )
    trials = _add_keys(trials, identity)
    return trials, identity, from_config


def _add_keys(trials: pd.DataFrame, identity: dict) -> pd.DataFrame:
    ids = trials["trial_id"].astype(str)
    trials["variant"] = [_key(identity[t], STRATUM_FIELDS) for t in ids]
    trials["match"] = [_key(identity[t], STRATUM_FIELDS + INIT_FIELDS) for t in ids]
    trials["condition"] = condition_labels(trials)
    return trials


def condition_labels(trials: pd.DataFrame) -> list[str]:
    """A readable name per trial's variant (its condition without the env): "gpt2 K=20
    [study]", plus " swap b" for block swaps and " #<variant>" where two variants would read
    the same (a study that varies a training setting)."""

    def base(r) -> str:
        swap = "" if pd.isna(r["swap_block"]) else f" swap {int(r['swap_block'])}"
        return f"{r['init']} K={r['context_len']}{swap} [{r['study']}]"

    if trials.empty:
        return []
    names = trials.apply(base, axis=1)
    per_name = trials.groupby(names.to_numpy())["variant"].nunique()
    ambiguous = set(per_name[per_name > 1].index)
    return [n + (f" #{v[:6]}" if n in ambiguous else "") for n, v in zip(names, trials["variant"])]


def _dataset_warnings(trials: pd.DataFrame) -> list[str]:
    """Conditions whose trials read different dataset bytes (DESIGN §7: one meaning per name)."""
    if "dataset_sha256" not in trials.columns or trials.empty:
        return []
    n = trials.dropna(subset=["dataset_sha256"]).groupby("config_key")["dataset_sha256"].nunique()
    out = []
    for key in n[n > 1].index:
        t = trials[trials["config_key"] == key]
        out.append(
            f"condition {t['condition'].iloc[0]} on {t['dataset'].iloc[0]} (config_key {key}): its {len(t)} trials "
            f"read {n[key]} different dataset files (dataset_sha256 differs), so its seeds are not replicates."
        )
    return out


# ---- selections


def no_swap(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["swap_block"].isna()]


def pick_context_len(df: pd.DataFrame, preferred: int) -> int:
    """`preferred` if some non-swap trial has it, else the context length closest to it."""
    ks = sorted(no_swap(df)["context_len"].dropna().unique())
    if not ks:
        raise MissingData("needs trials without a block swap")
    return int(min(ks, key=lambda k: (abs(k - preferred), -k)))


def by_stratum(per_trial: pd.DataFrame, value: str, **where) -> dict[str, np.ndarray]:
    """{dataset: per-seed values [n_seeds]} of `value` in the rows of `per_trial` where every
    `column == value` filter in `where` holds (NaN values dropped, empty strata left out).

    Datasets are the strata (tasks) of a comparison: one per env, or several where an env was
    trained on more than one dataset, which are different tasks.
    """
    sel = per_trial
    for col, val in where.items():
        sel = sel[sel[col] == val]
    out = {str(d): g[value].dropna().to_numpy(float) for d, g in sel.groupby("dataset")}
    return {d: v for d, v in out.items() if len(v)}
