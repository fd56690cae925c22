"""Sweep specification: YAML schema, validation, grid expansion and trial identity.

A sweep is a union of *studies*; each study is a Cartesian grid over init × dataset ×
context_len × swap_block × seed with its own training settings. Everything is validated
before anything runs: an error names the field, the bad value and what is allowed.

    spec = load_spec("sweeps/paper.yaml")      # raises SpecError
    for trial in spec.trials(): trial.trial_id, trial.to_dict()

`trial_id` is a hash of everything that determines a trial's result (RESULT_FIELDS of
the trial dict plus RESULT_VERSION), so re-running skips finished trials and adding seeds
adds only the new ones. Resources, storage and analysis-checkpoint epochs are not part of
it: they change where and how a trial runs, not what it computes.

A study with a `search:` block is a *search study*: instead of a fixed grid, Optuna samples
some training settings (SearchConfig) for each point of the study's grid, run by
dtsweep.search. `spec.trials()` lists grid studies only; `spec.grid(study)` gives a search
study's points (its groups) and `with_search_values` turns a sample into a Trial.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from dtsweep.envs import ENVS, parse_dataset

# Bump when a change to training/evaluation code changes results, so old trials re-run.
RESULT_VERSION = 1

RANDOM_INITS = ("random", "random-ref")
NAMED_INITS = RANDOM_INITS + ("gpt2", "igpt", "chibit", "igpt-mini", "clip")
FREEZE = ("none", "blocks")  # dtsweep.models.FREEZE
LM_CORPORA = ("news", "wikitext-103")  # dtsweep.pretrain.language.CORPORA


class SpecError(ValueError):
    """A spec that cannot run. `str(err)` is one line: field, bad value, what is allowed."""


# --------------------------------------------------------------------------------------
# Schema: dataclasses with defaults = the papers' settings (DESIGN §4)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dropout:
    resid: float = 0.2
    attn: float = 0.1
    embd: float = 0.1


@dataclass(frozen=True)
class KMeansCosine:
    """Reid et al.'s cosine loss to k-means centres of the language embeddings (dtsweep.train.auxiliary).

    The term λ1(step) · L_cos joins the loss, λ1(step) = weight · anneal(step, anneal_steps).
    """

    weight: float = 0.1  # λ1 before annealing (Reid tuned 0.1 and 0.2)
    clusters: int = 1000  # k-means centres of the token-embedding table
    anneal_steps: int = 5000  # λ1 is 0.5 · weight at anneal_steps / 2 and ≈ 0 from anneal_steps on


@dataclass(frozen=True)
class LMCotrain:
    """Reid et al.'s language-model co-training (dtsweep.train.auxiliary): λ2(step) · L_LM joins the loss."""

    weight: float = 0.2  # λ2 before annealing (Reid tuned 0, 0.2 and 0.4)
    anneal_steps: int = 5000
    corpus: str = "news"  # one of LM_CORPORA: "news" offline (chibit's corpus), "wikitext-103" online
    batch_size: int = 2  # text sequences per step (Reid's code: 2)
    seq_len: int | None = None  # tokens per sequence; None: the source's n_positions, at most 1024
    documents: int = 0  # use the first N training documents of the corpus (quick runs); 0: all


@dataclass(frozen=True)
class Aux:
    """Auxiliary objectives added to the action loss; None = off."""

    kmeans_cosine: KMeansCosine | None = None
    lm_cotrain: LMCotrain | None = None


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 40
    steps_per_epoch: int = 2500
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 10000  # Reid et al.; Takagi used 5000 (sweeps/paper.yaml sets it)
    grad_clip: float | None = 0.25  # max global grad norm; null turns clipping off
    dropout: Dropout = field(default_factory=Dropout)
    rtg_scale: float = 1000.0
    max_ep_len: int = 1000
    position_embeddings: bool = False  # reference DT: backbone's wpe not added (DESIGN §4)
    timestep_embedding: str = "after_ln"  # Reid's code; "before_ln" = original DT
    # Reid et al.'s techniques (issue 9). Added after the first trial ids: hashed only when set
    # (see HASHED_WHEN_SET), so the ids of trials that do not use them did not change.
    freeze: str = "none"  # "blocks": backbone frozen, embeddings and action head train (Table 5)
    extend_positions: bool = False  # the backbone's position table is the timestep embedding (Table 6)
    aux: Aux = field(default_factory=Aux)
    # Speed (issue 8), hashed only when set like the fields above.
    precision: str = "fp32"  # "fp32" | "tf32" (CUDA matmuls) | "bf16" (autocast)
    compile: bool = False  # torch.compile the training forward


@dataclass(frozen=True)
class EvalConfig:
    episodes: int = 10
    max_steps: int = 1000
    # Conditioning return per env; envs not listed use dtsweep.envs.ENVS[env].target_return.
    target_return: dict = field(default_factory=dict)
    action_error_samples: int = 256  # fixed seeded windows for the action-error metric


@dataclass(frozen=True)
class DataConfig:
    # Only used when dtsweep generates a dataset (no D4RL file found): rollout length and seed.
    steps: int = 1_000_000
    seed: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """Architecture overrides for the random inits (ignored by pretrained inits)."""

    n_layer: int | None = None
    n_embd: int | None = None
    n_head: int | None = None
    activation_function: str | None = None

    def overrides(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Resources:
    cpu: float = 1.0
    gpu: float = 0.0


GPU_SETTINGS = ("auto", "on", "off")


# ray.loggers: Ray Tune's own logger callbacks (dtsweep.tracking) and the settings each takes
# (setting -> (type, what the error message says)). Settings are those of Tune's callbacks;
# only these are accepted, so a typo is an error here and not a silently ignored keyword.
LOGGERS = {
    "tensorboard": {},
    "mlflow": {
        "tracking_uri": (str, "a tracking URI (file:///path/mlruns, http://host:5000, ...)"),
        "experiment_name": (str, "a string"),
        "tags": (dict, "a mapping of tag names to values"),
    },
    "wandb": {
        "project": (str, "a string"),
        "entity": (str, "a string"),
        "group": (str, "a string"),
        "mode": (str, "'online', 'offline' or 'disabled'"),
        "tags": (list, "a list of strings"),
    },
}
WANDB_MODES = ("online", "offline", "disabled")


@dataclass(frozen=True)
class TrackingLogger:
    """One entry of `ray.loggers`: a LOGGERS name and its settings (given keys only)."""

    name: str
    settings: dict = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: RAY_ADDRESS or a local Ray
    num_cpus: int | None = None  # local Ray only
    max_concurrent_trials: int | None = None
    max_failures: int = 2  # retries of a trial after an error or a lost node
    # GPU requests (resources.gpu) on a cluster: "auto" keeps them when the cluster has GPUs,
    # runs on CPU (saying so) on a local Ray without GPUs, and refuses a joined cluster
    # without GPUs; "on" keeps them always (trials wait for autoscaled GPU nodes); "off" runs
    # every trial on CPU. dtsweep.cluster.use_gpus decides.
    gpu: str = "auto"
    loggers: tuple = ()  # TrackingLogger, one per tool; not part of trial ids (how results are shown, not what they are)


@dataclass(frozen=True)
class SearchParam:
    """One searched setting: `path` (e.g. "train.lr") drawn from `distribution`.

    uniform / log_uniform / int / log_int draw from [low, high], both ends included
    (log_*: uniform in log space); categorical picks one of `choices`. `alternatives`
    (the spec's `or:`) are values a numeric parameter takes instead of a draw, e.g. grad
    clipping "off": Optuna first picks between the range and each alternative, and draws
    from the range only when the range was picked. TPE models that conditional space
    directly, keeping the log scale of the range (a categorical mixing numbers and "off"
    would lose it: TPE treats categories as unordered).
    """

    path: str
    distribution: str  # one of DISTRIBUTIONS
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple = ()
    alternatives: tuple = ()


@dataclass(frozen=True)
class Objective:
    """What a sample is judged by: `metric` of the metrics table at epoch `at`
    ("final", "best" = the best evaluated epoch, or an epoch number), in `direction`."""

    metric: str
    at: str | int
    direction: str  # "maximize" | "minimize"


@dataclass(frozen=True)
class Asha:
    """Ray Tune's ASHA early stopping on epochs (max_t = the study's train.epochs)."""

    grace_period: int = 1
    reduction_factor: float = 3.0


@dataclass(frozen=True)
class SearchConfig:
    parameters: tuple  # SearchParam, one per path
    objective: Objective
    num_samples: int  # per group (a point of the study's grid)
    concurrency: int = 1  # samples of a group training at the same time
    random_samples: int = 10  # drawn at random before TPE models the results (Optuna's n_startup_trials)
    scheduler: Asha | None = None
    seed: int = 0


@dataclass(frozen=True)
class Study:
    name: str
    init: tuple
    dataset: tuple
    context_len: tuple
    swap_block: tuple
    seed: tuple
    swap_from: str
    train: TrainConfig
    eval: EvalConfig
    data: DataConfig
    model: ModelConfig
    checkpoint_epochs: tuple
    search: SearchConfig | None = None  # None: a grid study
    # Per entry of `dataset`: its env, and the sha256 of its bytes for a file path (None for
    # names, which cover themselves). Filled by the parser (dtsweep.data.dataset_env).
    dataset_env: tuple = ()
    dataset_sha256: tuple = ()
    checkpoint_dtype: str = "float32"  # dtype of the analysis checkpoints' floating tensors


@dataclass(frozen=True)
class Trial:
    """One training run: a point of a study's grid with every setting resolved."""

    study: str
    init: str
    env: str
    dataset: str
    context_len: int
    swap_block: int | None
    swap_from: str | None
    seed: int
    model: dict
    train: TrainConfig
    eval: EvalConfig
    data: DataConfig
    checkpoint_epochs: tuple
    resources: Resources
    # sha256 of the dataset file when `dataset` is a file path: the trial id hashes it instead
    # of the path (a path means that file's bytes). None for dataset names.
    dataset_sha256: str | None = None
    # Storage dtype of the analysis checkpoints' floating-point tensors (CHECKPOINT_DTYPES).
    # Hashed only when not float32 (HASHED_WHEN_SET's rule): diagnostics computed from
    # rounded weights are another condition, and float32 trials keep their ids.
    checkpoint_dtype: str = "float32"

    # Cached: a Trial is frozen, and the hash (asdict + JSON + sha256, ~1 ms) is asked for many
    # times per trial by the driver; dataclasses.replace makes a new Trial with a fresh cache.
    @functools.cached_property
    def trial_id(self) -> str:
        return trial_id(self.to_dict())

    @functools.cached_property
    def config_key(self) -> str:
        return config_key(self.to_dict())

    @property
    def epochs(self) -> int:
        return self.train.epochs

    @property
    def target_return(self) -> float:
        return float(self.eval.target_return.get(self.env, ENVS[self.env].target_return))

    def to_dict(self) -> dict:
        """JSON-able dict; `Trial.from_dict(t.to_dict()) == t`."""
        d = dataclasses.asdict(self)
        d["checkpoint_epochs"] = list(self.checkpoint_epochs)
        return d

    @staticmethod
    def from_dict(d: dict) -> Trial:
        d = dict(d)
        train = dict(d["train"])
        train["dropout"] = Dropout(**train["dropout"])
        if "aux" in train:
            aux = train["aux"]
            train["aux"] = Aux(
                kmeans_cosine=None if aux.get("kmeans_cosine") is None else KMeansCosine(**aux["kmeans_cosine"]),
                lm_cotrain=None if aux.get("lm_cotrain") is None else LMCotrain(**aux["lm_cotrain"]),
            )
        return Trial(
            **{
                **d,
                "train": TrainConfig(**train),
                "eval": EvalConfig(**d["eval"]),
                "data": DataConfig(**d["data"]),
                "resources": Resources(**d["resources"]),
                "checkpoint_epochs": tuple(d["checkpoint_epochs"]),
            }
        )

    def columns(self) -> dict:
        """The trial columns carried by every output row (so pandas needs no join)."""
        return {
            "trial_id": self.trial_id,
            "study": self.study,
            "init": self.init,
            "env": self.env,
            "dataset": self.dataset,
            "context_len": self.context_len,
            "swap_block": self.swap_block,
            "seed": self.seed,
        }


# Trial dict keys that determine the result (hashed); the rest only say where/how it runs.
RESULT_FIELDS = (
    "init", "env", "dataset", "context_len", "swap_block", "swap_from", "seed",
    "model", "train", "eval", "data",
)  # fmt: skip


# TrainConfig fields added after trial ids were first handed out. They enter the hash only
# when they differ from their defaults, so every trial that does not use them keeps its id.
HASHED_WHEN_SET = ("freeze", "extend_positions", "aux", "precision", "compile")


def trial_id(trial_dict: dict) -> str:
    """Stable 16-hex-digit id: sha256 of the canonical JSON of the result-determining fields."""
    return _result_hash(trial_dict, RESULT_FIELDS)


def config_key(trial_dict: dict) -> str:
    """16-hex-digit hash of the result-determining fields except the seed: trials with the same
    config_key are replicates (seeds) of one condition, and only they are pooled by the report."""
    return _result_hash(trial_dict, tuple(f for f in RESULT_FIELDS if f != "seed"))


def _result_hash(trial_dict: dict, fields: tuple) -> str:
    payload = {k: trial_dict[k] for k in fields}
    if trial_dict.get("checkpoint_dtype", "float32") != "float32":
        payload["checkpoint_dtype"] = trial_dict["checkpoint_dtype"]
    if trial_dict.get("dataset_sha256"):  # a file path: its bytes are its identity, not its path
        payload["dataset"] = "sha256:" + trial_dict["dataset_sha256"]
    payload["result_version"] = RESULT_VERSION
    unset = dataclasses.asdict(TrainConfig())
    payload["train"] = {k: v for k, v in payload["train"].items() if not (k in HASHED_WHEN_SET and v == unset[k])}
    # Normalise the target return to the one that applies to this trial's env only, so
    # listing another env's target in a shared eval block does not change this trial's id.
    ev = dict(payload["eval"])
    env = trial_dict["env"]
    ev["target_return"] = float(ev["target_return"].get(env, ENVS[env].target_return))
    payload["eval"] = ev
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SweepSpec:
    name: str
    storage: str
    studies: tuple
    resources: dict  # init name (or "default") -> Resources
    ray: RayConfig
    source: dict = field(default_factory=dict, compare=False)  # the YAML as given

    def resources_for(self, init: str) -> Resources:
        return self.resources.get(init, self.resources["default"])

    def trials(self) -> list[Trial]:
        """Every trial of every grid study, in grid order; duplicates across studies dropped.

        Search studies have no fixed trials (dtsweep.search samples them) and are left out.
        """
        out, seen = [], set()
        for st in self.studies:
            if st.search is not None:
                continue
            for t in self.grid(st):
                if t.trial_id not in seen:
                    seen.add(t.trial_id)
                    out.append(t)
        return out

    def grid(self, st: Study) -> list[Trial]:
        """The points of `st`'s grid (init × dataset × K × swap × seed) as trials with the
        study's own settings; for a search study these are its groups, before sampling."""
        out = []
        for init in st.init:
            for j, dataset in enumerate(st.dataset):
                env = st.dataset_env[j] if st.dataset_env else parse_dataset(dataset)[0]
                sha = st.dataset_sha256[j] if st.dataset_sha256 else None
                for k in st.context_len:
                    for swap in st.swap_block:
                        for seed in st.seed:
                            out.append(
                                Trial(
                                    study=st.name,
                                    init=init,
                                    env=env,
                                    dataset=dataset,
                                    context_len=k,
                                    swap_block=swap,
                                    swap_from=st.swap_from if swap is not None else None,
                                    seed=seed,
                                    model=st.model.overrides() if init in RANDOM_INITS else {},
                                    train=st.train,
                                    eval=st.eval,
                                    data=st.data,
                                    checkpoint_epochs=resolve_checkpoint_epochs(st.checkpoint_epochs, st.train.epochs),
                                    resources=self.resources_for(init),
                                    dataset_sha256=sha,
                                    checkpoint_dtype=st.checkpoint_dtype,
                                )
                            )
        return out

    def with_storage(self, storage: str) -> SweepSpec:
        check_storage(storage, "--storage")
        return dataclasses.replace(self, storage=storage)

    @property
    def sweep_dir(self) -> str:
        return join_path(self.storage, self.name)


_URI = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/]*)(.*)")
_BUCKET_SCHEMES = ("s3", "gs", "gcs")


def check_storage(storage: str, path: str) -> None:
    """SpecError (one line) for a storage location that would silently land elsewhere: an
    object-store URI without a bucket (`s3://` alone would become a local directory named
    `s3:`), or `s3:/bucket` with one slash (a local path). Whether the scheme is known and the
    location writable is checked before a run (`dtsweep.preflight`)."""
    m = _URI.fullmatch(storage)
    if m is None:
        scheme = storage.split(":/", 1)[0]
        if ":/" in storage and scheme.lower() in _BUCKET_SCHEMES:
            raise SpecError(f"{path}: {storage!r} is a local path; an object store is written {scheme}://BUCKET/PREFIX")
        if "://" in storage:
            raise SpecError(f"{path}: {storage!r} is not a valid URI; expected SCHEME://BUCKET/PREFIX or a local path")
        return
    if m[1].lower() in _BUCKET_SCHEMES and not m[2]:
        raise SpecError(f"{path}: {storage!r} names no bucket; expected {m[1]}://BUCKET/PREFIX")


def join_path(base: str, *parts: str) -> str:
    """Join a local path or URI (s3://bucket/x) with parts, keeping the scheme intact."""
    base = str(base).rstrip("/")
    return "/".join([base, *[str(p).strip("/") for p in parts]])


def resolve_checkpoint_epochs(epochs_spec: tuple, n_epochs: int) -> tuple:
    """["final", 0, 1, 4, 10] with n_epochs=3 -> (0, 1, 3): 'final' resolved, >n dropped."""
    out = {n_epochs if e == "final" else int(e) for e in epochs_spec}
    return tuple(sorted(e for e in out if 0 <= e <= n_epochs))


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------

_STUDY_KEYS = {
    "name", "init", "env", "quality", "dataset", "context_len", "swap_block", "swap_from",
    "seed", "train", "eval", "data", "model", "checkpoint_epochs", "checkpoint_dtype", "search",
}  # fmt: skip
_DEFAULT_KEYS = _STUDY_KEYS - {"name", "init", "swap_block", "search"}
_SECTIONS = ("train", "eval", "data", "model")  # merged key by key: defaults, then study
_TOP_KEYS = {"name", "storage", "defaults", "studies", "resources", "ray"}
DEFAULT_CHECKPOINT_EPOCHS = (0, 1, 4, 10, "final")
# Storage dtypes of analysis checkpoints: float32 is exact; the 16-bit ones halve the storage
# and round the weights (docs/outputs.md says what that does to the diagnostics).
CHECKPOINT_DTYPES = ("float32", "bfloat16", "float16")


INT64_MAX = 2**63 - 1  # every integer of a spec ends up in an int64 Parquet column or a seed
MAX_TRIALS = 100_000  # above this, plan/run need --allow-large (a typo in a seed count, usually)


def _check_name(v: Any, path: str) -> str:
    """A sweep or study name: it becomes a directory name, so one path component, not . or .."""
    ok = isinstance(v, str) and v.strip() not in ("", ".", "..") and not any(c in v for c in "/\\\0")
    if not ok or any(ord(c) < 32 for c in v):
        raise _fail(path, v, "a non-empty name without '/', '\\' or control characters, not '.' or '..'")
    return v


def grid_size(spec: SweepSpec) -> int:
    """Number of trials the spec stands for (search studies: groups × num_samples), by arithmetic."""
    total = 0
    for st in spec.studies:
        n = len(st.init) * len(st.dataset) * len(st.context_len) * len(st.swap_block) * len(st.seed)
        total += n * (st.search.num_samples if st.search is not None else 1)
    return total


def check_grid_size(spec: SweepSpec, *, allow_large: bool = False) -> None:
    """Refuse (SpecError) a grid above MAX_TRIALS trials unless allow_large."""
    n = grid_size(spec)
    if n > MAX_TRIALS and not allow_large:
        raise SpecError(f"the sweep has {n:,} trials (more than {MAX_TRIALS:,}); check the seed counts and grid lists, "
                        "or pass --allow-large if you mean it")  # fmt: skip


def _fail(path: str, value: Any, allowed: str) -> SpecError:
    return SpecError(f"{path}: {value!r} is not valid; expected {allowed}")


def _check_keys(d: Any, allowed: set, path: str) -> dict:
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise _fail(path, d, "a mapping")
    for key in d:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), sorted(allowed), n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(sorted(allowed))}"
            where = f"{path}.{key}" if path else str(key)
            raise SpecError(f"{where}: unknown key; {hint}")
    return d


def _as_list(v: Any) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _int(v: Any, path: str, lo: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _fail(path, v, "an integer" + (f" >= {lo}" if lo is not None else ""))
    if lo is not None and v < lo:
        raise _fail(path, v, f"an integer >= {lo}")
    if not -INT64_MAX - 1 <= v <= INT64_MAX:
        raise _fail(path, v, f"an integer in [{lo if lo is not None else '-2**63'}, 2**63)")
    return v


def _float(v: Any, path: str, lo: float | None = None, lo_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _fail(path, v, "a number" + (f" {'>' if lo_open else '>='} {lo}" if lo is not None else ""))
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise _fail(path, v, f"a number {'>' if lo_open else '>='} {lo}")
    return float(v)


def _bool(v: Any, path: str) -> bool:
    if not isinstance(v, bool):
        raise _fail(path, v, "true or false")
    return v


def _build_dataclass(cls, given: dict, path: str, base):
    """Overlay `given` (already key-checked) on the dataclass instance `base`, type-checked."""
    values = {}
    for f in fields(cls):
        if f.name not in given:
            continue
        v, p = given[f.name], f"{path}.{f.name}"
        default = getattr(base, f.name)
        if f.name == "grad_clip":
            # YAML 1.1 reads a bare `off` as false: null, off, "off" and false all mean no clipping.
            off = v is None or v is False or v == "off"
            values[f.name] = None if off else _float(v, p, 0.0, lo_open=True)
        elif f.name == "target_return":
            d = _check_keys(v, set(ENVS), p)
            values[f.name] = {**default, **{k: _float(x, f"{p}.{k}") for k, x in d.items()}}
        elif f.name == "timestep_embedding":
            if v not in ("after_ln", "before_ln"):
                raise _fail(p, v, "'after_ln' (Reid et al.) or 'before_ln' (original DT)")
            values[f.name] = v
        elif f.name == "precision":
            values[f.name] = _one_of(v, ("fp32", "tf32", "bf16"), p)
        elif f.name == "freeze":
            if v not in FREEZE:
                raise _fail(p, v, "'none' or 'blocks' (backbone frozen: only embeddings and action head train)")
            values[f.name] = v
        elif f.name == "corpus":
            values[f.name] = _one_of(v, LM_CORPORA, p)
        elif f.name == "seq_len":
            values[f.name] = None if v is None else _int(v, p, lo=2)
        elif f.name == "activation_function":
            if v not in ("gelu_new", "gelu", "relu", "quick_gelu", "silu", "tanh"):
                raise _fail(p, v, "one of gelu_new, gelu, relu, quick_gelu, silu, tanh")
            values[f.name] = v
        elif isinstance(default, bool):
            values[f.name] = _bool(v, p)
        elif isinstance(default, int) or f.name in ("n_layer", "n_embd", "n_head"):
            values[f.name] = _int(v, p, lo=0 if f.name in ("seed", "warmup_steps", "documents") else 1)
        elif isinstance(default, float):
            strictly_positive = f.name in ("lr", "rtg_scale", "weight")
            values[f.name] = _float(v, p, 0.0, lo_open=strictly_positive)
            if cls is Dropout and values[f.name] >= 1:
                raise _fail(p, v, "a probability in [0, 1)")
        else:  # pragma: no cover - every field type is handled above
            raise SpecError(f"{p}: unsupported field")
    return dataclasses.replace(base, **values)


def _parse_train(d: dict, path: str, base: TrainConfig) -> TrainConfig:
    d = _check_keys(d, {f.name for f in fields(TrainConfig)}, path)
    dropout = base.dropout
    if "dropout" in d:
        dd = d["dropout"]
        if isinstance(dd, (int, float)) and not isinstance(dd, bool):
            dd = {"resid": dd, "attn": dd, "embd": dd}
        dd = _check_keys(dd, {"resid", "attn", "embd"}, f"{path}.dropout")
        dropout = _build_dataclass(Dropout, dd, f"{path}.dropout", base.dropout)
    aux = _parse_aux(d["aux"], f"{path}.aux", base.aux) if "aux" in d else base.aux
    rest = {k: v for k, v in d.items() if k not in ("dropout", "aux")}
    out = dataclasses.replace(_build_dataclass(TrainConfig, rest, path, base), dropout=dropout, aux=aux)
    if out.extend_positions and out.position_embeddings:
        raise SpecError(
            f"{path}.extend_positions: true is not valid with position_embeddings: true "
            "(the position table would be added twice: as positions and as the timestep embedding)"
        )
    return out


_AUX_TERMS = {"kmeans_cosine": KMeansCosine, "lm_cotrain": LMCotrain}


def _parse_aux(v: Any, path: str, base: Aux) -> Aux:
    """`aux: {kmeans_cosine: ..., lm_cotrain: ...}`; each term is a mapping of its settings,
    a number (its weight), true (the defaults), or null / false / off (no term)."""
    d = _check_keys(v, set(_AUX_TERMS), path)
    values = {}
    for key, cls in _AUX_TERMS.items():
        if key not in d:
            continue
        term, p = d[key], f"{path}.{key}"
        if term is None or term is False or term == "off":
            values[key] = None
        elif term is True:
            values[key] = cls()
        elif isinstance(term, (int, float)):
            values[key] = _build_dataclass(cls, {"weight": term}, p, cls())
        elif isinstance(term, dict):
            values[key] = _build_dataclass(cls, _check_keys(term, {f.name for f in fields(cls)}, p), p, cls())
        else:
            raise _fail(p, term, "a mapping of its settings, a weight, true (defaults) or off")
    return dataclasses.replace(base, **values)


def _check_techniques(inits: tuple, train: TrainConfig, path: str) -> None:
    """Reid et al.'s auxiliary objectives need what some inits lack: refuse those pairs."""
    from dtsweep.models.backbones import InitError, language_model_problem

    if train.aux.kmeans_cosine is not None:
        random = [i for i in inits if i in RANDOM_INITS]
        if random:
            raise SpecError(
                f"{path}.train.aux.kmeans_cosine: init {random[0]!r} has no token-embedding table to cluster "
                "(random weights); use the cosine loss with pretrained inits only"
            )
    if train.aux.lm_cotrain is not None:
        for init in inits:
            try:
                problem = language_model_problem(init)
            except InitError as e:
                raise SpecError(f"{path}.init: {e}") from None
            if problem:
                raise SpecError(
                    f"{path}.train.aux.lm_cotrain: {problem}; LM co-training needs a language model with its "
                    "tokenizer (gpt2, chibit, or a GPT-2 directory holding tokenizer.json)"
                )


def _parse_section(cls, d: Any, path: str, base):
    d = _check_keys(d, {f.name for f in fields(cls)}, path)
    return _build_dataclass(cls, d, path, base)


def _parse_seeds(v: Any, path: str) -> tuple:
    if isinstance(v, dict):
        d = _check_keys(v, {"start", "count"}, path)
        if "count" not in d:
            raise SpecError(f"{path}.count: missing; write seed: {{start: 0, count: 10}} or a list")
        start = _int(d.get("start", 0), f"{path}.start", lo=0)
        count = _int(d["count"], f"{path}.count", lo=1)
        if start + count - 1 > INT64_MAX:
            raise _fail(path, v, "seeds in [0, 2**63): start + count - 1 must stay below 2**63")
        return tuple(range(start, start + count))
    seeds = tuple(_int(s, f"{path}[{i}]", lo=0) for i, s in enumerate(_as_list(v)))
    if len(set(seeds)) != len(seeds):
        raise _fail(path, list(seeds), "distinct seeds")
    return seeds


def _parse_init(v: Any, path: str) -> str:
    if not isinstance(v, str) or not v:
        raise _fail(path, v, f"one of {', '.join(NAMED_INITS)} or a local model directory")
    if v in NAMED_INITS or Path(v).expanduser().is_dir():
        return v
    close = difflib.get_close_matches(v, NAMED_INITS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise SpecError(f"{path}: unknown init {v!r}{hint}; allowed: {', '.join(NAMED_INITS)} or a local model directory")


def _parse_datasets(source: dict, d: dict, path: str) -> tuple[tuple, tuple, tuple]:
    """(datasets, env of each, sha256 of each file or None) of a study.

    `dataset:` entries are names (`hopper-medium`, `hopper-medium-v2`), `minari:<id>` or
    paths of HDF5 files in D4RL's layout. `env:` alone lists envs (+ `quality:`); given with
    `dataset:` it is the one env of the study's files and Minari datasets (else read from
    the file: its card, its Minari metadata, or its observation/action sizes).
    """
    from dtsweep.data import DatasetError, DatasetNotFoundError, dataset_env, dataset_kind, file_sha256, resolve_dataset

    env_hint = None
    if "dataset" in source:
        datasets = _as_list(source["dataset"])
        if "env" in source:
            given = _as_list(source["env"])
            if len(given) != 1:
                raise _fail(f"{path}.env", source["env"], "one env when given with dataset: (the env of its files)")
            env_hint = _one_of(given[0], sorted(ENVS), f"{path}.env")
    elif "env" in source:
        quality = d.get("quality", "medium")
        datasets = [f"{e}-{quality}" if isinstance(e, str) else e for e in _as_list(source["env"])]
    else:
        raise SpecError(f"{path}.dataset: missing; give dataset: [hopper-medium, ...] or env: [hopper, ...]")
    envs, shas = [], []
    for j, ds in enumerate(datasets):
        where = f"{path}.dataset[{j}]"
        if not isinstance(ds, str) or not ds:
            raise _fail(where, ds, "a dataset name like 'hopper-medium', minari:<id> or an HDF5 file path")
        kind = dataset_kind(ds)
        try:
            if kind == "name":
                parse_dataset(ds)
            env = dataset_env(ds, env_hint) if kind != "name" or env_hint else parse_dataset(ds)[0]
            sha = file_sha256(resolve_dataset(ds, generate=False, download=False)) if kind == "file" else None
        except (ValueError, DatasetError, DatasetNotFoundError) as e:
            raise SpecError(f"{where}: {e}") from None
        envs.append(env)
        shas.append(sha)
    return tuple(datasets), tuple(envs), tuple(shas)


def _parse_study(raw: Any, i: int, defaults: dict) -> Study:
    path = f"studies[{i}]"
    raw = _check_keys(raw, _STUDY_KEYS, path)
    d = {**defaults, **raw}
    for sec in _SECTIONS:
        if isinstance(defaults.get(sec), dict) and isinstance(raw.get(sec), dict):
            d[sec] = {**defaults[sec], **raw[sec]}
    for key in ("init", "seed"):
        if key not in d:
            raise SpecError(f"{path}.{key}: missing (required)")
    name = _check_name(d.get("name", f"study{i}"), f"{path}.name")

    inits = tuple(_parse_init(v, f"{path}.init") for v in _as_list(d["init"]))

    # The study's own choice wins over the defaults' (dataset list or env list + quality).
    source = raw if ("dataset" in raw or "env" in raw) else defaults
    datasets, envs, shas = _parse_datasets(source, d, path)
    ks = tuple(_int(k, f"{path}.context_len", lo=1) for k in _as_list(d.get("context_len", 20)))
    swaps = tuple(None if s is None else _int(s, f"{path}.swap_block", lo=0) for s in _as_list(d.get("swap_block", None)))
    if any(s is not None for s in swaps) and any(init not in RANDOM_INITS for init in inits):
        raise SpecError(f"{path}.swap_block: block swaps need a random init (random or random-ref), got init {list(inits)}")
    swap_from = d.get("swap_from", "gpt2")
    if any(s is not None for s in swaps):
        swap_from = _parse_init(swap_from, f"{path}.swap_from")

    train = _parse_train(d.get("train"), f"{path}.train", TrainConfig())
    _check_techniques(inits, train, path)
    ev = _parse_section(EvalConfig, d.get("eval"), f"{path}.eval", EvalConfig())
    data = _parse_section(DataConfig, d.get("data"), f"{path}.data", DataConfig())
    model = _parse_section(ModelConfig, d.get("model"), f"{path}.model", ModelConfig())
    if model.n_embd is not None and model.n_head is not None and model.n_embd % model.n_head:
        raise SpecError(f"{path}.model.n_head: {model.n_head} does not divide n_embd={model.n_embd}")

    ck = _as_list(d.get("checkpoint_epochs", list(DEFAULT_CHECKPOINT_EPOCHS)))
    for e in ck:
        if e != "final":
            _int(e, f"{path}.checkpoint_epochs", lo=0)
    ck_dtype = _one_of(d.get("checkpoint_dtype", "float32"), CHECKPOINT_DTYPES, f"{path}.checkpoint_dtype")
    if 3 * max(ks) > 1024:
        raise _fail(f"{path}.context_len", max(ks), "3 * context_len <= 1024 (GPT-2 positions)")
    search = None
    if "search" in raw:
        search = _parse_search(raw["search"], f"{path}.search", inits, swaps, train, model)
    return Study(
        name=name, init=inits, dataset=tuple(datasets), context_len=ks, swap_block=swaps,
        seed=_parse_seeds(d["seed"], f"{path}.seed"), swap_from=swap_from, train=train,
        eval=ev, data=data, model=model, checkpoint_epochs=tuple(ck), search=search,
        dataset_env=envs, dataset_sha256=shas, checkpoint_dtype=ck_dtype,
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# Search studies: the `search:` block
# --------------------------------------------------------------------------------------

# Settings a search may sample, and the kind of value each takes. Not searchable:
# train.epochs and train.steps_per_epoch (the budget that ASHA and the objective are
# defined on), eval and data settings (they change what is measured, not what is learned).
SEARCHABLE: dict[str, type] = {
    "train.lr": float, "train.weight_decay": float, "train.warmup_steps": int,
    "train.grad_clip": float, "train.batch_size": int, "train.rtg_scale": float,
    "train.dropout": float, "train.dropout.resid": float, "train.dropout.attn": float,
    "train.dropout.embd": float, "train.position_embeddings": bool,
    "train.timestep_embedding": str, "model.n_layer": int, "model.n_embd": int,
    "model.n_head": int, "model.activation_function": str,
}  # fmt: skip
DISTRIBUTIONS = ("uniform", "log_uniform", "int", "log_int", "categorical")
_DIST_KIND = {"uniform": float, "log_uniform": float, "int": int, "log_int": int}
_KIND_WORD = {float: "number", int: "integer", bool: "true/false", str: "string"}
# Objective metrics (columns of the metrics table) and the direction in which they improve.
OBJECTIVE_METRICS = {
    "normalized_score": "maximize", "eval_return_mean": "maximize",
    "action_error": "minimize", "train_loss": "minimize",
}  # fmt: skip
_SEARCH_KEYS = {"parameters", "objective", "num_samples", "concurrency", "random_samples", "scheduler", "seed"}


def _one_of(v: Any, allowed, path: str) -> Any:
    if isinstance(v, str) and v in allowed:
        return v
    close = difflib.get_close_matches(str(v), list(allowed), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise _fail(path, v, f"one of {', '.join(allowed)}{hint}")


def _nest(values: dict) -> dict:
    """{"train.dropout.resid": 0.1} -> {"train": {"dropout": {"resid": 0.1}}}."""
    out: dict = {}
    for path, v in values.items():
        *parents, leaf = path.split(".")
        d = out
        for key in parents:
            d = d.setdefault(key, {})
        d[leaf] = v
    return out


def _apply(train: TrainConfig, model: ModelConfig, values: dict, path: str) -> tuple[TrainConfig, ModelConfig]:
    """Overlay {searchable path: value} on a study's train/model settings, validated as the YAML is."""
    nested = _nest(values)
    train = _parse_train(nested.get("train"), f"{path}.train", train)
    model = _parse_section(ModelConfig, nested.get("model"), f"{path}.model", model)
    if model.n_embd is not None and model.n_head is not None and model.n_embd % model.n_head:
        raise _fail(f"{path}.model.n_head", model.n_head, f"a divisor of n_embd={model.n_embd}")
    return train, model


def _value_of(path: str, train: TrainConfig, model: ModelConfig) -> Any:
    section, *rest = path.split(".")
    obj = train if section == "train" else model
    for key in rest:
        obj = getattr(obj, key)
    return obj.resid if isinstance(obj, Dropout) else obj  # "train.dropout" sets all three alike


def search_value(trial: Trial, path: str) -> Any:
    """The value of a searchable setting in `trial`: search_value(t, "train.grad_clip") -> 0.25
    (None: clipping off, or a model setting left to the init's architecture)."""
    return _value_of(path, trial.train, ModelConfig(**trial.model))


def with_search_values(trial: Trial, values: dict) -> Trial:
    """`trial` (a point of a search study's grid) with sampled settings applied.

    values: {searchable path: value}, e.g. {"train.lr": 3e-4, "train.grad_clip": "off"}.
    Raises SpecError for a value the YAML would reject. The result's trial_id is that of
    a grid trial with the same settings, so a sample equal to a finished trial is not re-run.
    """
    train, model = _apply(trial.train, ModelConfig(**trial.model), values, "search")
    return dataclasses.replace(trial, train=train, model=model.overrides() if trial.init in RANDOM_INITS else {})


def _check_value(name: str, v: Any, where: str, train: TrainConfig, model: ModelConfig) -> Any:
    """Validate one candidate value of parameter `name` as the YAML would; returns it resolved."""
    if not (v is None or isinstance(v, (bool, int, float, str))):
        raise _fail(where, v, "a number, string, true/false or null")
    try:
        t, m = _apply(train, model, {name: v}, "")
    except SpecError as e:
        raise _fail(where, v, str(e).split("; expected ", 1)[-1]) from None
    return _value_of(name, t, m)


def _parse_param(name: str, v: Any, where: str, train: TrainConfig, model: ModelConfig) -> SearchParam:
    kind = SEARCHABLE[name]
    fits = [d for d in DISTRIBUTIONS if _DIST_KIND.get(d, kind) is kind]
    if not isinstance(v, dict):
        raise _fail(where, v, f"a mapping with one distribution of {', '.join(fits)}, e.g. {{{fits[0]}: ...}}")
    _check_keys(v, set(DISTRIBUTIONS) | {"or"}, where)
    dists = [k for k in v if k != "or"]
    if len(dists) != 1:
        raise _fail(where, v, f"exactly one distribution of {', '.join(fits)}")
    dist, arg = dists[0], v[dists[0]]
    p = f"{where}.{dist}"
    if dist not in fits:
        raise _fail(where, dist, f"a distribution for {_KIND_WORD[kind]} values: {', '.join(fits)}")
    if dist == "categorical":
        if "or" in v:
            raise SpecError(f"{where}.or: not valid with categorical; list every value under categorical")
        if not isinstance(arg, list) or not arg:
            raise _fail(p, arg, "a non-empty list of values")
        resolved = [_check_value(name, c, f"{p}[{i}]", train, model) for i, c in enumerate(arg)]
        if len({repr(r) for r in resolved}) != len(resolved):
            raise _fail(p, arg, "distinct values (off and null are the same: no clipping)")
        return SearchParam(name, dist, choices=tuple(arg))
    if not (isinstance(arg, list) and len(arg) == 2):
        raise _fail(p, arg, "[low, high]")
    num = _int if kind is int else _float
    low, high = num(arg[0], f"{p}[0]"), num(arg[1], f"{p}[1]")
    if not low < high:
        raise _fail(p, arg, "[low, high] with low < high")
    if dist.startswith("log_") and low <= 0:
        raise _fail(f"{p}[0]", arg[0], "a number > 0 (log scale)")
    for i, bound in enumerate((low, high)):
        _check_value(name, bound, f"{p}[{i}]", train, model)
    alternatives = tuple(_as_list(v.get("or", [])))
    if "or" in v and not alternatives:
        raise _fail(f"{where}.or", v["or"], "a value or a list of values taken instead of a draw, e.g. [off]")
    resolved = [_check_value(name, a, f"{where}.or[{i}]", train, model) for i, a in enumerate(alternatives)]
    if len({repr(r) for r in resolved}) != len(resolved):
        raise _fail(f"{where}.or", list(alternatives), "distinct values")
    return SearchParam(name, dist, low, high, alternatives=alternatives)


def _param_values(p: SearchParam) -> list:
    """Every value an integer or categorical parameter can take (for cross-checks)."""
    if p.distribution == "categorical":
        return list(p.choices)
    return list(range(int(p.low), int(p.high) + 1)) + list(p.alternatives)


def _check_head_split(params: tuple, model: ModelConfig, path: str) -> None:
    """Every sampled (n_embd, n_head) pair must split the width evenly across the heads."""
    by = {p.path: p for p in params}
    if "model.n_embd" not in by and "model.n_head" not in by:
        return
    values = {}
    for key in ("n_embd", "n_head"):
        if f"model.{key}" in by:
            values[key] = _param_values(by[f"model.{key}"])
        elif getattr(model, key) is not None:
            values[key] = [getattr(model, key)]
        else:
            other = "n_head" if key == "n_embd" else "n_embd"
            raise SpecError(f"{path}.model.{other}: searching it needs model.{key} too (fixed under model: or searched), "
                            "so that every sample splits the width evenly across heads")  # fmt: skip
    for e in values["n_embd"]:
        for h in values["n_head"]:
            if e % h:
                raise _fail(f"{path}.model.n_head", h, f"a divisor of every sampled model.n_embd (not of {e})")


def _parse_objective(v: Any, p: str, epochs: int) -> Objective:
    d = _check_keys(v, {"metric", "at", "direction"}, p)
    if "metric" not in d:
        raise SpecError(f"{p}.metric: missing; e.g. objective: {{metric: normalized_score, at: final}}")
    metric = _one_of(d["metric"], list(OBJECTIVE_METRICS), f"{p}.metric")
    at = d.get("at", "final")
    if at not in ("final", "best"):
        if isinstance(at, bool) or not isinstance(at, int) or not 1 <= at <= epochs:
            raise _fail(f"{p}.at", at, f"'final', 'best' or an epoch in 1..{epochs} (train.epochs)")
    better = OBJECTIVE_METRICS[metric]
    direction = _one_of(d.get("direction", better), ["maximize", "minimize"], f"{p}.direction")
    if direction != better:
        raise _fail(
            f"{p}.direction", direction, f"{better!r} for {metric} ({'higher' if better == 'maximize' else 'lower'} is better)"
        )
    return Objective(metric=metric, at=at, direction=direction)


def _parse_scheduler(v: Any, p: str, epochs: int) -> Asha | None:
    if v is None:
        return None
    if isinstance(v, str):
        v = {_one_of(v, ["asha"], p): {}}
    d = _check_keys(v, {"asha"}, p)
    if not d:
        raise _fail(p, v, "null or {asha: {grace_period: 1, reduction_factor: 3}}")
    a = _check_keys(d["asha"], {"grace_period", "reduction_factor"}, f"{p}.asha")
    gp = _int(a.get("grace_period", Asha.grace_period), f"{p}.asha.grace_period", lo=1)
    if gp > epochs:
        raise _fail(f"{p}.asha.grace_period", gp, f"an integer in 1..{epochs} (train.epochs)")
    rf = _float(a.get("reduction_factor", Asha.reduction_factor), f"{p}.asha.reduction_factor", 1.0, lo_open=True)
    return Asha(grace_period=gp, reduction_factor=rf)


def _parse_search(v: Any, p: str, inits: tuple, swaps: tuple, train: TrainConfig, model: ModelConfig) -> SearchConfig:
    d = _check_keys(v, _SEARCH_KEYS, p)
    for key in ("parameters", "objective", "num_samples"):
        if key not in d:
            raise SpecError(f"{p}.{key}: missing (required)")
    raw = d["parameters"]
    if not isinstance(raw, dict) or not raw:
        raise _fail(f"{p}.parameters", raw, "a non-empty mapping of setting path -> distribution")
    for key in raw:
        if key not in SEARCHABLE:
            close = difflib.get_close_matches(str(key), list(SEARCHABLE), n=1, cutoff=0.75)
            hint = f"did you mean {close[0]!r}?" if close else f"searchable: {', '.join(SEARCHABLE)}"
            raise SpecError(f"{p}.parameters.{key}: not a searchable setting; {hint}")
    if "train.dropout" in raw and any(k.startswith("train.dropout.") for k in raw):
        raise SpecError(
            f"{p}.parameters.train.dropout: give train.dropout (all three) or train.dropout.<resid|attn|embd>, not both"
        )
    model_keys = [k for k in raw if k.startswith("model.")]
    pretrained = [i for i in inits if i not in RANDOM_INITS]
    if model_keys and pretrained:
        raise SpecError(
            f"{p}.parameters.{model_keys[0]}: model settings only apply to random inits (random, random-ref), got init {pretrained}"
        )
    if "model.n_layer" in raw and any(s is not None for s in swaps):
        raise SpecError(
            f"{p}.parameters.model.n_layer: cannot be searched with block swaps (the swapped block must exist in every sample)"
        )
    params = tuple(_parse_param(k, x, f"{p}.parameters.{k}", train, model) for k, x in raw.items())
    _check_head_split(params, model, f"{p}.parameters")
    return SearchConfig(
        parameters=params,
        objective=_parse_objective(d["objective"], f"{p}.objective", train.epochs),
        num_samples=_int(d["num_samples"], f"{p}.num_samples", lo=1),
        concurrency=_int(d.get("concurrency", 1), f"{p}.concurrency", lo=1),
        random_samples=_int(d.get("random_samples", 10), f"{p}.random_samples", lo=1),
        scheduler=_parse_scheduler(d.get("scheduler"), f"{p}.scheduler", train.epochs),
        seed=_int(d.get("seed", 0), f"{p}.seed", lo=0),
    )


def parse_spec(raw: Any) -> SweepSpec:
    """Validate a YAML-loaded dict into a SweepSpec. Raises SpecError (one line)."""
    raw = _check_keys(raw, _TOP_KEYS, "")
    if not raw:
        raise SpecError("spec is empty; expected keys name, storage, studies")
    name = _check_name(raw.get("name"), "name")
    storage = raw.get("storage", "runs")
    if not isinstance(storage, str) or not storage:
        raise _fail("storage", storage, "a local path or URI (s3://..., gs://..., file://...)")
    check_storage(storage, "storage")

    defaults = _check_keys(raw.get("defaults"), _DEFAULT_KEYS, "defaults")
    studies_raw = raw.get("studies")
    if not isinstance(studies_raw, list) or not studies_raw:
        raise _fail("studies", studies_raw, "a non-empty list of studies")
    studies = tuple(_parse_study(s, i, defaults) for i, s in enumerate(studies_raw))
    names = [s.name for s in studies]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise _fail("studies[].name", sorted(dup)[0], "unique study names")

    res_raw = _check_keys(raw.get("resources"), set(NAMED_INITS) | {"default"}, "resources")
    resources = {"default": Resources()}
    for key, v in res_raw.items():
        resources[key] = _parse_section(Resources, v, f"resources.{key}", resources["default"])
    ray_cfg = _check_keys(raw.get("ray"), {f.name for f in fields(RayConfig)}, "ray")
    ray = RayConfig(
        address=_opt_str(ray_cfg.get("address"), "ray.address"),
        num_cpus=None if ray_cfg.get("num_cpus") is None else _int(ray_cfg["num_cpus"], "ray.num_cpus", 1),
        max_concurrent_trials=None
        if ray_cfg.get("max_concurrent_trials") is None
        else _int(ray_cfg["max_concurrent_trials"], "ray.max_concurrent_trials", 1),
        max_failures=_int(ray_cfg.get("max_failures", 2), "ray.max_failures", 0),
        gpu=_gpu_setting(ray_cfg.get("gpu", "auto")),
        loggers=_parse_loggers(ray_cfg.get("loggers")),
    )
    spec = SweepSpec(name=name, storage=storage, studies=studies, resources=resources, ray=ray, source=raw)
    _check_swap_depths(spec)
    return spec


def _gpu_setting(v: Any) -> str:
    # YAML reads a bare on/off as a boolean.
    v = {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v
    if v not in GPU_SETTINGS:
        raise _fail("ray.gpu", v, " | ".join(GPU_SETTINGS))
    return v


def _parse_loggers(v: Any) -> tuple:
    """`ray.loggers`: a list of names (`[tensorboard, mlflow]`) or one-key mappings of a name to
    its settings (`[{wandb: {project: x}}]`), each tool at most once."""
    if v is None:
        return ()
    if not isinstance(v, list):
        example = "[tensorboard, {wandb: {project: x}}]"
        raise _fail("ray.loggers", v, f"a list of loggers ({', '.join(LOGGERS)}), e.g. {example}")
    out = []
    for i, item in enumerate(v):
        path = f"ray.loggers[{i}]"
        if isinstance(item, dict) and len(item) == 1:
            ((name, settings),) = item.items()
        elif isinstance(item, str):
            name, settings = item, None
        else:
            raise _fail(path, item, "a logger name or a one-key mapping {name: {settings}}")
        if name not in LOGGERS:
            close = difflib.get_close_matches(str(name), sorted(LOGGERS), n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(LOGGERS)}"
            raise SpecError(f"{path}: unknown logger {name!r}; {hint}")
        if name in {lg.name for lg in out}:
            raise _fail(path, name, "each logger at most once")
        allowed = LOGGERS[name]
        if settings and not allowed:
            raise _fail(f"{path}.{name}", settings, f"no settings ({name} takes none)")
        settings = _check_keys(settings, set(allowed), f"{path}.{name}")
        for key, val in settings.items():
            kind, what = allowed[key]
            ok = isinstance(val, kind) and not isinstance(val, bool)
            if ok and kind is list:
                ok = all(isinstance(x, str) for x in val)
            if ok and kind is dict:
                ok = all(isinstance(k, str) and isinstance(x, (str, int, float)) for k, x in val.items())
            if ok and (name, key) == ("wandb", "mode"):
                ok = val in WANDB_MODES
            if not ok:
                raise _fail(f"{path}.{name}.{key}", val, what)
        out.append(TrackingLogger(name, dict(settings)))
    return tuple(out)


def _opt_str(v: Any, path: str) -> str | None:
    if v is None or isinstance(v, str):
        return v
    raise _fail(path, v, "a string")


def _check_swap_depths(spec: SweepSpec) -> None:
    """A swapped block index must exist in both the random model and the source model."""
    for i, st in enumerate(spec.studies):
        swaps = [s for s in st.swap_block if s is not None]
        if not swaps:
            continue
        from dtsweep.models.backbones import backbone_depth  # imports torch: only when needed

        depth = min(
            min(backbone_depth(init, st.model.overrides()) for init in st.init),
            backbone_depth(st.swap_from),
        )
        bad = [s for s in swaps if s >= depth]
        if bad:
            raise _fail(f"studies[{i}].swap_block", bad[0], f"a block index in 0..{depth - 1} (model depth {depth})")


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep YAML file. Raises SpecError with a one-line message."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{path}: no such spec file")
    try:
        raw = yaml.safe_load(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not a UTF-8 text file (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                        "save the spec as UTF-8 YAML") from None  # fmt: skip
    except OSError as e:
        raise SpecError(f"{path}: cannot be read: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{path}: malformed YAML{where}: {problem}") from None
    return parse_spec(raw)


def resolved_yaml(spec: SweepSpec) -> str:
    """The spec as run: the given YAML with name/storage as resolved (written to sweep.yaml)."""
    return yaml.safe_dump({**spec.source, "name": spec.name, "storage": spec.storage}, sort_keys=False)
