"""`dtsweep diagnose`: every Takagi analysis of every finished trial, as a Ray Data job.

One work item per (trial, kind). A pool of actors (one per GPU, or one per CPU when there is no
GPU) rebuilds the trial's model from its Parquet checkpoints, measures, and writes the rows of
that item atomically to `diagnostics/parts/<kind>/<trial_id>.parquet`. An item whose part
exists is done: a rerun (after a crash, or after adding seeds to the sweep) measures only what
is missing. At the end the parts of each kind are concatenated into `diagnostics/<kind>.parquet`
and the time each item took goes to `diagnostics/timings.parquet` (trial_id, kind, init, n_rows,
seconds: wall clock, cpu_seconds: CPU time of the worker process, device, n_params).

Every row carries the trial columns (trial_id, study, init, env, dataset, context_len,
swap_block, seed), then, per kind ("final" = the trial's last epoch):

cka        epoch 0 vs final, on `n_windows` fixed windows of the trial's dataset; one row per
           (layer, token). layer "h.<b>.<module>" with module one of the 9 activations of
           `dtsweep.models.BLOCK_ACTIVATIONS`; block b; module; layer_index (position in the
           9 × n_layer order); token "return" | "state" | "action" (the last timestep's);
           cka (linear CKA, Kornblith et al.'s plug-in HSIC, as the paper); cka_debiased
           (unbiased HSIC); n (windows = rows compared); width (units of the activation);
           epoch_a, epoch_b.
mine       at the final epoch, on `n_windows` fixed windows without padding; one row per
           (block, which, token position). block b at depth "shallow" | "middle" | "deep"
           (0, n_layer // 2, n_layer − 1); which "X": I(x_t; T_b(s_K)), the raw input token at
           position t vs block b's output at the last state token, or "Y": I(a_K; T_b(x_t)),
           the last action vs block b's output at position t; position t = timestep 0..K−1,
           token its type, token_index = 3t + (0, 1, 2); every token but a_K. mi_nats (MINE,
           DV bound on held-out windows, see dtsweep.diagnostics.mine); n (windows);
           epoch; steps (the most the critic may train) and hidden of the critic; best_step
           (the step whose weights gave mi_nats) and stop_step (where early stopping ended it).
params     epoch 0 vs final; one row per floating-point tensor of the transformer blocks:
           tensor, block, l2, cosine, norm_a, norm_b, numel, epoch_a, epoch_b.
gradients  at the epoch-1 checkpoint, per-sample gradients of the action loss (eval mode) on
           one fixed batch of the trial's batch size, over the tensors the trial trained (its
           train.freeze re-applied: a frozen backbone is left out); three row types, told apart by `row`:
           "sample": sample, grad_norm (before clipping), grad_norm_clipped (at max_norm);
           "summary": confusion (min pairwise cosine, the same before and after clipping),
           n (samples), max_norm; "tensor": tensor, block (null outside the blocks), share
           (mean over samples of the tensor's share of the squared gradient norm), share_std.
           Columns of the other row types are null. Every row: epoch, max_norm.
attention  at every saved epoch, on `n_windows` fixed windows; one row per (epoch, block,
           head): distance_tokens (mean over windows of the mean over valid queries of
           Σ_j attn[i, j]·|i − j|), distance_timesteps (/3), gap_tokens (|d(epoch) − d(0)|,
           null without an epoch-0 checkpoint), n (windows).

The fixed windows depend only on the dataset, K and WINDOW_SEED, so every seed and init of a
dataset is measured on the same inputs.
"""

from __future__ import annotations

import json
import math
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from dtsweep.costs import diagnostics_estimate, diagnostics_seconds
from dtsweep.data import load_dataset, read_d4rl_hdf5, split_trajectories, window_batch
from dtsweep.diagnostics.attention import attention_distance, tokens_to_timesteps
from dtsweep.diagnostics.cka import linear_cka_both
from dtsweep.diagnostics.gradients import CLIP_NORM, dt_gradient_stats
from dtsweep.diagnostics.mine import train_critic_pairs
from dtsweep.diagnostics.params import BLOCK_PREFIX, param_changes
from dtsweep.inputs import fetch_file, published_dataset
from dtsweep.models import FREEZE, DecisionTransformer
from dtsweep.schemas import TRIAL_COLUMNS
from dtsweep.spec import Trial
from dtsweep.store import Store, load_checkpoint, read_checkpoint_metadata, table_from_rows

KINDS = ("cka", "mine", "params", "gradients", "attention")
WINDOW_SEED = 54321  # the windows every diagnostic measures on (per dataset and K)
TOKEN_TYPES = ("return", "state", "action")
PARTS_DIR = "diagnostics/parts"
TIMINGS = "diagnostics/timings.parquet"

# Per-kind settings. DEFAULT_OPTIONS follow the paper where it says (clip 0.25, batch of the
# training run). MINE's statistics network is narrower than the paper's 3×400: a trial needs
# 6(3K − 1) critics (354 at K = 20) and a 3×400 critic costs ~25 ms of one CPU core per step
# at batch 256, i.e. ~2.5 CPU-hours per trial for 1000 steps; 3×64 critics with Adam at 1e-3
# stop early on the validation bound after a few hundred steps instead (benchmarks/README.md,
# "Diagnostics cost"). Pass {"mine": {"hidden": 400, "lr": 1e-4, "patience": None}} for the
# paper's critic. All critics of a trial are one call (the samples are stored once per token
# representation, not per critic, so memory is the model's activations plus a few [critics,
# batch, hidden] tensors per stack); `stack` critics train at a time (None: 32 on CPU, where a
# stack's activations should stay in cache, all on a GPU; a number bounds GPU memory).
# Validation every 50 steps with patience 2 keeps the 100-step patience window of every 25 with
# patience 4 at half the evaluations (on a trained ChibiT trial: 0.002 nats lower on average
# over 354 critics, correlation 0.996; benchmarks/README.md, "Diagnostics cost").
# FAST_OPTIONS make a CPU smoke run (tests) take seconds per trial; MINE then underestimates
# (see the `diagnose --fast` help and benchmarks/README.md, "Diagnostics cost").
DEFAULT_OPTIONS: dict[str, dict] = {
    "cka": {"n_windows": 1024, "chunk": 256},
    "mine": {"n_windows": 4096, "hidden": 64, "layers": 3, "steps": 1000, "batch_size": 128,
             "lr": 1e-3, "eval_every": 50, "patience": 2, "eval_shuffles": 8,
             "stack": None, "chunk": 256, "depths": ["shallow", "middle", "deep"]},
    "params": {},
    "gradients": {"n_samples": None, "max_elements": None},  # None: trial batch size; by memory
    "attention": {"n_windows": 256},
}  # fmt: skip
FAST_OPTIONS: dict[str, dict] = {
    "cka": {"n_windows": 256},
    "mine": {
        "n_windows": 1024,
        "hidden": 32,
        "steps": 100,
        "batch_size": 128,
        "lr": 1e-3,
        "patience": None,
    },
    "gradients": {"n_samples": 16},
    "attention": {"n_windows": 64},
}


def _schema(columns: list[tuple[str, pa.DataType]]) -> pa.Schema:
    return pa.schema(TRIAL_COLUMNS + columns)


SCHEMAS: dict[str, pa.Schema] = {
    "cka": _schema([
        ("epoch_a", pa.int64()), ("epoch_b", pa.int64()), ("layer", pa.string()), ("block", pa.int64()),
        ("module", pa.string()), ("layer_index", pa.int64()), ("token", pa.string()),
        ("cka", pa.float64()), ("cka_debiased", pa.float64()), ("n", pa.int64()), ("width", pa.int64()),
    ]),
    "mine": _schema([
        ("epoch", pa.int64()), ("block", pa.int64()), ("depth", pa.string()), ("which", pa.string()),
        ("position", pa.int64()), ("token", pa.string()), ("token_index", pa.int64()),
        ("mi_nats", pa.float64()), ("n", pa.int64()), ("steps", pa.int64()), ("hidden", pa.int64()),
        ("best_step", pa.int64()), ("stop_step", pa.int64()),
    ]),
    "params": _schema([
        ("epoch_a", pa.int64()), ("epoch_b", pa.int64()), ("tensor", pa.string()), ("block", pa.int64()),
        ("l2", pa.float64()), ("cosine", pa.float64()), ("norm_a", pa.float64()), ("norm_b", pa.float64()),
        ("numel", pa.int64()),
    ]),
    "gradients": _schema([
        ("epoch", pa.int64()), ("row", pa.string()), ("sample", pa.int64()), ("grad_norm", pa.float64()),
        ("grad_norm_clipped", pa.float64()), ("confusion", pa.float64()), ("n", pa.int64()),
        ("max_norm", pa.float64()), ("tensor", pa.string()), ("block", pa.int64()), ("share", pa.float64()),
        ("share_std", pa.float64()),
    ]),
    "attention": _schema([
        ("epoch", pa.int64()), ("block", pa.int64()), ("head", pa.int64()), ("distance_tokens", pa.float64()),
        ("distance_timesteps", pa.float64()), ("gap_tokens", pa.float64()), ("n", pa.int64()),
    ]),
}  # fmt: skip

TIMINGS_SCHEMA = pa.schema(
    [("trial_id", pa.string()), ("kind", pa.string()), ("init", pa.string()), ("n_rows", pa.int64()),
     ("seconds", pa.float64()), ("cpu_seconds", pa.float64()), ("device", pa.string()), ("n_params", pa.int64()),
     ("node_id", pa.string())]
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Cost model (for `plan`): dtsweep.costs holds the measured per-kind figures and their scaling,
# so that `plan` need not import torch. estimated_seconds(kind, n_layer, n_embd, context_len, ...)
# is dtsweep.costs.diagnostics_seconds.

estimated_seconds = diagnostics_seconds


# ---------------------------------------------------------------------------------------------
# What each kind needs


def _required_epochs(kind: str, trial: Trial, saved: set[int]) -> set[int] | str:
    """The checkpoint epochs `kind` reads for `trial`, or why it cannot run."""
    final = trial.epochs
    need = {
        "cka": {0, final},
        "mine": {final},
        "params": {0, final},
        "gradients": {1},
        "attention": saved,
    }[kind]
    missing = sorted(need - saved)
    if missing or not need:
        return f"{kind} needs checkpoints at epochs {sorted(need) or '[any]'}; saved: {sorted(saved)}"
    return need


# ---------------------------------------------------------------------------------------------
# Measurement: one function per kind, (context, trial, checkpoints) -> rows


@dataclass
class Context:
    """What the measurements share inside one worker: device, options, cached datasets."""

    device: torch.device
    options: dict[str, dict]
    max_grad_elements: int
    _data: dict = field(default_factory=dict)
    # (dataset, steps, seed) -> {"uri", "sha256"} of the copy `run` published (dtsweep.inputs):
    # read on any node, byte for byte what the trial trained on.
    published: dict = field(default_factory=dict)

    def model(self, path: str, freeze: str = "none"):
        """Rebuild a checkpoint's DecisionTransformer, in eval mode, on the device.

        freeze: the trial's `train.freeze`; "blocks" freezes the backbone again, so that
        requires_grad says which tensors the trial trained (the checkpoint does not record it).
        """
        if freeze not in FREEZE:
            raise ValueError(f"freeze must be one of {FREEZE}, got {freeze!r}")
        meta = read_checkpoint_metadata(path)
        model = DecisionTransformer.from_config_dict(meta["backbone_config"], meta["state_dim"], meta["act_dim"])
        model.load_state_dict(load_checkpoint(path))
        if freeze == "blocks":
            model.freeze_backbone()
        return model.to(self.device).eval()

    def trajectories(self, trial: Trial):
        key = (trial.dataset, trial.data.steps, trial.data.seed, trial.train.max_ep_len)
        if key not in self._data:
            published = self.published.get(key[:3])
            if published:
                arrays = read_d4rl_hdf5(fetch_file(published["uri"], published["sha256"]))
            else:  # a sweep from before inputs were published: resolved on this node
                arrays = load_dataset(trial.dataset, steps=trial.data.steps, seed=trial.data.seed)
            # Items of one trial share a dataset; keeping only the latest bounds memory.
            self._data = {key: split_trajectories(arrays, max_ep_len=trial.train.max_ep_len)}
        return self._data[key]

    def windows(self, trial: Trial, n: int, *, full: bool = False) -> dict[str, torch.Tensor]:
        """n fixed windows of the trial's dataset (WINDOW_SEED); full=True: no padded timestep."""
        traj = self.trajectories(trial)
        rng = np.random.default_rng(WINDOW_SEED)
        k = trial.context_len
        if full:
            starts = np.flatnonzero(traj.episode_ends - np.arange(traj.num_steps) >= k)
            if len(starts) < n:
                raise ValueError(f"{trial.dataset} has {len(starts)} windows of {k} unpadded steps, {n} needed")
            starts = rng.choice(starts, size=n, replace=False)
        else:
            starts = rng.integers(0, traj.num_steps, size=n)
        return window_batch(traj, starts, k, rtg_scale=trial.train.rtg_scale, device=self.device)


def _forward_capturing(model, batch: dict, modules: dict, keep: Callable, chunk: int | None = None) -> dict:
    """Run `model` on `batch` (in chunks of windows) and return name -> concatenated keep(output)."""
    got: dict[str, list[torch.Tensor]] = {name: [] for name in modules}

    def hook(name, _module, _inputs, output):
        out = output[0] if isinstance(output, tuple) else output
        got[name].append(keep(out).detach())

    handles = [m.register_forward_hook(partial(hook, name)) for name, m in modules.items()]
    n = len(batch["states"])
    try:
        with torch.no_grad():
            for i in range(0, n, chunk or n):
                model(**{k: v[i : i + (chunk or n)] for k, v in batch.items()})
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(parts) for name, parts in got.items()}


def measure_cka(ctx: Context, trial: Trial, ckpts: dict[int, str]) -> list[dict]:
    opt = ctx.options["cka"]
    first, final = 0, trial.epochs
    batch = ctx.windows(trial, opt["n_windows"])
    acts = {}
    for epoch in (first, final):
        model = ctx.model(ckpts[epoch])
        # The last timestep's three tokens; the last timestep of a window is never padding.
        acts[epoch] = _forward_capturing(model, batch, model.activation_modules(), lambda out: out[:, -3:].float(), opt["chunk"])
        del model
    rows = []
    for index, layer in enumerate(acts[first]):
        block, module = layer.split(".", 2)[1:]
        for t, token in enumerate(TOKEN_TYPES):
            a, b = acts[first][layer][:, t], acts[final][layer][:, t]
            plug_in, debiased = linear_cka_both(a, b)  # one set of feature products for both
            rows.append(
                {
                    "epoch_a": first,
                    "epoch_b": final,
                    "layer": layer,
                    "block": int(block),
                    "module": module,
                    "layer_index": index,
                    "token": token,
                    "cka": plug_in,
                    "cka_debiased": debiased,
                    "n": a.shape[0],
                    "width": a.shape[1],
                }
            )
    return rows


def mine_blocks(n_layer: int) -> dict[int, str]:
    """Block index -> depth label for the shallow, middle and deep block (merged when equal)."""
    out: dict[int, str] = {}
    for depth, block in (("shallow", 0), ("middle", n_layer // 2), ("deep", n_layer - 1)):
        out.setdefault(block, depth)
    return out


def measure_mine(ctx: Context, trial: Trial, ckpts: dict[int, str]) -> list[dict]:
    opt = ctx.options["mine"]
    epoch = trial.epochs
    k = trial.context_len
    batch = ctx.windows(trial, opt["n_windows"], full=True)
    model = ctx.model(ckpts[epoch])
    # Finding 2 reads the middle block; `depths` can leave the others out to cut the cost
    # (MINE's critics dominate diagnose: 2 × (3K − 1) per measured block).
    blocks = {b: d for b, d in mine_blocks(model.transformer.config.n_layer).items() if d in opt["depths"]}
    if not blocks:
        raise ValueError(f"mine option depths={opt['depths']!r} names no block; use shallow, middle, deep")
    hidden = _forward_capturing(
        model, batch, {b: model.transformer.h[b] for b in blocks}, lambda out: out.float(), opt["chunk"]
    )  # block -> [n, 3K, H], the block's output at every token
    del model

    inputs = []  # token_index -> raw input token [n, d]
    for t in range(k):
        inputs += [batch["returns_to_go"][:, t], batch["states"][:, t], batch["actions"][:, t]]
    last_state = 3 * k - 2
    positions = range(3 * k - 1)  # every token but a_K

    # Sources: the 3K raw input tokens (x) and each measured block's output at the 3K − 1
    # positions but a_K (y). Every critic pairs one of each; a source is stored once however
    # many critics use it (the last state's output is the y of all 3K − 1 "X" critics).
    blist = list(blocks)
    y_sources = [hidden[b][:, j] for b in blist for j in positions]

    def y_of(b: int, j: int) -> int:
        return blist.index(b) * len(positions) + j

    specs, pairs = [], []
    for b in blist:
        for j in positions:
            specs.append((b, "X", j))
            pairs.append((j, y_of(b, last_state)))
            specs.append((b, "Y", j))
            pairs.append((3 * k - 1, y_of(b, j)))  # inputs[3K − 1] is a_K
    names = ("hidden", "layers", "steps", "batch_size", "lr", "eval_every", "patience", "eval_shuffles", "stack")
    kw = {name: opt[name] for name in names if name in opt}
    result = train_critic_pairs(inputs, y_sources, pairs, seed=trial.seed, **kw)
    mi, best_step, stop_step = result.mi, result.best_step, result.stop_step
    n = len(batch["states"])
    return [
        {
            "epoch": epoch,
            "block": b,
            "depth": blocks[b],
            "which": which,
            "position": j // 3,
            "token": TOKEN_TYPES[j % 3],
            "token_index": j,
            "mi_nats": float(v),
            "n": n,
            "steps": opt["steps"],
            "hidden": opt["hidden"],
            "best_step": int(bs),
            "stop_step": int(ss),
        }
        for (b, which, j), v, bs, ss in zip(specs, mi, best_step, stop_step)
    ]


def measure_params(ctx: Context, trial: Trial, ckpts: dict[int, str]) -> list[dict]:
    first, final = 0, trial.epochs
    rows = param_changes(load_checkpoint(ckpts[first]), load_checkpoint(ckpts[final]), BLOCK_PREFIX)
    return [{"epoch_a": first, "epoch_b": final, **r} for r in rows]


def _block_of(name: str) -> int | None:
    if not name.startswith(BLOCK_PREFIX):
        return None
    return int(name[len(BLOCK_PREFIX) :].split(".", 1)[0])


def measure_gradients(ctx: Context, trial: Trial, ckpts: dict[int, str]) -> list[dict]:
    opt = ctx.options["gradients"]
    epoch = 1
    max_norm = trial.train.grad_clip if trial.train.grad_clip is not None else CLIP_NORM
    batch = ctx.windows(trial, opt.get("n_samples") or trial.train.batch_size)
    # Frozen tensors never trained: their gradients are not part of the trial's update.
    model = ctx.model(ckpts[epoch], freeze=trial.train.freeze)
    stats = dt_gradient_stats(model, batch, max_norm=max_norm, max_elements=opt.get("max_elements") or ctx.max_grad_elements)
    base = {"epoch": epoch, "max_norm": max_norm}
    rows = [
        {**base, "row": "sample", "sample": i, "grad_norm": float(a), "grad_norm_clipped": float(b)}
        for i, (a, b) in enumerate(zip(stats.norm.tolist(), stats.clipped_norm.tolist()))
    ]
    rows.append({**base, "row": "summary", "confusion": stats.confusion, "n": len(stats.norm)})
    for name, share in stats.shares.items():
        rows.append(
            {
                **base,
                "row": "tensor",
                "tensor": name,
                "block": _block_of(name),
                "share": float(share.mean()),
                "share_std": float(share.std()) if len(share) > 1 else math.nan,
            }
        )
    return rows


def measure_attention(ctx: Context, trial: Trial, ckpts: dict[int, str]) -> list[dict]:
    batch = ctx.windows(trial, ctx.options["attention"]["n_windows"])
    token_mask = batch["attention_mask"].repeat_interleave(3, dim=1)  # [B, 3K]
    distance = {}  # (epoch, block) -> [heads]
    for epoch in sorted(ckpts):
        model = ctx.model(ckpts[epoch])
        with torch.no_grad():
            maps = model(**batch, output_attentions=True).attentions  # n_layer × [B, heads, 3K, 3K]
        for block, attn in enumerate(maps):
            distance[epoch, block] = attention_distance(attn, token_mask).mean(0).cpu()
        del model, maps
    rows = []
    for (epoch, block), d in sorted(distance.items()):
        d0 = distance.get((0, block))
        for head, v in enumerate(d.tolist()):
            rows.append(
                {
                    "epoch": epoch,
                    "block": block,
                    "head": head,
                    "distance_tokens": v,
                    "distance_timesteps": tokens_to_timesteps(v),
                    "gap_tokens": abs(v - float(d0[head])) if d0 is not None else None,
                    "n": len(batch["states"]),
                }
            )
    return rows


MEASURES: dict[str, Callable[[Context, Trial, dict[int, str]], list[dict]]] = {
    "cka": measure_cka,
    "mine": measure_mine,
    "params": measure_params,
    "gradients": measure_gradients,
    "attention": measure_attention,
}


# ---------------------------------------------------------------------------------------------
# The Ray Data job


def _part(kind: str, trial_id: str) -> str:
    return f"{PARTS_DIR}/{kind}/{trial_id}.parquet"


def _grad_budget(device: torch.device) -> int:
    """Per-sample gradient elements held at once: a quarter of free GPU memory, 512 MiB on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(2**27, free // 4 // 4)
    return 2**27


class DiagnosticsWorker:
    """A Ray Data actor: measures one (trial, kind) item and writes its part file."""

    def __init__(self, sweep_dir: str, options: dict[str, dict]):
        import ray

        self.store = Store(sweep_dir)
        # CUDA only with a GPU of its own: an actor that asked Ray for CPUs sees every GPU of its
        # node (Ray sets CUDA_VISIBLE_DEVICES only for GPU requests) and would pile onto cuda:0.
        has_gpu = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
        device = torch.device("cuda" if has_gpu else "cpu")
        if device.type == "cpu":
            torch.set_num_threads(1)  # one actor per CPU
        self.node_id = ray.get_runtime_context().get_node_id()
        self.ctx = Context(device=device, options=options, max_grad_elements=_grad_budget(device))

    def __call__(self, item: dict) -> dict:
        trial = Trial.from_dict(json.loads(item["config_json"]))
        ckpts = {int(e): p for e, p in json.loads(item["checkpoints_json"]).items()}
        kind = item["kind"]
        self.ctx.published[(trial.dataset, trial.data.steps, trial.data.seed)] = json.loads(item.get("dataset_json") or "null")
        t0, c0 = time.perf_counter(), time.process_time()
        status = {"trial_id": item["trial_id"], "kind": kind, "init": trial.init, "device": str(self.ctx.device),
                  "n_params": item["n_params"], "n_rows": 0, "seconds": 0.0, "cpu_seconds": 0.0,
                  "node_id": self.node_id, "error": None}  # fmt: skip
        try:
            rows = MEASURES[kind](self.ctx, trial, ckpts)
        except Exception as e:  # one trial's failure must not discard the other items' work
            status["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}"
            return status
        columns = trial.columns()
        table = table_from_rows([{**columns, **r} for r in rows], SCHEMAS[kind])
        self.store.write_table(_part(kind, trial.trial_id), table)
        # CPU seconds of the actor process: on a shared machine, what the item costs a core of
        # its own (wall seconds also count the time other processes held the core).
        status.update(n_rows=len(rows), seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0)
        return status


def _checkpoint_index(store: Store) -> pd.DataFrame:
    """trial_id, epoch, path, n_params: the per-trial indexes, else the compacted checkpoints.parquet."""
    parts = [store.read_pandas(f"checkpoints/{tid}/index.parquet") for tid in store.list_dirs("checkpoints")
             if store.exists(f"checkpoints/{tid}/index.parquet")]  # fmt: skip
    if store.exists("checkpoints.parquet"):
        parts.append(store.read_pandas("checkpoints.parquet"))
    if not parts:
        raise FileNotFoundError(f"{store.root}: no checkpoints.parquet and no checkpoints/*/index.parquet")
    # The per-trial index is rewritten with every checkpoint; the compacted file may be older.
    return pd.concat(parts, ignore_index=True).drop_duplicates(["trial_id", "epoch"], keep="first")


@dataclass
class Plan:
    """Work for one `run_diagnostics` call."""

    todo: list[dict]  # items for the workers
    done: list[tuple[str, str]]  # (trial_id, kind) with a part already written
    skipped: list[tuple[str, str, str]]  # (trial_id, kind, reason)


def plan(sweep_dir: str, kinds: Iterable[str] = KINDS) -> Plan:
    """The (trial, kind) items that are due: finished trials whose part is not written yet."""
    store = Store(sweep_dir)
    if not store.exists("trials.parquet"):
        raise FileNotFoundError(f"{sweep_dir}: no trials.parquet (not a dtsweep sweep directory, or never run)")
    trials = store.read_pandas("trials.parquet")
    index = _checkpoint_index(store)
    todo, done, skipped = [], [], []
    for row in trials.itertuples():
        trial = Trial.from_dict(json.loads(row.config_json))
        estimate = diagnostics_estimate(trial) if row.status == "finished" else {}
        own = index[index.trial_id == row.trial_id]
        # Stored paths are relative to the sweep directory (older sweeps: absolute).
        saved = {int(e): store.resolve_rel(p) for e, p in zip(own.epoch, own.path)}
        for kind in kinds:
            if row.status != "finished":
                skipped.append((row.trial_id, kind, f"trial is {row.status}"))
                continue
            if store.exists(_part(kind, row.trial_id)):
                done.append((row.trial_id, kind))
                continue
            need = _required_epochs(kind, trial, set(saved))
            if isinstance(need, str):
                skipped.append((row.trial_id, kind, need))
                continue
            todo.append(
                {
                    "trial_id": row.trial_id,
                    "kind": kind,
                    "config_json": row.config_json,
                    "checkpoints_json": json.dumps({str(e): saved[e] for e in sorted(need)}),
                    "n_params": int(own.n_params.max()),
                    "estimated_cpu_s": estimate.get(kind, 0.0),  # dtsweep.costs: the order and ETA of the job
                    "dataset_json": json.dumps(
                        published_dataset(store, getattr(row, "dataset_sha256", None), getattr(row, "dataset_source", None))
                    ),
                }
            )
    return Plan(todo, done, skipped)


def _compact(store: Store, kind: str) -> str:
    parts = store.list(f"{PARTS_DIR}/{kind}", ".parquet")
    tables = [store.read_table(p).cast(SCHEMAS[kind]) for p in parts]
    table = pa.concat_tables(tables) if tables else SCHEMAS[kind].empty_table()
    rel = f"diagnostics/{kind}.parquet"
    store.write_table(rel, table)
    return store.uri(rel)


def _write_timings(store: Store, statuses: list[dict]) -> None:
    new = [s for s in statuses if s["error"] is None]
    old = store.read_pandas(TIMINGS).to_dict("records") if store.exists(TIMINGS) else []
    seen = {(s["trial_id"], s["kind"]) for s in new}
    rows = [r for r in old if (r["trial_id"], r["kind"]) not in seen] + new
    store.write_table(TIMINGS, table_from_rows(rows, TIMINGS_SCHEMA))


def _progress_line(status: dict, done: int, total: int, elapsed: float, share_done: float) -> str:
    """One line per finished (trial, kind) item: its time, the job's elapsed time and an ETA.

    share_done: the finished items' share of the job's estimated CPU seconds (`estimated_cpu_s`);
    the ETA assumes the rest goes at the same pace (items run longest first, so counting items
    would overstate it many times over at the start).
    """
    eta = elapsed / share_done * (1 - share_done) if share_done > 0 else elapsed / done * (total - done)
    what = "failed" if status["error"] is not None else f"{status['n_rows']} rows in {status['seconds']:.1f}s"
    return (
        f"[diagnose {_clock(elapsed)}] {done}/{total} {status['kind']} of {status['trial_id']} ({status['init']}): "
        f"{what}; ETA {_clock(eta)}"
    )


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def _merge_options(options: dict[str, dict] | None) -> dict[str, dict]:
    merged = {k: dict(v) for k, v in DEFAULT_OPTIONS.items()}
    for kind, values in (options or {}).items():
        if kind not in merged:
            raise ValueError(f"options for unknown diagnostic kind {kind!r}; kinds: {KINDS}")
        unknown = set(values) - set(DEFAULT_OPTIONS[kind])
        if unknown:
            raise ValueError(f"unknown {kind} options {sorted(unknown)}; known: {sorted(DEFAULT_OPTIONS[kind])}")
        merged[kind].update(values)
    return merged


def worker_pool(n_items: int, gpu: str, max_workers: int | None = None, log: Callable[[str], None] = print):
    """(Ray Data actor pool, per-actor resources) for n_items diagnostic items; call inside ray_session.

    gpu: "auto" gives each worker a GPU when the cluster has GPUs now, else runs on CPUs and
    says so; "on" asks for GPUs even when none is up yet (the workers wait for the GPU nodes an
    autoscaler starts); "off" runs on CPUs. A worker holds one GPU, or one CPU with one torch
    thread. The pool starts with as many workers as the cluster fits now and grows, up to
    max_workers (default: one per item), as nodes join: a sweep's GPU nodes may have been
    scaled down by the time `diagnose` starts.
    """
    import ray

    if gpu not in ("auto", "on", "off"):
        raise ValueError(f"gpu option must be auto, on or off, got {gpu!r}")
    if max_workers is not None and max_workers < 1:
        raise ValueError(f"max_workers option must be >= 1, got {max_workers}")
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    on_gpu = gpu == "on" or (gpu == "auto" and gpus > 0)
    if gpu == "auto" and not on_gpu:
        log("diagnostics: no GPU in the Ray cluster now: workers run on CPUs (`--gpu on` waits for GPU nodes)")
    elif gpu == "on" and not gpus:
        log("diagnostics: --gpu on and no GPU in the cluster yet: workers wait for GPU nodes (autoscaler)")
    fits_now = gpus if on_gpu else int(resources.get("CPU", 0))
    largest = min(n_items, max_workers or n_items)
    initial = max(1, min(fits_now, largest))
    # One item at a time per worker: items last from a second to minutes, and a short one
    # queued behind a MINE item while another worker idles cost the quickstart 2 of 10 minutes.
    pool = ray.data.ActorPoolStrategy(min_size=1, max_size=largest, initial_size=initial, max_tasks_in_flight_per_actor=1)
    log(f"diagnostics: {initial} worker(s) on {'GPU' if on_gpu else 'CPU'}, up to {largest} as the cluster grows")
    return pool, ({"num_gpus": 1} if on_gpu else {"num_cpus": 1})


def run_diagnostics(
    sweep_dir: str,
    kinds: Iterable[str] | None = None,
    *,
    num_cpus: int | None = None,
    options: dict[str, dict] | None = None,
    address: str | None = None,
    gpu: str = "auto",
    max_workers: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, str]:
    """Measure every due (finished trial, kind) of a sweep with Ray Data; returns kind -> file.

    Args:
        sweep_dir: the sweep directory (local path or URI).
        kinds: subset of KINDS (default: all).
        num_cpus: CPUs of a local Ray started here (default: all); ignored when connecting.
        options: per-kind overrides of DEFAULT_OPTIONS, e.g. FAST_OPTIONS or
            {"mine": {"steps": 500}}.
        address: a Ray cluster to connect to (default: RAY_ADDRESS, else a local Ray).
        gpu, max_workers: the worker pool (see `worker_pool`): one worker per GPU, else one per
            CPU with one torch thread each, growing with the cluster.
        log: progress and skip messages.

    Finished (trial, kind) items are not measured again; delete diagnostics/parts/<kind>/ to
    redo a kind. Raises RuntimeError after writing what succeeded if any item failed.
    """
    import ray

    from dtsweep.cluster import ray_session

    kinds = tuple(kinds or KINDS)
    bad = sorted(set(kinds) - set(KINDS))
    if bad:
        raise ValueError(f"unknown diagnostic kinds {bad}; kinds: {KINDS}")
    opts = _merge_options(options)
    store = Store(sweep_dir)
    work = plan(sweep_dir, kinds)
    for tid, kind, why in work.skipped:
        log(f"skip {kind} of {tid}: {why}")
    log(f"diagnostics: {len(work.todo)} to measure, {len(work.done)} already done, {len(work.skipped)} skipped")

    statuses: list[dict] = []
    if work.todo:
        with ray_session(address, num_cpus=num_cpus):
            pool, per_actor = worker_pool(len(work.todo), gpu, max_workers, log)
            # Longest first: no long item starts last while the other workers idle.
            todo = sorted(work.todo, key=lambda item: -item["estimated_cpu_s"])
            cost = {(i["trial_id"], i["kind"]): i["estimated_cpu_s"] for i in todo}
            total_cost, cost_done = sum(cost.values()), 0.0
            ctx = ray.data.DataContext.get_current()
            saved = ctx.enable_progress_bars, ctx.autoscaling_config
            # One line per finished item with an ETA comes from here; Ray Data's own progress
            # would add a block of lines every 10 s to a log file (stdout not a terminal).
            ctx.enable_progress_bars = False
            # With one item in flight per worker, a pool whose workers are all busy is at
            # utilisation 1.0: grow then (Ray Data's default, 1.75, assumes queued items).
            ctx.autoscaling_config = replace(ctx.autoscaling_config, actor_pool_util_upscaling_threshold=1.0)
            try:
                ds = ray.data.from_items(todo, override_num_blocks=len(todo)).map(
                    DiagnosticsWorker,
                    fn_constructor_kwargs={"sweep_dir": sweep_dir, "options": opts},
                    compute=pool,
                    **per_actor,
                )
                t0 = time.perf_counter()
                for status in ds.iter_rows():
                    statuses.append(dict(status))
                    cost_done += cost[status["trial_id"], status["kind"]]
                    share = cost_done / total_cost if total_cost else 0.0
                    log(_progress_line(status, len(statuses), len(todo), time.perf_counter() - t0, share))
            finally:
                ctx.enable_progress_bars, ctx.autoscaling_config = saved
        _write_timings(store, statuses)

    out = {kind: _compact(store, kind) for kind in kinds}
    failed = [s for s in statuses if s["error"] is not None]
    if failed:
        lines = "\n".join(f"  {s['kind']} of {s['trial_id']}: {s['error']}" for s in failed)
        raise RuntimeError(f"{len(failed)} diagnostic item(s) failed (the rest are written):\n{lines}")
    return out
