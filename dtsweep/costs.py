"""What a sweep will cost: GPU-hours and storage per trial, from a table of device figures.

Time per training step is a fixed overhead plus the matmul work of the backbone,
`6 × block_params × tokens` FLOPs (forward + backward), at an effective throughput; an
evaluation step (all episodes of an epoch advance one env step) is an overhead plus the forward
work `2 × block_params × episodes × 3K` plus one MuJoCo step per episode, run one after another.

The figures come from `benchmarks/run.py` (its "cost_table"; benchmarks/README.md records each
run and its machine). Which device a trial is costed on follows its resources: a trial that asks
for a GPU fraction is costed on `GPU`, one that asks for none on `CPU`.

- `CPU`: measured with benchmarks/run.py on one core of the 2-core development machine named
  below, in CPU time (the machine was shared; CPU time leaves out the time other jobs held the
  core). The throughput is a two-point fit through a tiny DT (2 × 32) and a ChibiT-sized one
  (3 × 128): good between and around those sizes; nobody trains GPT-2 on a CPU.
- `GPU`: estimates for one A100/H100-class GPU running fp32/TF32 training, not yet measured
  (no GPU was available to the benchmark runs so far). `ENV_STEP_S` (MuJoCo runs on the host
  CPU either way) is the CPU measurement.

Storage is counted in two parts. What a finished trial keeps: the analysis checkpoints (one
Parquet file per epoch of `checkpoint_epochs`, weights in `checkpoint_dtype`: 4 bytes per
parameter in float32, 2 in bfloat16/float16) and its metrics. What a trial holds only while it
runs: its resume state (fp32 weights + AdamW's two moments, 12 bytes per parameter), deleted
when it finishes (`dtsweep.sweepdir.prune_resume_states`), so the resume states on storage at
any time are those of the trials running (and of unfinished ones).

Diagnostics (`dtsweep diagnose`, default options) are costed in CPU seconds of one
core per trial and kind (`diagnostics_seconds`), scaled from per-kind figures measured on a
ChibiT-size trial with benchmarks/diagnostics.py (benchmarks/README.md, "Diagnostics cost").
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

from dtsweep.envs import ENVS
from dtsweep.spec import SweepSpec, Trial


@dataclass(frozen=True)
class Device:
    """Throughput of one kind of device on a DT trial (see the module docstring).

    train_flops: effective FLOP/s on the training work 6 · block_params · tokens.
    train_step_overhead_s: seconds per training step on top of that work (sampling, small ops,
        optimizer, launch overheads).
    eval_step_overhead_s: seconds per batched evaluation step on top of its forward work.
    env_step_s: seconds per MuJoCo env step (host CPU).
    """

    name: str
    source: str
    train_flops: float
    train_step_overhead_s: float
    eval_step_overhead_s: float
    env_step_s: float


# One MuJoCo hopper step (Gymnasium wrappers included), CPU time, measured on the machine of `CPU`.
ENV_STEP_S = 86e-6

# benchmarks/results/cpu-2core.json ("cost_table"), full run of 2026-11-21 21:33 UTC.
CPU = Device(
    name="1 core of a 2-core Intel Xeon VM (AVX-512, AMX), torch 2.13 CPU, 1 thread",
    source="measured: benchmarks/run.py, CPU time (benchmarks/results/cpu-2core.json)",
    train_flops=67e9,
    train_step_overhead_s=0.033,
    eval_step_overhead_s=0.0017,
    env_step_s=ENV_STEP_S,
)

GPU = Device(
    name="one A100/H100-class GPU, fp32 with TF32 matmuls",
    source="estimate: no GPU measured yet (benchmarks/run.py measures one when CUDA is present)",
    train_flops=50e12,  # ≈ 1/3 of an A100's TF32 peak
    train_step_overhead_s=0.006,  # Python, optimizer and sampler per training step
    eval_step_overhead_s=0.004,  # one batched forward's launch overhead per env step
    env_step_s=ENV_STEP_S,
)

# Architecture of each named init: layers, width, vocabulary rows, positions.
ARCH = {
    "random": (12, 768, 1, 1024),
    "random-ref": (12, 768, 1, 1024),
    "gpt2": (12, 768, 1, 1024),
    "igpt": (24, 512, 1, 1024),
    "clip": (12, 512, 1, 77),
}


CHECKPOINT_BYTES_PER_PARAM = {"float32": 4, "bfloat16": 2, "float16": 2}
RESUME_BYTES_PER_PARAM = 12  # fp32 weights + AdamW exp_avg + exp_avg_sq
METRICS_ROW_BYTES = 2000  # one epoch's metrics row, per-trial file and compacted copy


@dataclass(frozen=True)
class TrialCost:
    params: int  # parameters of the DT (backbone + embeddings + head)
    gpu_hours: float  # trial wall time × its GPU fraction (CPU-hours when it asks for no GPU)
    hours: float  # estimated wall time of the trial alone on its resources
    storage_bytes: int  # bytes the finished trial keeps: analysis checkpoints + metrics
    device: str  # name of the Device the time was estimated for
    checkpoint_bytes: int = 0  # of which analysis checkpoints (checkpoint_epochs × checkpoint_dtype)
    resume_bytes: int = 0  # its resume state while it runs (fp32 weights + AdamW moments; deleted when finished)
    diagnostics_cpu_hours: float = 0.0  # default `diagnose` of the finished trial, one CPU core


# ---------------------------------------------------------------------------------------------
# Diagnostics

# CPU seconds of one core (one torch thread) per trial and kind with the job's DEFAULT_OPTIONS:
# the mean of `diagnostics/timings.parquet` over the six trials of a finished quickstart sweep
# (ChibiT size: 3 blocks, 128 wide, 1 head, K = 20, batch 32, checkpoints at epochs 0, 1, 3),
# `dtsweep diagnose` with two CPU workers on an otherwise idle 2-core AMD EPYC machine;
# benchmarks/README.md, "Diagnostics cost", has the tables.
DIAGNOSTICS_REFERENCE = {"n_layer": 3, "n_embd": 128, "context_len": 20, "batch_size": 32, "n_epochs_saved": 3}
DIAGNOSTICS_CPU_SECONDS = {"cka": 6.4, "mine": 147.4, "params": 0.02, "gradients": 0.36, "attention": 1.7}
DIAGNOSTIC_KINDS = tuple(DIAGNOSTICS_CPU_SECONDS)
# Width of MINE's statistics network in DEFAULT_OPTIONS (a test keeps the two equal).
MINE_HIDDEN = 64


def _mine_block_count(n_layer: int) -> int:
    return len({0, n_layer // 2, n_layer - 1})  # shallow, middle, deep (merged when equal)


def diagnostics_seconds(
    kind: str, n_layer: int, n_embd: int, context_len: int, *, batch_size: int = 64, n_epochs_saved: int = 3
) -> float:
    """Rough CPU seconds (one core, the job's DEFAULT_OPTIONS) that diagnostic `kind` takes for one trial.

    Scales DIAGNOSTICS_CPU_SECONDS by the work that grows with the model: forwards and feature
    products ∝ n_layer · n_embd² · K (cka, attention × saved epochs, gradients × batch), tensor
    sizes ∝ n_layer · n_embd² (params), and MINE ∝ its number of critics (3K − 1 positions ×
    2 × up to 3 blocks) × a critic's per-row cost, whose first layer grows with n_embd. A GPU
    runs the same work many times faster; no GPU figure has been measured yet.
    """
    ref = DIAGNOSTICS_REFERENCE
    body = (n_layer * n_embd**2 * context_len) / (ref["n_layer"] * ref["n_embd"] ** 2 * ref["context_len"])
    cpu = DIAGNOSTICS_CPU_SECONDS
    if kind == "cka":
        return cpu["cka"] * body
    if kind == "attention":
        return cpu["attention"] * body * n_epochs_saved / ref["n_epochs_saved"]
    if kind == "gradients":
        return cpu["gradients"] * body * batch_size / ref["batch_size"]
    if kind == "params":
        return cpu["params"] * body * ref["context_len"] / context_len
    if kind == "mine":

        def critic_cost(width: int) -> float:  # multiply-adds per row of a 3-layer critic
            return (width + 11) * MINE_HIDDEN + 2 * MINE_HIDDEN * MINE_HIDDEN

        critics = (3 * context_len - 1) * _mine_block_count(n_layer)
        ref_critics = (3 * ref["context_len"] - 1) * _mine_block_count(ref["n_layer"])
        return cpu["mine"] * critics / ref_critics * critic_cost(n_embd) / critic_cost(ref["n_embd"])
    raise ValueError(f"unknown diagnostic kind {kind!r}; kinds: {DIAGNOSTIC_KINDS}")


def diagnostics_estimate(trial: Trial) -> dict[str, float]:
    """kind -> CPU seconds of one core for the default `diagnose` of `trial` once it has finished.

    Kinds whose checkpoints the trial does not save are left out (cka and params need epoch 0
    and the final epoch, gradients epoch 1, mine the final epoch).
    """
    layers, width, _, _ = architecture(trial)
    saved = set(trial.checkpoint_epochs)
    final = trial.epochs
    need = {"cka": {0, final}, "mine": {final}, "params": {0, final}, "gradients": {1}, "attention": set()}
    return {
        kind: diagnostics_seconds(kind, layers, width, trial.context_len, batch_size=trial.train.batch_size,
                                  n_epochs_saved=max(1, len(saved)))
        for kind in DIAGNOSTIC_KINDS
        if need[kind] <= saved and (kind != "attention" or saved)
    }  # fmt: skip


def architecture(trial: Trial) -> tuple[int, int, int, int]:
    """(n_layer, n_embd, vocab rows, positions) of the trial's backbone, without downloading.

    Vocabulary rows are 1 for every init: the DT keeps no token table (dtsweep.models.backbones).
    """
    from dtsweep.models.backbones import backbone_depth, backbone_width

    if trial.init in ARCH and not trial.model:
        return ARCH[trial.init]
    layers = backbone_depth(trial.init, trial.model or None)
    width = backbone_width(trial.init, trial.model or None)
    # The DT drops every backbone's token table (vocab rows = 1) and keeps its position table.
    return layers, width, 1, 1024


def device_for(trial: Trial) -> Device:
    """The device a trial is costed on: `GPU` if it asks for any GPU, else `CPU`."""
    return GPU if trial.resources.gpu > 0 else CPU


def estimate(trial: Trial, device: Device | None = None) -> TrialCost:
    """Parameters, hours, GPU-hours (or CPU-hours) and storage of one trial on `device`."""
    dev = device or device_for(trial)
    layers, d, vocab, positions = architecture(trial)
    info = ENVS[trial.env]
    block_params = layers * (12 * d * d + 13 * d)
    dt_params = d * (1 + info.obs_dim + info.act_dim + trial.train.max_ep_len + 2) + (d + 1) * info.act_dim
    params = block_params + (vocab + positions) * d + dt_params

    tokens = trial.train.batch_size * 3 * trial.context_len
    step_s = dev.train_step_overhead_s + 6 * block_params * tokens / dev.train_flops
    train_s = trial.epochs * trial.train.steps_per_epoch * step_s
    n_eps = trial.eval.episodes
    eval_step_s = (
        dev.eval_step_overhead_s + 2 * block_params * n_eps * 3 * trial.context_len / dev.train_flops + n_eps * dev.env_step_s
    )
    eval_s = trial.epochs * trial.eval.max_steps * eval_step_s
    hours = (train_s + eval_s) / 3600
    share = trial.resources.gpu if trial.resources.gpu > 0 else trial.resources.cpu

    checkpoints = CHECKPOINT_BYTES_PER_PARAM[trial.checkpoint_dtype] * params * len(trial.checkpoint_epochs)
    metrics = METRICS_ROW_BYTES * (trial.epochs + 1)
    return TrialCost(
        params=int(params), gpu_hours=hours * share, hours=hours, storage_bytes=int(checkpoints + metrics),
        device=dev.name, checkpoint_bytes=int(checkpoints), resume_bytes=int(RESUME_BYTES_PER_PARAM * params),
        diagnostics_cpu_hours=sum(diagnostics_estimate(trial).values()) / 3600,
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# A whole sweep: what `dtsweep plan` prints
# --------------------------------------------------------------------------------------


def plan_sweep(spec: SweepSpec, *, with_trials: bool = False) -> dict:
    """Trials, device-hours and storage of a sweep (what `dtsweep plan` prints; JSON-able).

    A trial's cost does not depend on its seed, so each grid point is costed once with its
    study's first seed and counts len(seeds) trials: plan stays arithmetic at 100,000 trials.
    A search study counts num_samples trials per group, each costed as the group's trial
    trained to the end (an upper bound when ASHA stops samples early).

    Keys: sweep, sweep_dir, total_trials, studies {name: trials}, hours {study: {"GPU": h,
    "CPU": h}}, gpu_hours, cpu_hours (totals), storage_gb (what the finished sweep keeps),
    checkpoint_storage_gb (of which analysis checkpoints), resume_state_gb_per_trial (the
    largest trial's resume state, held while it runs), resume_state_gb_peak (the largest
    trials' resume states summed over the trials that can run at once, None when that is not
    known: a cluster's size), concurrent_trials, diagnostics_cpu_hours (the default `diagnose` of
    every trial, one CPU core; a GPU runs it many times faster), and with `with_trials` one row
    per grid trial.
    """
    items = []  # (study, trial, cost, trials it stands for, its seeds or None for a search)
    for st in spec.studies:
        n = st.search.num_samples if st.search is not None else 1
        one_seed = dataclasses.replace(st, seed=st.seed[:1])
        items += [(st.name, t, estimate(t), n * len(st.seed), st.seed if st.search is None else None)
                  for t in spec.grid(one_seed)]  # fmt: skip
    studies: Counter = Counter()
    hours: dict[str, dict[str, float]] = {}
    for s, t, c, n, _ in items:
        studies[s] += n
        dev = "GPU" if t.resources.gpu > 0 else "CPU"
        hours.setdefault(s, {"GPU": 0.0, "CPU": 0.0})[dev] += n * c.gpu_hours
    storage = sum(n * c.storage_bytes for _, _, c, n, _ in items)
    diagnostics_hours = sum(n * c.diagnostics_cpu_hours for _, _, c, n, _ in items)
    checkpoints = sum(n * c.checkpoint_bytes for _, _, c, n, _ in items)
    concurrent = concurrent_trials(spec, [t for _, t, _, _, _ in items])
    resume_sizes = sorted((c.resume_bytes for _, _, c, n, _ in items for _ in range(min(n, concurrent or 1))), reverse=True)
    out = {
        "sweep": spec.name,
        "sweep_dir": spec.sweep_dir,
        "total_trials": sum(studies.values()),
        "studies": dict(studies),
        "hours": {s: {d: round(h, 4) for d, h in v.items()} for s, v in hours.items()},
        "gpu_hours": round(sum(v["GPU"] for v in hours.values()), 2),
        "cpu_hours": round(sum(v["CPU"] for v in hours.values()), 2),
        "storage_gb": round(storage / 1e9, 3),
        "checkpoint_storage_gb": round(checkpoints / 1e9, 3),
        "metrics_storage_gb": round((storage - checkpoints) / 1e9, 3),
        "resume_state_gb_per_trial": round(max(resume_sizes, default=0) / 1e9, 3),
        "resume_state_gb_peak": round(sum(resume_sizes[:concurrent]) / 1e9, 3) if concurrent else None,
        "concurrent_trials": concurrent,
        "diagnostics_cpu_hours": round(diagnostics_hours, 2),
    }
    if with_trials:
        rows = []
        for _, t, c, _, seeds in items:
            if seeds is None:
                continue
            base = {"epochs": t.epochs, "steps": t.epochs * t.train.steps_per_epoch, "params": c.params,
                    "device": "GPU" if t.resources.gpu > 0 else "CPU", "hours": round(c.gpu_hours, 4),
                    "gpu_hours": round(c.gpu_hours, 4) if t.resources.gpu > 0 else 0.0, "storage_bytes": c.storage_bytes,
                    "checkpoint_bytes": c.checkpoint_bytes, "resume_bytes": c.resume_bytes}  # fmt: skip
            rows += [{**dataclasses.replace(t, seed=seed).columns(), **base} for seed in seeds]
        out["trials"] = rows
    return out


def concurrent_trials(spec: SweepSpec, trials: list[Trial]) -> int | None:
    """How many trials can run at once: `ray.max_concurrent_trials`, else what a local Ray of
    `ray.num_cpus` CPUs fits of the smallest CPU request; None when neither is set (a cluster)."""
    if spec.ray.max_concurrent_trials:
        return int(spec.ray.max_concurrent_trials)
    if spec.ray.num_cpus and not spec.ray.address and trials:
        return max(1, int(spec.ray.num_cpus // min(t.resources.cpu for t in trials)))
    return None
