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
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from dtsweep.envs import ENVS, parse_dataset

# Bump when a change to training/evaluation code changes results, so old trials re-run.
RESULT_VERSION = 1

RANDOM_INITS = ("random", "random-ref")
NAMED_INITS = RANDOM_INITS + ("gpt2", "igpt", "chibit", "igpt-mini")


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


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: RAY_ADDRESS or a local Ray
    num_cpus: int | None = None  # local Ray only
    max_concurrent_trials: int | None = None
    max_failures: int = 2  # retries of a trial after an error or a lost node


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

    @property
    def trial_id(self) -> str:
        return trial_id(self.to_dict())

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


def trial_id(trial_dict: dict) -> str:
    """Stable 16-hex-digit id: sha256 of the canonical JSON of the result-determining fields."""
    payload = {k: trial_dict[k] for k in RESULT_FIELDS}
    payload["result_version"] = RESULT_VERSION
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
        """Every trial of every study, in grid order; duplicates across studies dropped."""
        out, seen = [], set()
        for st in self.studies:
            for init in st.init:
                for dataset in st.dataset:
                    env = parse_dataset(dataset)[0]
                    for k in st.context_len:
                        for swap in st.swap_block:
                            for seed in st.seed:
                                t = Trial(
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
                                    checkpoint_epochs=resolve_checkpoint_epochs(
                                        st.checkpoint_epochs, st.train.epochs
                                    ),
                                    resources=self.resources_for(init),
                                )
                                if t.trial_id not in seen:
                                    seen.add(t.trial_id)
                                    out.append(t)
        return out

    def with_storage(self, storage: str) -> SweepSpec:
        return dataclasses.replace(self, storage=storage)

    @property
    def sweep_dir(self) -> str:
        return join_path(self.storage, self.name)


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
    "seed", "train", "eval", "data", "model", "checkpoint_epochs",
}  # fmt: skip
_DEFAULT_KEYS = _STUDY_KEYS - {"name", "init", "swap_block"}
_SECTIONS = ("train", "eval", "data", "model")  # merged key by key: defaults, then study
_TOP_KEYS = {"name", "storage", "defaults", "studies", "resources", "ray"}
DEFAULT_CHECKPOINT_EPOCHS = (0, 1, 4, 10, "final")


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
            values[f.name] = None if v is None or v == "off" else _float(v, p, 0.0, lo_open=True)
        elif f.name == "target_return":
            d = _check_keys(v, set(ENVS), p)
            values[f.name] = {**default, **{k: _float(x, f"{p}.{k}") for k, x in d.items()}}
        elif f.name == "timestep_embedding":
            if v not in ("after_ln", "before_ln"):
                raise _fail(p, v, "'after_ln' (Reid et al.) or 'before_ln' (original DT)")
            values[f.name] = v
        elif f.name == "activation_function":
            if v not in ("gelu_new", "gelu", "relu", "quick_gelu", "silu", "tanh"):
                raise _fail(p, v, "one of gelu_new, gelu, relu, quick_gelu, silu, tanh")
            values[f.name] = v
        elif isinstance(default, bool):
            values[f.name] = _bool(v, p)
        elif isinstance(default, int) or f.name in ("n_layer", "n_embd", "n_head"):
            values[f.name] = _int(v, p, lo=0 if f.name in ("seed", "warmup_steps") else 1)
        elif isinstance(default, float):
            strictly_positive = f.name in ("lr", "rtg_scale")
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
    rest = {k: v for k, v in d.items() if k != "dropout"}
    out = _build_dataclass(TrainConfig, rest, path, base)
    return dataclasses.replace(out, dropout=dropout)


def _parse_section(cls, d: Any, path: str, base):
    d = _check_keys(d, {f.name for f in fields(cls)}, path)
    return _build_dataclass(cls, d, path, base)


def _parse_seeds(v: Any, path: str) -> tuple:
    if isinstance(v, dict):
        d = _check_keys(v, {"start", "count"}, path)
        if "count" not in d:
            raise SpecError(f"{path}.count: missing; write seed: {{start: 0, count: 10}} or a list")
        start = _int(d.get("start", 0), f"{path}.start", lo=0)
        return tuple(range(start, start + _int(d["count"], f"{path}.count", lo=1)))
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
    raise SpecError(
        f"{path}: unknown init {v!r}{hint}; allowed: {', '.join(NAMED_INITS)} or a local model directory"
    )


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
    name = d.get("name", f"study{i}")
    if not isinstance(name, str) or not name:
        raise _fail(f"{path}.name", name, "a non-empty string")

    inits = tuple(_parse_init(v, f"{path}.init") for v in _as_list(d["init"]))

    if "dataset" in raw and "env" in raw:
        raise SpecError(f"{path}: give either 'dataset' or 'env' (+ 'quality'), not both")
    # The study's own choice wins over the defaults' (dataset list or env list + quality).
    source = raw if ("dataset" in raw or "env" in raw) else defaults
    if "dataset" in source and "env" in source:
        raise SpecError("defaults: give either 'dataset' or 'env' (+ 'quality'), not both")
    if "dataset" in source:
        datasets = _as_list(source["dataset"])
    elif "env" in source:
        quality = d.get("quality", "medium")
        datasets = [f"{e}-{quality}" if isinstance(e, str) else e for e in _as_list(source["env"])]
    else:
        raise SpecError(f"{path}.dataset: missing; give dataset: [hopper-medium, ...] or env: [hopper, ...]")
    for j, ds in enumerate(datasets):
        if not isinstance(ds, str):
            raise _fail(f"{path}.dataset[{j}]", ds, "a dataset name like 'hopper-medium'")
        try:
            parse_dataset(ds)
        except ValueError as e:
            raise SpecError(f"{path}.dataset[{j}]: {e}") from None

    ks = tuple(_int(k, f"{path}.context_len", lo=1) for k in _as_list(d.get("context_len", 20)))
    swaps = tuple(
        None if s is None else _int(s, f"{path}.swap_block", lo=0)
        for s in _as_list(d.get("swap_block", None))
    )
    if any(s is not None for s in swaps) and any(init not in RANDOM_INITS for init in inits):
        raise SpecError(f"{path}.swap_block: block swaps need a random init (random or random-ref), got init {list(inits)}")
    swap_from = d.get("swap_from", "gpt2")
    if any(s is not None for s in swaps):
        swap_from = _parse_init(swap_from, f"{path}.swap_from")

    train = _parse_train(d.get("train"), f"{path}.train", TrainConfig())
    ev = _parse_section(EvalConfig, d.get("eval"), f"{path}.eval", EvalConfig())
    data = _parse_section(DataConfig, d.get("data"), f"{path}.data", DataConfig())
    model = _parse_section(ModelConfig, d.get("model"), f"{path}.model", ModelConfig())
    if model.n_embd is not None and model.n_head is not None and model.n_embd % model.n_head:
        raise SpecError(f"{path}.model.n_head: {model.n_head} does not divide n_embd={model.n_embd}")

    ck = _as_list(d.get("checkpoint_epochs", list(DEFAULT_CHECKPOINT_EPOCHS)))
    for e in ck:
        if e != "final":
            _int(e, f"{path}.checkpoint_epochs", lo=0)
    if 3 * max(ks) > 1024:
        raise _fail(f"{path}.context_len", max(ks), "3 * context_len <= 1024 (GPT-2 positions)")
    return Study(
        name=name, init=inits, dataset=tuple(datasets), context_len=ks, swap_block=swaps,
        seed=_parse_seeds(d["seed"], f"{path}.seed"), swap_from=swap_from, train=train,
        eval=ev, data=data, model=model, checkpoint_epochs=tuple(ck),
    )  # fmt: skip


def parse_spec(raw: Any) -> SweepSpec:
    """Validate a YAML-loaded dict into a SweepSpec. Raises SpecError (one line)."""
    raw = _check_keys(raw, _TOP_KEYS, "")
    if not raw:
        raise SpecError("spec is empty; expected keys name, storage, studies")
    name = raw.get("name")
    if not isinstance(name, str) or not name or "/" in name:
        raise _fail("name", name, "a non-empty string without '/'")
    storage = raw.get("storage", "runs")
    if not isinstance(storage, str) or not storage:
        raise _fail("storage", storage, "a local path or URI (s3://..., gs://..., file://...)")

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
    )
    spec = SweepSpec(name=name, storage=storage, studies=studies, resources=resources, ray=ray, source=raw)
    _check_swap_depths(spec)
    return spec


def _opt_str(v: Any, path: str) -> str | None:
    if v is None or isinstance(v, str):
        return v
    raise _fail(path, v, "a string")


def _check_swap_depths(spec: SweepSpec) -> None:
    """A swapped block index must exist in both the random model and the source model."""
    from dtsweep.models.backbones import backbone_depth

    for i, st in enumerate(spec.studies):
        swaps = [s for s in st.swap_block if s is not None]
        if not swaps:
            continue
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
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{path}: malformed YAML{where}: {problem}") from None
    return parse_spec(raw)


def resolved_yaml(spec: SweepSpec) -> str:
    """The spec as run: the given YAML with name/storage as resolved (written to sweep.yaml)."""
    return yaml.safe_dump({**spec.source, "name": spec.name, "storage": spec.storage}, sort_keys=False)
