"""Throughput of dtsweep's code paths against reference-style ones, side by side.

    python benchmarks/run.py --quick --out r.json                # < 3 minutes on 2 CPU cores
    python benchmarks/run.py --out r.json --readme benchmarks/README.md

Every benchmark runs dtsweep's path and the reference-style path (benchmarks/reference.py) in
the same process, on the same weights and the same data, in alternating rounds (the order flips
each round, so drift in the machine's load hits both). The reference side runs the weights as the
released code did (`reference.as_released`: eager attention, unfused GELU). Each entry of the
JSON output is

    {"dtsweep": x, "reference": y, "ratio": x / y, "unit": ..., "wall": {...}, "round_ratios": [...]}

where x and y are throughputs per second of this process's CPU time (time.process_time, torch
on one thread: what a core of its own gives) and "wall" repeats them per wall-clock second. On
a shared machine wall time also counts the time other jobs held the core, which makes wall
ratios swing from round to round; CPU time leaves that out.

Before timing, each benchmark checks that both paths compute the same thing (the same
windows, the same episode returns, the same CKA values), so a ratio never compares different
work. Keys: sampler_speedup, eval_speedup, eval_speedup_long_episodes, train_step_speedup,
cka_speedup, mine_speedup (and, without --quick, the first four for a ChibiT-sized DT under
"chibit_size"); "probes" and "cost_table" hold the figures dtsweep/costs.py takes for this
machine; "gpu" the GPT-2-size figures where CUDA is present; "machine" says where it ran.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.reference import (  # noqa: E402
    ReferenceBatcher,
    as_released,
    reference_cka,
    reference_evaluate,
    reference_train_step,
)
from dtsweep.data import load_dataset  # noqa: E402
from dtsweep.diagnostics.mine import estimate_mi, estimate_mi_batched  # noqa: E402
from dtsweep.envs import ENVS  # noqa: E402
from dtsweep.models import build_decision_transformer  # noqa: E402
from dtsweep.spec import DataConfig, EvalConfig, Resources, TrainConfig, Trial  # noqa: E402
from dtsweep.store import Store, write_checkpoint  # noqa: E402
from dtsweep.train import TrialRunner, evaluate_episodes  # noqa: E402
from dtsweep.train.evaluate import make_envs  # noqa: E402
from dtsweep.train.loop import use_fused_gelu  # noqa: E402

# The tests' tiny DT, and a ChibiT-sized one (Reid et al.'s small pretrained model).
TINY = {"n_layer": 2, "n_embd": 32, "n_head": 2}
CHIBIT_SIZE = {"n_layer": 3, "n_embd": 128, "n_head": 1}
ENV = "hopper"


# ---------------------------------------------------------------------------------------------
# Timing


def interleaved(paths: dict[str, Callable[[], int]], rounds: int) -> dict[str, dict]:
    """Call each path `rounds` times, alternating (order flipped every round).

    Each call returns the number of units it did. Returns per path: units, cpu_s, wall_s, and
    the per-round rates (units per CPU second).
    """
    out = {name: {"units": 0, "wall_s": 0.0, "cpu_s": 0.0, "rates": []} for name in paths}
    names = list(paths)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            w0, c0 = time.perf_counter(), time.process_time()
            n = paths[name]()
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            o = out[name]
            o["units"] += n
            o["wall_s"] += wall
            o["cpu_s"] += cpu
            o["rates"].append(n / cpu)
    return out


def entry(timed: dict[str, dict], unit: str, **extra) -> dict:
    """The JSON entry of a dtsweep-vs-reference benchmark from `interleaved`'s output.

    dtsweep / reference / ratio are per CPU second of this process (one thread: what a core of
    its own would give); "wall" repeats them per wall-clock second, which on a shared machine also
    counts the time other jobs held the core.
    """
    d, r = timed["dtsweep"], timed["reference"]
    x, y = d["units"] / d["cpu_s"], r["units"] / r["cpu_s"]
    xw, yw = d["units"] / d["wall_s"], r["units"] / r["wall_s"]
    return {
        "dtsweep": x,
        "reference": y,
        "ratio": x / y,
        "unit": unit.replace("/s", " per CPU s"),
        "wall": {"dtsweep": xw, "reference": yw, "ratio": xw / yw, "unit": unit},
        "round_ratios": [a / b for a, b in zip(d["rates"], r["rates"])],
        "rounds": len(d["rates"]),
        **extra,
    }


# ---------------------------------------------------------------------------------------------
# Set-up shared by the benchmarks


def make_trial(dataset: str, steps: int, model: dict, *, steps_per_epoch: int) -> Trial:
    """A one-epoch trial of the paper's hyperparameters (batch 64, K=20) on `model`."""
    return Trial(
        study="bench",
        init="random",
        env=ENV,
        dataset=dataset,
        context_len=20,
        swap_block=None,
        swap_from=None,
        seed=0,
        model=dict(model),
        train=TrainConfig(epochs=1, steps_per_epoch=steps_per_epoch, warmup_steps=1000),
        eval=EvalConfig(episodes=10, max_steps=1000, action_error_samples=64),
        data=DataConfig(steps=steps, seed=0),
        checkpoint_epochs=(0, 1),
        resources=Resources(),
    )


def reference_batcher(runner: TrialRunner, arrays: dict, seed: int) -> ReferenceBatcher:
    t = runner.trial
    return ReferenceBatcher(
        arrays,
        t.context_len,
        t.train.batch_size,
        state_mean=runner.traj.state_mean,
        state_std=runner.traj.state_std,
        seed=seed,
        rtg_scale=t.train.rtg_scale,
        max_ep_len=t.train.max_ep_len,
    )


def check_same_windows(runner: TrialRunner, batcher: ReferenceBatcher) -> None:
    """Both batchers build the same windows from the same starts (on the unpadded steps)."""
    traj = runner.traj
    starts = np.random.default_rng(1).integers(0, traj.num_steps, size=256)
    ours = runner.sampler.batch(starts)
    episodes = traj.episode_ids[starts]
    theirs = batcher.get_batch(list(zip(episodes.tolist(), (starts - traj.episode_starts[episodes]).tolist())))
    # The reference windows start at the sample and are padded at the end of the episode;
    # dtsweep's are the same steps, shifted right by the same padding (both pad on the left).
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"]), "masks differ"
    valid = ours["attention_mask"].bool()
    for key in ("states", "actions", "returns_to_go", "timesteps"):
        a, b = ours[key][valid].double(), theirs[key][valid].double()
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), f"windows differ in {key}"


# ---------------------------------------------------------------------------------------------
# Benchmarks


def bench_sampler(runner: TrialRunner, batcher: ReferenceBatcher, rounds: int, seconds: float) -> dict:
    # Batches per call sized so each call takes about `seconds` (from one probe call each).
    def sized(fn):
        t0 = time.perf_counter()
        fn()
        n = max(1, int(seconds / max(time.perf_counter() - t0, 1e-6)))

        def run():
            for _ in range(n):
                fn()
            return n

        return run

    timed = interleaved({"dtsweep": sized(runner.sampler.sample), "reference": sized(batcher.get_batch)}, rounds)
    return entry(timed, "batches/s", batch_size=runner.trial.train.batch_size, context_len=runner.trial.context_len)


def bench_eval(
    model, env: str, state_mean, state_std, trial: Trial, rounds: int, max_steps: int, check_steps: int = 1000
) -> dict:
    """10 episodes of `model` in `env`: dtsweep's batched evaluation vs one episode after another.

    Each side keeps its envs across rounds, as a trial (and the released code) does. Both must
    return the same episodes over the first `check_steps` steps: the two paths round differently
    (batch sizes, kernels), and chaotic dynamics amplify that over long episodes.
    """
    kw = dict(
        n_episodes=10,
        seed=0,
        target_return=ENVS[env].target_return,
        state_mean=state_mean,
        state_std=state_std,
        context_len=trial.context_len,
        rtg_scale=trial.train.rtg_scale,
        max_steps=max_steps,
        max_ep_len=trial.train.max_ep_len,
    )
    envs = make_envs(env, kw["n_episodes"])
    ref_model, ref_env = as_released(model), make_envs(env, 1)[0]
    check = {**kw, "max_steps": min(max_steps, check_steps)}
    ours = evaluate_episodes(model, env, envs=envs, **check)
    theirs = reference_evaluate(ref_model, env, gym_env=ref_env, **check)
    if not (np.array_equal(ours.lengths, theirs.lengths) and np.allclose(ours.returns, theirs.returns, rtol=1e-4)):
        raise AssertionError(f"batched and sequential evaluation disagree: {ours} vs {theirs}")

    def dtsweep_path():
        evaluate_episodes(model, env, envs=envs, **kw)
        return kw["n_episodes"]

    def reference_path():
        reference_evaluate(ref_model, env, gym_env=ref_env, **kw)
        return kw["n_episodes"]

    timed = interleaved({"dtsweep": dtsweep_path, "reference": reference_path}, rounds)
    lengths = evaluate_episodes(model, env, envs=envs, **kw).lengths
    return entry(
        timed,
        "episodes/s",
        env=env,
        episodes=kw["n_episodes"],
        episode_lengths=lengths.tolist(),
        max_steps=max_steps,
        checked_equal_steps=check["max_steps"],
    )


def bench_eval_long(model_size: dict, trial: Trial, rounds: int, max_steps: int) -> dict:
    """Evaluation where every episode runs `max_steps` steps with a full context most of the time.

    HalfCheetah never terminates early, so all 10 episodes stay in the batch: the steady state of
    a trained DT's long episodes, which the hopper benchmark (untrained DTs fall within ~20 steps,
    before the context fills) does not reach. A fresh DT of the same size for HalfCheetah's
    dimensions; states standardised with mean 0 / std 1 (the same for both paths).
    """
    info = ENVS["halfcheetah"]
    model = build_decision_transformer(
        "random", state_dim=info.obs_dim, act_dim=info.act_dim, seed=0, context_len=trial.context_len, overrides=model_size
    )
    use_fused_gelu(model)  # as TrialRunner builds it
    zeros, ones = np.zeros(info.obs_dim, np.float32), np.ones(info.obs_dim, np.float32)
    # HalfCheetah amplifies rounding differences into different returns within ~20 steps for
    # the ChibiT-size DT: compare the first 10.
    return bench_eval(model, "halfcheetah", zeros, ones, trial, rounds, max_steps, check_steps=10)


def bench_train(runner: TrialRunner, batcher: ReferenceBatcher, rounds: int, steps: int) -> tuple[dict, torch.nn.Module]:
    """Full training steps: dtsweep's TrialRunner.train_epoch vs reference_train_step.

    Both start from the same weights (the reference trains a copy) and draw from the same data.
    Returns the entry and the reference's initial-weights copy (the checkpoint-0 model).
    """
    tc = runner.trial.train
    initial = copy.deepcopy(runner.model)
    ref_model = as_released(runner.model)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)  # torch defaults
    warmup = max(tc.warmup_steps, 1)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda s: min((s + 1) / warmup, 1.0))
    runner.trial = dataclasses.replace(runner.trial, train=dataclasses.replace(tc, steps_per_epoch=steps))

    def dtsweep_path():
        runner.train_epoch()
        return steps

    def reference_path():
        for _ in range(steps):
            reference_train_step(ref_model, ref_opt, ref_sched, batcher, tc.grad_clip)
        return steps

    dtsweep_path(), reference_path()  # warm-up: first-call allocations, lazy optimizer state
    timed = interleaved({"dtsweep": dtsweep_path, "reference": reference_path}, rounds)
    return entry(timed, "steps/s", batch_size=tc.batch_size, steps_per_round=steps), initial


def _capture(model, batch: dict) -> dict[str, np.ndarray]:
    """Reference-style: every activation's last 3 tokens [n, 3, width], one forward, numpy."""
    got = {}

    def hook(name):
        def fn(_module, _inputs, output):
            got[name] = (output[0] if isinstance(output, tuple) else output)[:, -3:].detach().float().numpy()

        return fn

    handles = [m.register_forward_hook(hook(name)) for name, m in model.activation_modules().items()]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return got


def bench_cka(runner: TrialRunner, initial: torch.nn.Module, rounds: int, n_windows: int, tmp: str) -> dict:
    """CKA of every activation × token between a checkpoint pair (epoch 0 vs trained)."""
    from dtsweep.diagnostics.job import Context, measure_cka
    from dtsweep.models import backbone_config_dict

    store = Store(tmp)
    trial = runner.trial
    info = ENVS[trial.env]
    paths = {}
    for epoch, model in ((0, initial), (trial.epochs, runner.model)):
        meta = {"state_dim": info.obs_dim, "act_dim": info.act_dim, "backbone_config": backbone_config_dict(model)}
        write_checkpoint(store, f"ckpt/epoch={epoch}.parquet", model.state_dict(), meta)
        paths[epoch] = store.uri(f"ckpt/epoch={epoch}.parquet")
    ctx = Context(device=torch.device("cpu"), options={"cka": {"n_windows": n_windows, "chunk": 256}}, max_grad_elements=2**27)

    def dtsweep_path():
        return len(measure_cka(ctx, trial, paths))

    def reference_path():
        batch = ctx.windows(trial, n_windows)
        acts = [_capture(ctx.model(paths[e]), batch) for e in sorted(paths)]
        rows = []
        for layer in acts[0]:
            for t in range(3):
                a, b = acts[0][layer][:, t], acts[1][layer][:, t]
                rows.append((reference_cka(a, b), reference_cka(a, b, debiased=True)))
        return len(rows)

    # Same numbers from both routes (feature-side products vs n×n Gram matrices).
    rows = measure_cka(ctx, trial, paths)
    batch = ctx.windows(trial, n_windows)
    a0, a1 = (_capture(ctx.model(paths[e]), batch) for e in sorted(paths))
    for row in rows[:: max(1, len(rows) // 12)]:
        t = ("return", "state", "action").index(row["token"])
        x, y = a0[row["layer"]][:, t], a1[row["layer"]][:, t]
        assert abs(row["cka"] - reference_cka(x, y)) < 1e-6, row
        assert abs(row["cka_debiased"] - reference_cka(x, y, debiased=True)) < 1e-6, row

    timed = interleaved({"dtsweep": dtsweep_path, "reference": reference_path}, rounds)
    return entry(timed, "(activation, token) pairs/s", n_windows=n_windows, pairs=len(rows), checks_cka_equal=True)


def bench_mine(runner: TrialRunner, rounds: int, critics: int, options: dict) -> dict:
    """MINE: `critics` estimates trained as one stacked network vs one critic after another.

    The pairs are Takagi's I(x_t; T(s_K)) for the last block of the trained model: raw input
    token x_t at the first `critics` token positions vs the block's output at the last state token.
    """
    trial = runner.trial
    n = options["n"]
    rng = np.random.default_rng(0)
    traj = runner.traj
    full = np.flatnonzero(traj.episode_ends - np.arange(traj.num_steps) >= trial.context_len)
    batch = runner.sampler.batch(rng.choice(full, size=n, replace=False))
    out = {}
    block = runner.model.transformer.h[-1]
    handle = block.register_forward_hook(lambda _m, _i, o: out.setdefault("h", o[0] if isinstance(o, tuple) else o))
    runner.model.eval()
    with torch.no_grad():
        runner.model(**batch)
    handle.remove()
    k = trial.context_len
    inputs = []
    for t in range(k):
        inputs += [batch["returns_to_go"][:, t], batch["states"][:, t], batch["actions"][:, t]]
    xs = inputs[:critics]
    ys = [out["h"][:, 3 * k - 2]] * critics
    kw = {key: options[key] for key in ("hidden", "layers", "steps", "batch_size", "lr")}

    def dtsweep_path():
        estimate_mi_batched(xs, ys, seed=0, **kw)
        return critics

    def reference_path():
        for i in range(critics):
            estimate_mi(xs[i], ys[i], seed=i, **kw)
        return critics

    timed = interleaved({"dtsweep": dtsweep_path, "reference": reference_path}, rounds)
    return entry(timed, "estimates/s", critics=critics, **options)


# ---------------------------------------------------------------------------------------------
# GPU: the paper-size model (only where CUDA is present)

GPT2_SIZE = {"n_layer": 12, "n_embd": 768, "n_head": 12}
# Dense peak FLOP/s by GPU name and precision (vendor datasheets, SXM parts).
PEAK_FLOPS = {
    "H100": {"fp32": 67e12, "tf32": 495e12, "bf16": 989e12},
    "H200": {"fp32": 67e12, "tf32": 495e12, "bf16": 989e12},
    "A100": {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12},
}


def bench_gpu(dataset: str, data_steps: int, steps: int, tmp: str, device: torch.device, model: dict = GPT2_SIZE) -> dict:
    """Training steps/s, model FLOP utilisation and memory of the GPT-2-size DT per precision,
    and how many small (ChibiT-size) trials fit in the GPU's memory.

    The precisions are set on the runner directly (`train.precision` is a proposed spec field).
    MFU counts 6 · block_params · tokens + 12 · n_layer · n_embd · 3K · tokens FLOPs per step.
    """
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    out: dict = {"device": name, "model": model, "precisions": {}}
    trial = make_trial(dataset, data_steps, model, steps_per_epoch=steps)
    tokens = trial.train.batch_size * 3 * trial.context_len
    for precision in ("fp32", "tf32", "bf16"):
        if precision == "tf32" and device.type != "cuda":
            continue
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
        runner = TrialRunner(trial, Store(os.path.join(tmp, "gpu")), device=device)
        runner.precision = precision
        runner.train_epoch()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        runner.train_epoch()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rate = steps / (time.perf_counter() - t0)
        cfg = runner.model.transformer.config
        flops = 6 * dt_block_params(runner.model) * tokens + 12 * cfg.n_layer * cfg.n_embd * 3 * trial.context_len * tokens
        out["precisions"][precision] = {
            "steps_per_s": rate,
            "mfu": rate * flops / peak[precision] if peak else None,
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        }
        del runner
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if device.type == "cuda":
        small = make_trial(dataset, data_steps, CHIBIT_SIZE, steps_per_epoch=steps)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        runner = TrialRunner(small, Store(os.path.join(tmp, "gpu")), device=device)
        runner.train_epoch()
        runner.evaluate()
        torch.cuda.synchronize(device)
        per_trial = torch.cuda.max_memory_allocated(device) - base
        total = torch.cuda.get_device_properties(device).total_memory
        out["small_trial"] = {
            "model": CHIBIT_SIZE,
            "peak_memory_gb": per_trial / 1e9,
            # Memory only: each trial also needs its share of compute and a CUDA context (~0.5 GB).
            "fit_by_memory": int(0.9 * total // (per_trial + 0.5e9)),
        }
    return out


# ---------------------------------------------------------------------------------------------
# Machine, cost table, README


def machine() -> dict:
    cpu, flags = platform.processor() or "", set()
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
        flags = set(next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), []))
    except OSError:
        pass
    # A VM's model name can be generic; the vector units say which generation it is.
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    cpu = f"{cpu} ({', '.join(isa)})" if isa else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "loadavg_start": os.getloadavg(),
    }


def dt_block_params(model) -> int:
    """Parameters of the transformer blocks (what costs.py's FLOP model counts)."""
    return sum(p.numel() for name, p in model.named_parameters() if name.startswith("transformer.h."))


def cpu_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median CPU time of one call of fn over `repeats` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        c0 = time.process_time()
        fn()
        times.append(time.process_time() - c0)
    return float(np.median(times))


def cost_probes(runner: TrialRunner, repeats: int) -> dict:
    """What costs.py models, measured directly: one MuJoCo step, one batched eval forward."""
    import gymnasium as gym

    env = gym.make(ENVS[runner.trial.env].gym_id)
    env.reset(seed=0)
    rng = np.random.default_rng(0)

    def env_steps():
        for _ in range(100):
            _, _, terminated, truncated, _ = env.step(rng.uniform(-1, 1, env.action_space.shape))
            if terminated or truncated:
                env.reset()

    batch = runner.sampler.fixed_batch(10, seed=0)  # 10 episodes' full K-step windows
    model = runner.model.eval()
    with torch.inference_mode():
        forward = cpu_seconds(lambda: model(**batch), repeats)
    model.train()
    return {"env_step_s": cpu_seconds(env_steps, repeats) / 100, "eval_forward_10_s": forward}


def cost_table(results: dict) -> dict:
    """The figures dtsweep/costs.py's `CPU` device takes, from the dtsweep side of the runs.

    Training: seconds per step = overhead + 6 · block_params · tokens / flops, through the tiny
    and the ChibiT-sized DT's CPU time per step (two points, two unknowns). Evaluation: the
    overhead of one batched forward of 10 full windows beyond its FLOP share; env step measured.
    """
    sizes = [r for r in (results, results.get("chibit_size")) if r]
    table = {"source": "benchmarks/run.py, dtsweep path, CPU time", "env_step_s": results["probes"]["env_step_s"]}
    if len(sizes) < 2:
        table["note"] = "train_flops needs both model sizes (run without --quick)"
        return table
    (f0, s0), (f1, s1) = [(6 * r["block_params"] * r["tokens"], 1 / r["train_step_speedup"]["dtsweep"]) for r in sizes]
    flops = (f1 - f0) / (s1 - s0)
    table["train_flops"] = flops
    table["train_step_overhead_s"] = s0 - f0 / flops
    forward_flops = 2 * results["block_params"] * 10 * 3 * results["context_len"]  # 10 windows of 3K tokens
    table["eval_step_overhead_s"] = results["probes"]["eval_forward_10_s"] - forward_flops / flops
    return table


def readme_table(results: dict) -> str:
    m = results["machine"]
    rows = [
        ("sampler_speedup", "window sampler vs per-sample loop + discount_cumsum"),
        ("eval_speedup", "batched evaluation vs one episode at a time (10 hopper episodes)"),
        ("eval_speedup_long_episodes", "the same, 10 HalfCheetah episodes that all run the full length"),
        ("train_step_speedup", "full training step (sample, forward, backward, AdamW)"),
        ("cka_speedup", "CKA, every activation × token of a checkpoint pair"),
        ("mine_speedup", "MINE, stacked critics vs one critic at a time"),
    ]
    lines = [
        f"Latest figures: `{results['command']}` on {results['date']}, machine: {m['cpu']}, "
        f"{m['cores']} cores, {m['torch_threads']} torch thread(s), GPU: {m['gpu'] or 'none'}, "
        f"torch {m['torch']}, load average {m['loadavg_start'][0]:.1f} at start / "
        f"{m['loadavg_end'][0]:.1f} at end. Dataset {results['dataset']} "
        f"({results['data']['episodes']} episodes, mean length {results['data']['mean_episode_length']:.0f}), "
        f"tiny DT {json.dumps(TINY)}, ChibiT-size DT {json.dumps(CHIBIT_SIZE)}; batch 64, K = 20. "
        f"Evaluation episodes of the untrained DT lasted {results['eval_speedup']['episode_lengths']} steps.",
        "",
        "Throughputs are per CPU second of the benchmark process (one torch thread); the wall-clock",
        "ratio, which also counts the time other jobs held the core, is beside it.",
        "",
        "| benchmark | what | unit | dtsweep | reference | ratio | ratio (wall clock) | goal |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    goals = {"sampler_speedup": 10, "eval_speedup": 5, "train_step_speedup": 1.2}
    for prefix, res in (("", results), ("ChibiT-size ", results.get("chibit_size") or {})):
        for key, what in rows:
            e = res.get(key)
            if not e:
                continue
            goal = f"≥ {goals[key]}" if key in goals and not prefix else ""
            lines.append(
                f"| {prefix}{key} | {what} | {e['unit']} | {e['dtsweep']:.3g} | {e['reference']:.3g} "
                f"| **{e['ratio']:.2f}** | {e['wall']['ratio']:.2f} | {goal} |"
            )
    return "\n".join(lines)


def write_readme(path: Path, results: dict) -> None:
    text = path.read_text()
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    if start not in text or end not in text:
        raise ValueError(f"{path} has no {start} ... {end} section")
    new = f"{start}\n{readme_table(results)}\n{end}"
    path.write_text(re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: new, text, flags=re.S))


# ---------------------------------------------------------------------------------------------


def run_suite(model_size: dict, dataset: str, data_steps: int, quick: bool, tmp: str, with_diagnostics: bool) -> dict:
    arrays = load_dataset(dataset, steps=data_steps, seed=0)
    train_steps = 10 if quick else 15
    trial = make_trial(dataset, data_steps, model_size, steps_per_epoch=train_steps)
    runner = TrialRunner(trial, Store(os.path.join(tmp, "runs")), device=torch.device("cpu"))
    batcher = reference_batcher(runner, arrays, seed=1)
    check_same_windows(runner, batcher)
    res = {
        "model": dict(model_size),
        "block_params": dt_block_params(runner.model),
        "tokens": trial.train.batch_size * 3 * trial.context_len,
        "context_len": trial.context_len,
        # The reference sampler's cost grows with episode length (it re-sums the episode's rest).
        "data": {"episodes": runner.traj.num_episodes, "mean_episode_length": float(runner.traj.episode_lengths.mean())},
    }
    rounds = 3 if quick else 5

    print(f"[{json.dumps(model_size)}] sampler", flush=True)
    res["sampler_speedup"] = bench_sampler(runner, batcher, 6 if quick else 10, seconds=0.25 if quick else 1.0)
    print(f"[{json.dumps(model_size)}] eval", flush=True)
    eval_model = copy.deepcopy(runner.model)  # the epoch-0 model, before any training
    traj = runner.traj
    res["eval_speedup"] = bench_eval(eval_model, ENV, traj.state_mean, traj.state_std, trial, 6 if quick else 10, 1000)
    res["eval_speedup_long_episodes"] = bench_eval_long(model_size, trial, 2 if quick else 4, 60 if quick else 200)
    res["probes"] = cost_probes(runner, repeats=5 if quick else 20)
    print(f"[{json.dumps(model_size)}] train step", flush=True)
    res["train_step_speedup"], initial = bench_train(runner, batcher, 4 if quick else rounds, train_steps)
    if with_diagnostics:
        print(f"[{json.dumps(model_size)}] cka", flush=True)
        res["cka_speedup"] = bench_cka(runner, initial, rounds, n_windows=256 if quick else 1024, tmp=tmp)
        print(f"[{json.dumps(model_size)}] mine", flush=True)
        mine = {"n": 1024, "hidden": 64, "layers": 3, "steps": 100 if quick else 200, "batch_size": 256, "lr": 1e-3}
        res["mine_speedup"] = bench_mine(runner, 2 if quick else 3, critics=8 if quick else 16, options=mine)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds and smaller sizes (< 3 minutes on 2 cores)")
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--dataset", default="hopper-medium", help="dataset name (generated offline if missing)")
    p.add_argument("--data-steps", type=int, default=50_000, help="steps of a generated dataset")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 on a shared machine)")
    p.add_argument("--readme", help="rewrite the results section of this Markdown file")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    results = {
        "command": "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "dataset": args.dataset,
        "quick": args.quick,
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results.update(run_suite(TINY, args.dataset, args.data_steps, args.quick, tmp, with_diagnostics=True))
        if not args.quick:
            results["chibit_size"] = run_suite(CHIBIT_SIZE, args.dataset, args.data_steps, False, tmp, False)
        if torch.cuda.is_available():
            print("[gpu] GPT-2-size DT", flush=True)
            results["gpu"] = bench_gpu(args.dataset, args.data_steps, 10 if args.quick else 50, tmp, torch.device("cuda"))
        else:
            results["gpu"] = {"note": "no CUDA device: GPU figures not measured"}
    results["cost_table"] = cost_table(results)
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["seconds"] = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps(results, indent=1))
    if args.readme:
        write_readme(Path(args.readme), results)
    for key in (
        "sampler_speedup",
        "eval_speedup",
        "eval_speedup_long_episodes",
        "train_step_speedup",
        "cka_speedup",
        "mine_speedup",
    ):
        e = results[key]
        print(f"{key:<28} {e['ratio']:7.2f} (wall clock {e['wall']['ratio']:.2f})  "
              f"dtsweep {e['dtsweep']:.3g} vs reference {e['reference']:.3g} {e['unit']}")  # fmt: skip
    print(f"{results['seconds']:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
