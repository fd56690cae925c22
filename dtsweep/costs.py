"""What a sweep will cost: GPU-hours and storage per trial, from a documented cost model.

Time per training step is modelled as a fixed overhead plus the matmul work of the
backbone, `6 × block_params × tokens` FLOPs (forward + backward), at an effective
throughput. The constants below are estimates for one A100/H100-class GPU running fp32
(TF32) training; `benchmarks/` measures the real figures and this table should follow
them (benchmarks/README.md records the machine each figure came from).

Storage counts the analysis checkpoints (fp32 weights, one Parquet file per epoch listed
in checkpoint_epochs), one resume state (weights + AdamW moments) and metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

from dtsweep.envs import ENVS
from dtsweep.spec import Trial

# Effective throughput and per-step overheads (seconds) — estimates, see module docstring.
EFFECTIVE_FLOPS = 50e12  # FLOP/s of a GPU on this workload (≈ 1/3 of TF32 peak of an A100)
STEP_OVERHEAD_S = 0.006  # Python + optimizer + sampler per training step
EVAL_STEP_OVERHEAD_S = 0.004  # one batched forward + vector env step, per env step
ENV_STEP_S = 40e-6  # one MuJoCo env step on a CPU core

# Architecture of each named init: layers, width, vocabulary rows, positions.
ARCH = {
    "random": (12, 768, 1, 1024),
    "random-ref": (12, 768, 1, 1024),
    "gpt2": (12, 768, 50257, 1024),
    "igpt": (24, 512, 513, 1024),
}


@dataclass(frozen=True)
class TrialCost:
    params: int  # parameters of the DT (backbone + embeddings + head)
    gpu_hours: float  # trial wall time × its GPU fraction (CPU-hours when it asks for no GPU)
    hours: float  # estimated wall time of the trial alone on its resources
    storage_bytes: int


def architecture(trial: Trial) -> tuple[int, int, int, int]:
    """(n_layer, n_embd, vocab rows, positions) of the trial's backbone, without downloading."""
    from dtsweep.models.backbones import backbone_depth, backbone_width

    if trial.init in ARCH and not trial.model:
        return ARCH[trial.init]
    layers = backbone_depth(trial.init, trial.model or None)
    width = backbone_width(trial.init, trial.model or None)
    return layers, width, 1 if trial.init in ("random", "random-ref") else 50257, 1024


def estimate(trial: Trial) -> TrialCost:
    layers, d, vocab, positions = architecture(trial)
    info = ENVS[trial.env]
    block_params = layers * (12 * d * d + 13 * d)
    dt_params = d * (1 + info.obs_dim + info.act_dim + trial.train.max_ep_len + 2) + (d + 1) * info.act_dim
    params = block_params + (vocab + positions) * d + dt_params

    tokens = trial.train.batch_size * 3 * trial.context_len
    step_s = STEP_OVERHEAD_S + 6 * block_params * tokens / EFFECTIVE_FLOPS
    train_s = trial.epochs * trial.train.steps_per_epoch * step_s
    n_eps = trial.eval.episodes
    eval_step_s = EVAL_STEP_OVERHEAD_S + 2 * block_params * n_eps * 3 * trial.context_len / EFFECTIVE_FLOPS + n_eps * ENV_STEP_S
    eval_s = trial.epochs * trial.eval.max_steps * eval_step_s
    hours = (train_s + eval_s) / 3600
    share = trial.resources.gpu if trial.resources.gpu > 0 else trial.resources.cpu

    weights = 4 * params
    storage = weights * len(trial.checkpoint_epochs) + 3 * weights + 2000 * (trial.epochs + 1)
    return TrialCost(params=int(params), gpu_hours=hours * share, hours=hours, storage_bytes=int(storage))
