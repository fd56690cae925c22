"""One trial, top to bottom: data prepared once, model built from the seed, epochs of
training, batched evaluation, metrics rows and analysis checkpoints.

This module knows nothing about Ray: `tuning.py` wraps `TrialRunner` in a Tune
trainable and turns `resume_state()` into Tune checkpoints. The runner writes its own
outputs into the sweep directory (`Store`):

    metrics/<trial_id>.parquet               all rows so far, replaced atomically each epoch
    checkpoints/<trial_id>/epoch=<n>.parquet model weights at the analysis epochs
    checkpoints/<trial_id>/index.parquet     trial_id, epoch, path, n_params, nbytes, sha256

The trial reads exactly the dataset file the driver resolved (`dataset=`, a DatasetSource),
through the copy the driver published to the sweep's storage when there is one
(`dtsweep.inputs`), and refuses to train when the bytes on its node differ (sha256). Its provenance (the file,
sha256, origin, evaluation env, what the init is, library versions: `provenance_columns`) is
stored with each checkpoint and, by the driver, in trials.parquet.

Epoch 0 is the model before any update (its row has action_error but no train loss and
no evaluation); epoch n is the model after n × steps_per_epoch updates.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import math
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from transformers.activations import NewGELUActivation

from dtsweep.data import (
    DatasetError,
    DatasetNotFoundError,
    DatasetSource,
    WindowSampler,
    file_sha256,
    read_d4rl_hdf5,
    resolve_source,
    split_trajectories,
)
from dtsweep.envs import ENVS, normalized_score
from dtsweep.models import (
    DecisionTransformer,
    backbone_config_dict,
    build_decision_transformer,
    eager_attention,
    init_family,
    init_source,
)
from dtsweep.schemas import CHECKPOINTS_SCHEMA, METRICS_SCHEMA
from dtsweep.spec import Trial
from dtsweep.store import Store, table_from_rows, write_checkpoint
from dtsweep.train.auxiliary import build_auxiliary
from dtsweep.train.evaluate import evaluate_episodes, make_envs

# The action-error probe is the same fixed windows for every seed of a dataset, so curves
# of different seeds and inits are measured on identical inputs.
PROBE_SEED = 12345


PRECISIONS = ("fp32", "tf32", "bf16")

# Libraries whose versions can change a trial's numbers (recorded as versions_json).
VERSIONED_PACKAGES = ("dtsweep", "torch", "transformers", "gymnasium", "mujoco", "ray", "numpy", "pyarrow")


def library_versions() -> dict[str, str | None]:
    """{package: installed version or None} for VERSIONED_PACKAGES, without importing them."""
    return dict(_library_versions())


@functools.cache  # read once per process: ~50 ms of package metadata, asked for every trial
def _library_versions() -> dict[str, str | None]:
    out = {}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def resolve_trial_dataset(trial: Trial) -> DatasetSource:
    """Resolve a trial's dataset on this machine (what the driver does once per dataset)."""
    return resolve_source(trial.dataset, env=trial.env, steps=trial.data.steps, seed=trial.data.seed)


def open_trial_dataset(trial: Trial, given: DatasetSource | None = None) -> DatasetSource:
    """The dataset file this trial reads: `given` (the driver's resolution), verified here.

    Returns `given` with `path` set to the file read on this node: the copy the driver
    published to the sweep's storage when there is one (`given.published`, fetched into this
    node's cache and verified: `dtsweep.inputs.fetch_file`), else the driver's path.
    Refuses (DatasetError) when the file on this node has other bytes than the driver's
    (sha256), or when a file-path dataset's bytes differ from those its trial id was made
    from. Without a published copy, a generated file missing on this node is generated here
    and must come out byte-identical; any other missing file is an error.
    """
    from dtsweep.inputs import InputError, fetch_file

    source = given if given is not None else resolve_trial_dataset(trial)
    if source.published:
        try:
            local = fetch_file(source.published, source.sha256)
        except InputError as e:
            raise DatasetError(f"trial {trial.trial_id}: dataset {trial.dataset!r}: {e}") from None
        source = DatasetSource(**{**source.to_dict(), "path": str(local)})
    elif not Path(source.path).is_file():
        if source.origin != "generated":
            raise DatasetNotFoundError(
                f"trial {trial.trial_id}: dataset file {source.path} (resolved by the driver) is not on this node; "
                "put it on storage every node mounts at that path"
            )
        here = resolve_trial_dataset(trial)
        source = DatasetSource(**{**source.to_dict(), "path": here.path})
    actual = file_sha256(source.path)
    expected = trial.dataset_sha256 or source.sha256
    if actual != source.sha256 or actual != expected:
        raise DatasetError(
            f"trial {trial.trial_id}: dataset {trial.dataset!r} file {source.path} has sha256 {actual}, "
            f"expected {expected} (the bytes the driver resolved); refusing to train on other data"
        )
    if source.env != trial.env:
        raise DatasetError(
            f"trial {trial.trial_id}: dataset {trial.dataset!r} is a {source.env} dataset, trial env is {trial.env}"
        )
    return source


def provenance_columns(trial: Trial, source: DatasetSource) -> dict:
    """The provenance columns of trials.parquet for `trial` reading `source` (docs/outputs.md)."""
    return {
        "dataset_source": source.path,
        "dataset_sha256": source.sha256,
        "dataset_origin": source.origin,
        "eval_env": source.eval_env,
        "init_source": init_source(trial.init),
        "init_family": init_family(trial.init),
        "config_key": trial.config_key,
        "versions_json": json.dumps(library_versions(), sort_keys=True),
    }


def trial_provenance(trials: list[Trial], sources: dict) -> dict[str, dict]:
    """trial_id -> the provenance columns of trials.parquet, from dtsweep.inputs.prepare_datasets' sources."""
    from dtsweep.inputs import dataset_key

    return {t.trial_id: provenance_columns(t, sources[dataset_key(t)]) for t in trials}


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision the device cannot run, rather than silently running another one.

    fp32: plain float32. tf32: float32 weights, matmuls on TF32 tensor cores (CUDA only).
    bf16: float32 weights, forward under bf16 autocast: on CPU, or on a CUDA GPU of compute
    capability 8.0 or later (Ampere on). Older GPUs (V100, T4: 7.x) only emulate bfloat16,
    which `torch.cuda.is_bf16_supported()` accepts by default but runs slower than fp32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "tf32" and device.type != "cuda":
        raise ValueError(f"train.precision 'tf32' needs a CUDA device, not {device}")
    if precision == "bf16" and device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if tuple(capability) < (8, 0):
            raise ValueError(
                f"train.precision 'bf16' needs compute capability 8.0 or later for native bfloat16; "
                f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]} "
                f"(use 'fp32', or 'tf32' on 8.0+)"
            )


def tf32_flags() -> tuple[str, str]:
    """The process's TF32 settings: (CUDA matmul, cuDNN conv) `fp32_precision`, "tf32" or "ieee".

    Only torch's newer `fp32_precision` API is used, never the legacy `allow_tf32`: torch
    raises when code reads one after the other was set, and Inductor reads the new one.
    """
    return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision


def set_tf32_flags(flags: tuple[str, str]) -> None:
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = flags


@contextmanager
def precision_flags(precision: str):
    """TF32 on for `precision == "tf32"`, off ("ieee") for every other precision, inside the block;
    the process's previous settings come back on exit.

    The flags are process-wide and Ray reuses a worker for the next trial or search sample, so a
    trial never leaves them set: a tf32 trial followed by an fp32 one in the same worker would
    otherwise run the fp32 one on TF32 tensor cores.
    """
    before = tf32_flags()
    want = "tf32" if precision == "tf32" else "ieee"
    set_tf32_flags((want, want))
    try:
        yield
    finally:
        set_tf32_flags(before)


def use_fused_gelu(model: DecisionTransformer) -> None:
    """Compute GPT-2's tanh-approximated GELU (`gelu_new`) as one fused kernel.

    transformers' `NewGELUActivation` spells the formula out in five elementwise ops (and as
    many in the backward); `nn.GELU(approximate="tanh")` is the same function in one kernel
    (outputs within 5e-7). Weights and state-dict keys are untouched. A small DT's training
    step on CPU takes 15-20 % less time (benchmarks/README.md).
    """
    for block in model.transformer.h:
        if isinstance(block.mlp.act, NewGELUActivation):
            block.mlp.act = torch.nn.GELU(approximate="tanh")


def training_attention(model: DecisionTransformer, device: torch.device):
    """The attention kernel for training steps: SDPA's fused kernels on GPU; on CPU, where
    attention dropout sends SDPA to its unfused math fallback, transformers' eager attention,
    which is faster there (same function)."""
    return eager_attention(model.transformer) if device.type == "cpu" else nullcontext()


def compile_for_trial(model: torch.nn.Module, num_cpus: float) -> torch.nn.Module:
    """`torch.compile(model)` for a new trial, in a worker that may have run other trials.

    Dynamo caches compiled code per code object (`DecisionTransformer.forward`, shared by every
    DT) and guards it on the module, so each new trial in a reused Ray worker compiles again;
    after `torch._dynamo.config.recompile_limit` (8) trials the worker would silently run eager.
    `torch.compiler.reset()` drops the earlier trials' graphs (their models are gone), and
    `fail_on_recompile_limit_hit` turns hitting the limit within one trial into an error rather
    than a silent fallback. Inductor compiles kernels in `compile_threads` processes (default:
    min(32, the machine's cores)); it is bounded by the trial's CPUs. The pool is made at the
    first compilation of a process and kept, so the first trial's bound holds for the worker
    (Ray reuses a worker only for trials of the same resources).
    """
    import torch._dynamo.config
    import torch._inductor.config

    torch.compiler.reset()
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    torch._inductor.config.compile_threads = max(1, int(num_cpus))
    return torch.compile(model)


class TrialRunner:
    """Everything one trial needs, prepared once; `run()` trains from wherever it stands."""

    def __init__(
        self,
        trial: Trial,
        store: Store,
        device: torch.device | None = None,
        dataset: DatasetSource | dict | None = None,
    ):
        """`dataset`: the driver's resolution of the trial's dataset (read and verified
        here); None resolves it on this machine (standalone use)."""
        self.trial, self.store = trial, store
        self.device = device or pick_device()
        self.tid = trial.trial_id
        tc = trial.train
        info = ENVS[trial.env]

        if isinstance(dataset, dict):
            dataset = DatasetSource.from_dict(dataset)
        self.dataset = open_trial_dataset(trial, dataset)
        # Provenance names the file the driver resolved (as trials.parquet does), not this
        # node's copy of it: same bytes (sha256), one name on every node.
        self.provenance = provenance_columns(trial, dataset if dataset is not None else self.dataset)
        arrays = read_d4rl_hdf5(self.dataset.path)
        self.traj = split_trajectories(arrays, max_ep_len=tc.max_ep_len)
        self.sampler = WindowSampler(
            self.traj, trial.context_len, tc.batch_size, seed=trial.seed, rtg_scale=tc.rtg_scale, device=self.device
        )
        self.probe = self.sampler.fixed_batch(trial.eval.action_error_samples, seed=PROBE_SEED)

        self.model = build_decision_transformer(
            trial.init,
            state_dim=info.obs_dim,
            act_dim=info.act_dim,
            seed=trial.seed,
            context_len=trial.context_len,
            dropout=(tc.dropout.resid, tc.dropout.attn, tc.dropout.embd),
            overrides=trial.model or None,
            swap_block=trial.swap_block,
            swap_from=trial.swap_from or "gpt2",
            max_ep_len=tc.max_ep_len,
            position_embeddings=tc.position_embeddings,
            timestep_embedding=tc.timestep_embedding,
            extend_positions=tc.extend_positions,
            freeze=tc.freeze,
        ).to(self.device)
        # Reid et al.'s auxiliary objectives (dtsweep.train.auxiliary); None when the trial has none.
        self.aux = build_auxiliary(trial.init, tc.aux, seed=trial.seed)
        if self.aux is not None:
            self.aux.to(self.device)
        # Frozen tensors (train.freeze) stay out of the optimizer; the auxiliary objectives' own
        # parameters (LM co-training's token table) join it and the gradient clipping.
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if self.aux is not None:
            self.params += list(self.aux.parameters())
        use_fused_gelu(self.model)
        self.precision = tc.precision
        check_precision(self.precision, self.device)
        # TF32 is switched on and off around each piece of work (train_epoch, action_error,
        # evaluate: `precision_flags`), never left set for the worker's next trial.
        # Only the training forward is compiled: its batches always have the same shape, while
        # evaluation and the probe vary the batch size (each size would compile again).
        self.train_forward = compile_for_trial(self.model, trial.resources.cpu) if tc.compile else self.model
        # The fused kernel updates every tensor in one pass (no Python loop per parameter),
        # on CUDA and on CPU; same AdamW update up to rounding.
        self.optimizer = torch.optim.AdamW(
            self.params, lr=tc.lr, weight_decay=tc.weight_decay, fused=self.device.type in ("cuda", "cpu")
        )
        warmup = max(tc.warmup_steps, 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min((s + 1) / warmup, 1.0))
        # Dropout masks depend on this generator; it is saved with the resume state.
        torch.manual_seed(trial.seed)

        self.eval_envs = None  # made at the first evaluation, reused by the later ones
        self.epoch = 0  # epochs completed
        self.step = 0
        self.wall_time_s = 0.0  # training + evaluation time, summed across restarts
        self.rows: list[dict] = []
        self.checkpoint_rows: list[dict] = []

    # ---- resume state (plain tensors/containers: loads with torch.load(weights_only=True))

    def resume_state(self) -> dict:
        """Everything `load_resume_state` needs to continue this trial as if never stopped.

        Every tensor is on the CPU, so the file loads on any machine (a GPU trial may resume on
        another node). `cuda_rng` (a GPU trial's dropout masks come from the CUDA generator)
        is present when the trial runs on CUDA.
        """
        state = {
            "trial_id": self.tid,
            "epoch": self.epoch,
            "step": self.step,
            "wall_time_s": self.wall_time_s,
            "model": self.model.state_dict(),
            "aux": self.aux.state_dict() if self.aux is not None else {},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler_rng": json.dumps(self.sampler.rng.bit_generator.state),
            "torch_rng": torch.get_rng_state(),
            "rows": json.dumps(self.rows),
            "checkpoint_rows": json.dumps(self.checkpoint_rows),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return _on_cpu(state)

    def load_resume_state(self, state: dict) -> None:
        """Continue from `resume_state()`'s dict, wherever its tensors were loaded.

        Tensors are first moved to the CPU (`map_location="cpu"` semantics; each then goes to
        the device of what it restores). The CUDA generator is restored when the state has one
        and this runner is on CUDA; a state saved on CPU leaves the CUDA generator as seeded.
        """
        state = _on_cpu(state)
        if state["trial_id"] != self.tid:
            raise ValueError(f"resume state of trial {state['trial_id']} given to trial {self.tid}")
        self.model.load_state_dict(state["model"])
        if self.aux is not None:
            self.aux.load_state_dict(state["aux"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.rng.bit_generator.state = json.loads(state["sampler_rng"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.wall_time_s = float(state["wall_time_s"])
        # Rows written after this state (a crash between the metrics write and the Tune
        # report) are dropped here and recomputed, so each epoch has exactly one row.
        self.rows = json.loads(state["rows"])
        self.checkpoint_rows = json.loads(state["checkpoint_rows"])
        self._write_metrics()

    # ---- the loop

    def run(self, on_epoch: Callable[[dict, TrialRunner], None] | None = None) -> list[dict]:
        """Train until `trial.epochs`; after each epoch write outputs, then call on_epoch(row, self)."""
        if self.epoch == 0 and not self.rows:
            self._finish_epoch(train_loss=None, evaluate=False, on_epoch=on_epoch)
        while self.epoch < self.trial.epochs:
            t0 = time.perf_counter()
            loss = self.train_epoch()
            self.wall_time_s += time.perf_counter() - t0
            self.epoch += 1
            self._finish_epoch(train_loss=loss, evaluate=True, on_epoch=on_epoch)
        return self.rows

    def train_epoch(self) -> float:
        tc = self.trial.train
        self.model.train()
        total = torch.zeros((), device=self.device)
        with precision_flags(self.precision), training_attention(self.model, self.device):
            for _ in range(tc.steps_per_epoch):
                batch = self.sampler.sample()
                with self.autocast():
                    out = self.train_forward(**batch)
                    loss = objective = self._action_mse(out, batch)
                    if self.aux is not None:  # Reid's terms join the gradient; train_loss stays the MSE
                        objective = loss + self.aux(self.step, self.model, out, batch["attention_mask"])
                self.optimizer.zero_grad(set_to_none=True)
                objective.backward()
                if tc.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(self.params, tc.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                total += loss.detach()  # no .item() per step: keeps GPU steps asynchronous
        return float(total) / tc.steps_per_epoch

    def autocast(self):
        """bf16 autocast for `precision: bf16`, else nothing."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    @staticmethod
    def _action_loss(forward, batch: dict) -> torch.Tensor:
        """Mean squared action error over the valid (unpadded) timesteps, in float32.

        A masked sum rather than boolean indexing: indexing needs the number of valid steps
        on the host, a GPU sync every step.
        """
        return TrialRunner._action_mse(forward(**batch), batch)

    @staticmethod
    def _action_mse(out, batch: dict) -> torch.Tensor:
        """`_action_loss` of a forward output `out` (a DTOutput) already computed."""
        preds = out.action_preds.float()  # [B, K, A]
        mask = batch["attention_mask"][..., None]  # [B, K, 1], 1.0 = valid
        return ((preds - batch["actions"]) ** 2 * mask).sum() / (mask.sum() * preds.shape[-1])

    @torch.no_grad()
    def action_error(self) -> float:
        was = self.model.training
        self.model.eval()
        with precision_flags(self.precision), self.autocast():
            err = self._action_loss(self.model, self.probe).item()
        self.model.train(was)
        return err

    def evaluate(self) -> dict:
        t, ev = self.trial, self.trial.eval
        if self.eval_envs is None:
            self.eval_envs = make_envs(t.env, ev.episodes, self.dataset.eval_env)
        with precision_flags(self.precision), self.autocast():
            res = evaluate_episodes(
                self.model,
                t.env,
                n_episodes=ev.episodes,
                seed=t.seed * 100_003 + self.epoch * 1_009,  # distinct per (seed, epoch)
                target_return=t.target_return,
                state_mean=self.traj.state_mean,
                state_std=self.traj.state_std,
                context_len=t.context_len,
                rtg_scale=t.train.rtg_scale,
                max_steps=ev.max_steps,
                max_ep_len=t.train.max_ep_len,
                device=self.device,
                envs=self.eval_envs,
            )
        return {
            "eval_return_mean": float(res.returns.mean()),
            "eval_return_std": float(res.returns.std()),
            "eval_length_mean": float(res.lengths.mean()),
            "normalized_score": normalized_score(t.env, float(res.returns.mean())),
        }

    def _finish_epoch(self, *, train_loss, evaluate: bool, on_epoch) -> None:
        t0 = time.perf_counter()
        row = {
            **self.trial.columns(),
            "epoch": self.epoch,
            "step": self.step,
            "train_loss": train_loss,
            "action_error": self.action_error(),
            "lr": self.scheduler.get_last_lr()[0],
        }
        if evaluate:
            row.update(self.evaluate())
        for key in ("train_loss", "action_error"):
            if row[key] is not None and not math.isfinite(row[key]):
                raise FloatingPointError(f"trial {self.tid}: {key} is {row[key]} at epoch {self.epoch} (diverged)")
        if self.epoch in self.trial.checkpoint_epochs:
            self._write_checkpoint()
        self.wall_time_s += time.perf_counter() - t0
        row["wall_time_s"] = self.wall_time_s
        self.rows = [r for r in self.rows if r["epoch"] < self.epoch] + [row]
        self._write_metrics()
        if on_epoch is not None:
            on_epoch(row, self)

    # ---- outputs

    def _write_metrics(self) -> None:
        self.store.write_table(f"metrics/{self.tid}.parquet", table_from_rows(self.rows, METRICS_SCHEMA))

    def _write_checkpoint(self) -> None:
        rel = f"checkpoints/{self.tid}/epoch={self.epoch}.parquet"
        info = ENVS[self.trial.env]
        meta = {
            "trial_id": self.tid,
            "epoch": self.epoch,
            "step": self.step,
            "state_dim": info.obs_dim,
            "act_dim": info.act_dim,
            "backbone_config": backbone_config_dict(self.model),
            "trial": self.trial.to_dict(),
            "provenance": self.provenance,
            "checkpoint_dtype": self.trial.checkpoint_dtype,
        }
        stats = write_checkpoint(self.store, rel, checkpoint_state(self.model.state_dict(), self.trial.checkpoint_dtype), meta)
        row = {"trial_id": self.tid, "epoch": self.epoch, "path": rel, **stats}  # relative: the sweep dir can move
        self.checkpoint_rows = [r for r in self.checkpoint_rows if r["epoch"] != self.epoch] + [row]
        self.store.write_table(f"checkpoints/{self.tid}/index.parquet", table_from_rows(self.checkpoint_rows, CHECKPOINTS_SCHEMA))


def checkpoint_state(state_dict: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """The tensors an analysis checkpoint stores: floating-point ones cast to `dtype` (a
    `checkpoint_dtype` of the spec: float32, bfloat16 or float16), the others (integer and
    boolean buffers) as they are. Training continues on the unrounded weights."""
    target = getattr(torch, dtype)
    return {k: v.to(target) if torch.is_floating_point(v) and v.dtype != target else v for k, v in state_dict.items()}


def _on_cpu(obj):
    """`obj` with every tensor in it (through dicts, lists and tuples) moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        out = type(obj)((k, _on_cpu(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a state_dict's per-module versions
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


def set_threads_for_trial(num_cpus: float) -> None:
    """Match torch's intra-op threads to the CPUs Ray gave the trial (avoids oversubscription)."""
    torch.set_num_threads(max(1, int(num_cpus)))
