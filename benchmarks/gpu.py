"""dtsweep on one GPU: the GPT-2-size DT's training, evaluation and packing throughput.

    python benchmarks/gpu.py --out benchmarks/results/gpu-<name>.json --update-readme   # ~4-8 min on one GPU
    python benchmarks/gpu.py --smoke --out g.json                                      # CPU, tiny sizes, < 1 min

What it measures, with dtsweep's own code (`TrialRunner`, `evaluate_episodes`), so the figures
are dtsweep's:

- "train": training steps/s of a GPT-2-size DT (12 layers, 768 wide, 12 heads: the `random`
  init, GPT-2's shape and FLOPs) at batch 64 × K = 20 (60 tokens per window) for fp32, tf32,
  bf16 autocast and bf16 autocast + torch.compile, each through `TrainConfig(precision=...,
  compile=...)`; model FLOP utilisation (MFU) and peak memory (`torch.cuda.max_memory_allocated`
  from the first step on: weights, AdamW moments, activations).
  FLOPs per step = tokens · (6 · N + 12 · n_layer · n_embd · T), tokens = batch · T, T = 3K:
  6 · N for the forward and backward matmuls of the N transformer-block parameters, and the
  attention scores and weighted values (PaLM's appendix B; causal masking not discounted). The
  DT's embeddings and action head (< 0.1 % of the FLOPs) are not counted. MFU = steps/s ·
  FLOPs per step / the GPU's dense datasheet peak for that precision (PEAK_TFLOPS, or
  --peak-tflops); compile's MFU is counted against the bf16 peak.
- "eval": episodes/s of dtsweep's batched evaluation (100 HalfCheetah episodes side by side,
  one batched forward per env step) against the reference protocol (one episode after another,
  a full forward of one window per step: `benchmarks/reference.py`'s `reference_evaluate` on the
  same weights run as released). HalfCheetah never ends an episode early, so every episode runs
  the capped length (--eval-steps; the protocol's 1000 would take minutes per side); the
  reference side runs fewer episodes (--ref-episodes): one after another, its episodes/s does
  not depend on how many. fp32, the DT untrained (the work per step does not depend on weights).
- "packing": two trials on one GPU (two processes, as Ray runs two `gpu: 0.5` trials) against
  one alone: each process builds its own TrialRunner, warms up, waits for the other, then
  trains --steps steps; aggregate steps/s = all steps / the span from the first start to the
  last end.

`--smoke` runs the same code paths on the CPU with a tiny DT and a few steps, for tests: what a
CPU cannot do (tf32, CUDA memory figures, MFU without a stated peak) is listed under "skipped"
with the reason, never silently left out. With `--update-readme` the GPU table between the
`<!-- gpu-table -->` markers of benchmarks/README.md is rewritten from the JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from queue import Empty

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.reference import as_released, reference_evaluate  # noqa: E402
from dtsweep.envs import ENVS  # noqa: E402
from dtsweep.models import build_decision_transformer  # noqa: E402
from dtsweep.spec import DataConfig, EvalConfig, Resources, TrainConfig, Trial  # noqa: E402
from dtsweep.store import Store  # noqa: E402
from dtsweep.train import TrialRunner, evaluate_episodes  # noqa: E402
from dtsweep.train.evaluate import make_envs  # noqa: E402
from dtsweep.train.loop import use_fused_gelu  # noqa: E402

GPT2_SIZE = {"n_layer": 12, "n_embd": 768, "n_head": 12}
TINY = {"n_layer": 2, "n_embd": 32, "n_head": 2}
ENV = "halfcheetah"
DATASET = "halfcheetah-random"  # generated offline from a uniform policy in seconds
README = ROOT / "benchmarks" / "README.md"
MARK_START, MARK_END = "<!-- gpu-table -->", "<!-- gpu-table:end -->"

# Dense (no sparsity) datasheet peaks in TFLOP/s, by a substring of torch.cuda.get_device_name;
# the first match wins, so the more specific names come first. fp32 is the CUDA-core peak.
PEAK_TFLOPS = {
    "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0},
    "H100": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4},  # SXM
    "H200": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4},  # SXM
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
    "L4": {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0},
    "A10G": {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0},  # NVIDIA's A10 sheet; AWS's A10G clocks lower
    "A10": {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0},
}

# (name, precision, compile): what "train" measures, in this order.
TRAIN_VARIANTS = [
    ("fp32", "fp32", False),
    ("tf32", "tf32", False),
    ("bf16", "bf16", False),
    ("bf16+compile", "bf16", True),
]


def make_trial(
    model: dict, *, steps: int, batch: int, context_len: int, precision: str, compile_: bool, data_steps: int
) -> Trial:
    """A one-epoch trial of the paper's hyperparameters on `model`, `steps` steps per epoch."""
    return Trial(
        study="gpu-bench",
        init="random",
        env=ENV,
        dataset=DATASET,
        context_len=context_len,
        swap_block=None,
        swap_from=None,
        seed=0,
        model=dict(model),
        train=TrainConfig(
            epochs=1, steps_per_epoch=steps, batch_size=batch, warmup_steps=1000, precision=precision, compile=compile_
        ),
        eval=EvalConfig(episodes=1, max_steps=1, action_error_samples=8),
        data=DataConfig(steps=data_steps, seed=0),
        checkpoint_epochs=(),
        resources=Resources(cpu=2, gpu=0.5),
    )


def block_params(model: torch.nn.Module) -> int:
    """N: parameters of the transformer blocks (the matmul weights the FLOP formula counts)."""
    return sum(p.numel() for name, p in model.named_parameters() if name.startswith("transformer.h."))


def flops_per_step(n_block: int, n_layer: int, n_embd: int, batch: int, context_len: int) -> float:
    """Training FLOPs of one step (forward + backward): tokens · (6 N + 12 n_layer n_embd T)."""
    t = 3 * context_len
    return batch * t * (6 * n_block + 12 * n_layer * n_embd * t)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_for(name: str, override: float | None) -> tuple[dict | None, str]:
    """Peak TFLOP/s per precision for the device `name`, and where the figures come from."""
    if override is not None:
        return {p: override for p in ("fp32", "tf32", "bf16")}, f"--peak-tflops {override} (stated, every precision)"
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks, f"NVIDIA datasheet, dense, matched {key!r}"
    return None, f"no datasheet peak known for {name!r} (give --peak-tflops)"


# ---------------------------------------------------------------------------------------------
# Training


def bench_train(args, device: torch.device, tmp: str, skipped: dict) -> dict:
    """Steps/s, MFU and peak memory per TRAIN_VARIANTS entry, through TrialRunner.train_epoch."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peaks, _ = peak_for(name, args.peak_tflops)
    out = {}
    for label, precision, compile_ in TRAIN_VARIANTS:
        if precision == "tf32" and device.type != "cuda":
            skipped[f"train.{label}"] = "TF32 is a CUDA tensor-core mode; not measurable on CPU"
            continue
        if compile_ and args.smoke:
            # Inductor compiles one C++ kernel after another on a CPU: minutes on 2 cores.
            skipped[f"train.{label}"] = "smoke: CPU compilation takes minutes; tests/test_precision.py trains compiled"
            continue
        trial = make_trial(
            args.model, steps=args.steps, batch=args.batch, context_len=args.context_len,
            precision=precision, compile_=compile_, data_steps=args.data_steps,
        )  # fmt: skip
        runner = TrialRunner(trial, Store(os.path.join(tmp, "train")), device=device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        runner.train_epoch()  # warm-up epoch: CUDA kernels, AdamW state, compilation
        sync(device)
        warmup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        loss = runner.train_epoch()
        sync(device)
        elapsed = time.perf_counter() - t0
        cfg = runner.model.transformer.config
        flops = flops_per_step(block_params(runner.model), cfg.n_layer, cfg.n_embd, args.batch, args.context_len)
        rate = args.steps / elapsed
        peak_key = "bf16" if compile_ else precision
        entry = {
            "precision": precision,
            "compile": compile_,
            "steps_per_s": rate,
            "steps_timed": args.steps,
            "warmup_steps": args.steps,
            "warmup_s": warmup_s,
            "train_loss": loss,
            "model_tflops_per_s": rate * flops / 1e12,
            "mfu": rate * flops / (peaks[peak_key] * 1e12) if peaks else None,
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        }
        if entry["mfu"] is None:
            skipped[f"train.{label}.mfu"] = peak_for(name, args.peak_tflops)[1]
        if entry["peak_memory_gb"] is None:
            skipped[f"train.{label}.peak_memory_gb"] = "torch.cuda.max_memory_allocated needs CUDA"
        out[label] = entry
        print(f"[train] {label}: {rate:.3g} steps/s, MFU {entry['mfu']}, peak {entry['peak_memory_gb']} GB", flush=True)
        del runner
        if compile_:
            torch.compiler.reset()
    return out


# ---------------------------------------------------------------------------------------------
# Evaluation


def bench_eval(args, device: torch.device) -> dict:
    """Episodes/s: dtsweep's batched `evaluate_episodes` vs one episode at a time (reference)."""
    info = ENVS[ENV]
    model = build_decision_transformer(
        "random", state_dim=info.obs_dim, act_dim=info.act_dim, seed=0, context_len=args.context_len,
        overrides=args.model,
    )  # fmt: skip
    use_fused_gelu(model)  # as TrialRunner builds it
    model.to(device)
    ref_model = as_released(model).to(device)
    zeros, ones = np.zeros(info.obs_dim, np.float32), np.ones(info.obs_dim, np.float32)
    kw = dict(
        seed=0, target_return=info.target_return, state_mean=zeros, state_std=ones,
        context_len=args.context_len, max_steps=args.eval_steps, device=device,
    )  # fmt: skip
    envs = make_envs(ENV, args.eval_episodes)
    ref_env = make_envs(ENV, 1)[0]
    # Warm-up (CUDA kernels for every window length) on a few steps of each path.
    evaluate_episodes(model, ENV, n_episodes=args.eval_episodes, envs=envs, **{**kw, "max_steps": args.context_len + 1})
    reference_evaluate(ref_model, ENV, n_episodes=1, gym_env=ref_env, **{**kw, "max_steps": args.context_len + 1})
    sync(device)

    t0 = time.perf_counter()
    ours = evaluate_episodes(model, ENV, n_episodes=args.eval_episodes, envs=envs, **kw)
    sync(device)
    ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = reference_evaluate(ref_model, ENV, n_episodes=args.ref_episodes, gym_env=ref_env, **kw)
    sync(device)
    theirs_s = time.perf_counter() - t0
    if not (ours.lengths == args.eval_steps).all() or not (theirs.lengths == args.eval_steps).all():
        raise AssertionError(f"HalfCheetah episodes ended before the cap: {ours.lengths}, {theirs.lengths}")
    x, y = args.eval_episodes / ours_s, args.ref_episodes / theirs_s
    print(f"[eval] batched {x:.3g} episodes/s, one at a time {y:.3g} episodes/s", flush=True)
    return {
        "env": ENV,
        "episode_steps": args.eval_steps,
        "precision": "fp32",
        "dtsweep": {"episodes": args.eval_episodes, "seconds": ours_s, "episodes_per_s": x},
        "reference": {"episodes": args.ref_episodes, "seconds": theirs_s, "episodes_per_s": y},
        "ratio": x / y,
    }


# ---------------------------------------------------------------------------------------------
# Packing: two trials on one GPU


def _pack_worker(args_dict: dict, device: str, barrier, queue) -> None:
    """One trial in its own process: warm up, wait for the others, train, report its times."""
    torch.set_num_threads(1 if device == "cpu" else 2)  # the trial's `cpu: 2`, 1 on a 2-core CPU
    trial = make_trial(
        args_dict["model"], steps=args_dict["steps"], batch=args_dict["batch"], context_len=args_dict["context_len"],
        precision=args_dict["pack_precision"], compile_=False, data_steps=args_dict["data_steps"],
    )  # fmt: skip
    dev = torch.device(device)
    runner = TrialRunner(trial, Store(args_dict["store"]), device=dev)
    runner.train_epoch()  # warm-up epoch
    sync(dev)
    barrier.wait()
    start = time.time()
    runner.train_epoch()
    sync(dev)
    queue.put({"start": start, "end": time.time(), "steps": args_dict["steps"]})


def _run_pack(args, device: torch.device, n: int, tmp: str) -> dict:
    ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    a = {**vars(args), "store": os.path.join(tmp, f"pack{n}")}
    procs = [ctx.Process(target=_pack_worker, args=(a, device.type, barrier, queue)) for _ in range(n)]
    for p in procs:
        p.start()
    times = []
    try:
        for _ in range(n):
            times.append(queue.get(timeout=args.pack_timeout))
    except Empty:
        pass  # a worker died or hung: reported below with the exit codes
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    if len(times) < n or any(p.exitcode != 0 for p in procs):
        raise RuntimeError(
            f"packing: {len(times)} of {n} workers reported within {args.pack_timeout} s; "
            f"exit codes {[p.exitcode for p in procs]}"
        )
    span = max(t["end"] for t in times) - min(t["start"] for t in times)
    return {
        "per_trial_steps_per_s": [t["steps"] / (t["end"] - t["start"]) for t in times],
        "aggregate_steps_per_s": sum(t["steps"] for t in times) / span,
    }


def bench_packing(args, device: torch.device, tmp: str) -> dict:
    alone = _run_pack(args, device, 1, tmp)
    two = _run_pack(args, device, 2, tmp)
    gain = two["aggregate_steps_per_s"] / alone["aggregate_steps_per_s"]
    print(f"[packing] alone {alone['aggregate_steps_per_s']:.3g}, two {two['aggregate_steps_per_s']:.3g} steps/s")
    return {"precision": args.pack_precision, "alone": alone, "two_on_one_device": two, "aggregate_gain": gain}


# ---------------------------------------------------------------------------------------------
# GPU-hours per trial: a model, until gpu.py's measurements replace its assumptions

# Every figure below is an ASSUMPTION (a) or a CPU MEASUREMENT (m: benchmarks/results/cpu-2core.json);
# the peaks are PEAK_TFLOPS's datasheet figures.
MODEL_BF16_MFU = {  # (a) share of the bf16 tensor-core peak under bf16 autocast
    "A10G": 0.25,
    "L4": 0.25,
    "A100": 0.25,
    "H100": 0.15,  # faster tensor cores: elementwise ops and launches take a larger share
}
# (a) fp32 GEMMs of 3840 × 768 × 3072 reach most of the CUDA-core peak; LayerNorm, softmax,
# dropout and AdamW do not.
MFU_FP32 = 0.45
LAUNCH_TRAIN_S = 6e-3  # (a) host time to launch an eager GPT-2 forward + backward + AdamW step (~600 kernels)
LAUNCH_FWD_S = 2e-3  # (a) host time to launch one eager GPT-2 forward (~200 kernels)
SAMPLER_S = 0.09e-3  # (m) dtsweep's WindowSampler batch (1.1e4 batches per CPU s)
REF_BATCH_S = 2.3e-3  # (m) the reference's per-sample get_batch (438 batches per CPU s, ~100-step episodes)
REF_SYNC_S = 0.1e-3  # (a) the reference's two .item() host syncs per step
ENV_STEP_S_M = 86e-6  # (m) one MuJoCo step with Gymnasium's wrappers
REF_EVAL_BOOKKEEPING_S = 0.3e-3  # (a) the reference's torch.cat history updates and .cpu() per env step
BATCH_EVAL_HOST_S = 0.5e-3  # (a) dtsweep's numpy window gathering and host-device copies per env step


def cost_model(epochs: int = 40, steps: int = 2500, episodes: int = 100, episode_steps: int = 1000, targets: int = 1) -> dict:
    """Modelled wall-clock hours of one GPT-2-size trial alone on one GPU (= its GPU-hours),
    under dtsweep (fp32 and bf16 autocast) and under the reference protocol (fp32, as released).

    Training step: compute c = FLOPs / (MFU · peak). dtsweep never waits for the GPU within an
    epoch, so the host's launches and sampling overlap the compute: max(c, launch + sampler).
    The reference syncs twice a step, so its per-sample batch assembly adds to it:
    max(c, launch) + get_batch + syncs. Evaluation, per epoch and target, `episodes` episodes of
    `episode_steps` steps (the protocol's upper bound: a HalfCheetah episode always runs 1000):
    dtsweep, per env step, one forward of all episodes, max(compute, launch), then the episodes'
    MuJoCo steps one after another and the window gathering; the reference, per episode step, one
    forward of one window, max(compute, launch), plus its history bookkeeping and one MuJoCo step.
    The same MFU is granted to both protocols' forwards (generous to the reference's 60-token ones).
    """
    d, n_layer, t = 768, 12, 60
    n = n_layer * (12 * d * d + 13 * d)
    f_train = flops_per_step(n, n_layer, d, 64, 20)
    f_window = t * (2 * n + 4 * n_layer * d * t)  # one window's forward
    train_steps, eval_steps = epochs * steps, epochs * targets * episode_steps
    rows = {}
    for gpu, bf16_mfu in MODEL_BF16_MFU.items():
        peak = PEAK_TFLOPS[gpu]
        row = {}
        for label, flops_s in (("fp32", MFU_FP32 * peak["fp32"] * 1e12), ("bf16", bf16_mfu * peak["bf16"] * 1e12)):
            c = f_train / flops_s
            fwd1 = f_window / flops_s
            ours_train = train_steps * max(c, LAUNCH_TRAIN_S + SAMPLER_S)
            ours_eval = eval_steps * (max(episodes * fwd1, LAUNCH_FWD_S) + episodes * ENV_STEP_S_M + BATCH_EVAL_HOST_S)
            row[f"dtsweep_{label}"] = {"train_h": ours_train / 3600, "eval_h": ours_eval / 3600,
                                       "total_h": (ours_train + ours_eval) / 3600}  # fmt: skip
            if label == "fp32":
                ref_train = train_steps * (max(c, LAUNCH_TRAIN_S) + REF_BATCH_S + REF_SYNC_S)
                ref_eval = eval_steps * episodes * (max(fwd1, LAUNCH_FWD_S) + REF_EVAL_BOOKKEEPING_S + ENV_STEP_S_M)
                row["reference_fp32"] = {"train_h": ref_train / 3600, "eval_h": ref_eval / 3600,
                                         "total_h": (ref_train + ref_eval) / 3600}  # fmt: skip
        row["ratio_fp32"] = row["reference_fp32"]["total_h"] / row["dtsweep_fp32"]["total_h"]
        row["ratio_bf16"] = row["reference_fp32"]["total_h"] / row["dtsweep_bf16"]["total_h"]
        rows[gpu] = row
    return {"flops_per_train_step": f_train, "flops_per_window_forward": f_window, "block_params": n,
            "train_steps": train_steps, "eval_env_steps_per_episode_total": eval_steps, "gpus": rows}  # fmt: skip


def cost_model_table(model: dict) -> str:
    """Markdown of `cost_model()`: hours per trial (training + evaluation), every cell modelled."""
    lines = [
        "| GPU (modelled) | reference protocol, fp32 | dtsweep fp32 | dtsweep bf16 | ratio fp32 "
        "| ratio ref fp32 / dtsweep bf16 |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def cell(e):
        return f"{e['total_h']:.2f} ({e['train_h']:.2f} + {e['eval_h']:.2f})"

    for gpu, r in model["gpus"].items():
        lines.append(
            f"| {gpu} | {cell(r['reference_fp32'])} | {cell(r['dtsweep_fp32'])} | {cell(r['dtsweep_bf16'])} | "
            f"{r['ratio_fp32']:.2f} | {r['ratio_bf16']:.1f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# README table


def _fmt(x, spec: str = ".3g") -> str:
    return "not measured" if x is None else format(x, spec)


def readme_table(res: dict) -> str:
    """The Markdown GPU table of one run's JSON."""
    m, tr = res["meta"], res["train"]
    lines = [
        f"Measured: `{m['command']}` on {m['date']}, {m['device']} (compute capability {m['capability']}), "
        f"torch {m['torch']}, CUDA {m['cuda']}. GPT-2-size DT {json.dumps(m['model'])}, batch {m['batch']} × K = "
        f"{m['context_len']}; {m['flops_per_step'] / 1e12:.3g} TFLOP per training step; peaks: {m['peak_source']}.",
        "",
        "| training | steps/s | model TFLOP/s | MFU | peak memory (GB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, *_ in TRAIN_VARIANTS:
        e = tr.get(label, {})
        mfu = None if e.get("mfu") is None else 100 * e["mfu"]
        lines.append(
            f"| {label} | {_fmt(e.get('steps_per_s'))} | {_fmt(e.get('model_tflops_per_s'))} | "
            f"{_fmt(mfu, '.1f')}{' %' if mfu is not None else ''} | {_fmt(e.get('peak_memory_gb'), '.2f')} |"
        )
    ev, pk = res["eval"], res["packing"]
    lines += [
        "",
        "| evaluation and packing | dtsweep | reference / alone | ratio |",
        "|---|---:|---:|---:|",
        f"| episodes/s, {ev['dtsweep']['episodes']} {ev['env']} episodes capped at {ev['episode_steps']} steps, "
        f"batched vs one at a time ({ev['reference']['episodes']} episodes) | {_fmt(ev['dtsweep']['episodes_per_s'])} | "
        f"{_fmt(ev['reference']['episodes_per_s'])} | **{_fmt(ev['ratio'])}** |",
        f"| training steps/s ({pk['precision']}), two trials on one GPU vs one alone (aggregate) | "
        f"{_fmt(pk['two_on_one_device']['aggregate_steps_per_s'])} | {_fmt(pk['alone']['aggregate_steps_per_s'])} | "
        f"**{_fmt(pk['aggregate_gain'])}** |",
    ]
    return "\n".join(lines)


def update_readme(res: dict, path: Path = README) -> None:
    text = path.read_text()
    pattern = re.compile(re.escape(MARK_START) + r".*?" + re.escape(MARK_END), re.S)
    if not pattern.search(text):
        raise ValueError(f"{path} has no {MARK_START} ... {MARK_END} section")
    path.write_text(pattern.sub(lambda _: f"{MARK_START}\n{readme_table(res)}\n{MARK_END}", text))


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny DT, a few steps: the code paths, for tests")
    p.add_argument("--out", type=Path, help="JSON output (required unless --cost-model)")
    p.add_argument("--cost-model", action="store_true", help="print the modelled GPU-hours table and exit")
    p.add_argument("--update-readme", action="store_true", help=f"rewrite the table between {MARK_START} markers")
    p.add_argument("--peak-tflops", type=float, help="peak TFLOP/s for MFU when the device has no datasheet entry")
    # Defaults: GPU run / --smoke (given values win in both).
    p.add_argument("--steps", type=int, help="timed training steps per variant, after an untimed epoch of as many (100 / 3)")
    p.add_argument("--eval-episodes", type=int, help="episodes of the batched evaluation (100 / 4)")
    p.add_argument("--ref-episodes", type=int, help="episodes of the one-at-a-time reference (5 / 2)")
    p.add_argument("--eval-steps", type=int, help="episode length cap; the protocol's is 1000 (200 / 8)")
    p.add_argument("--pack-precision", default="fp32", choices=("fp32", "tf32", "bf16"))
    p.add_argument("--pack-timeout", type=float, default=300.0, help="seconds to wait for a packing worker")
    p.add_argument("--data-steps", type=int, help="env steps of the generated dataset (20000 / 3000)")
    args = p.parse_args(argv)
    if args.out is None and not args.cost_model:
        p.error("--out is required")
    if args.smoke and args.update_readme:
        p.error("--update-readme takes GPU figures only, not --smoke ones")
    if args.smoke:
        args.model, args.batch, args.context_len = dict(TINY), 8, 5
        defaults = {"steps": 3, "eval_episodes": 4, "ref_episodes": 2, "eval_steps": 8, "data_steps": 3000}
    else:
        args.model, args.batch, args.context_len = dict(GPT2_SIZE), 64, 20
        defaults = {"steps": 100, "eval_episodes": 100, "ref_episodes": 5, "eval_steps": 200, "data_steps": 20_000}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cost_model:
        print(cost_model_table(cost_model()))
        return 0
    if args.smoke:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("no CUDA device: run with --smoke for the CPU code paths", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    skipped: dict[str, str] = {}
    cfg_model = build_decision_transformer(
        "random", state_dim=ENVS[ENV].obs_dim, act_dim=ENVS[ENV].act_dim, seed=0, context_len=args.context_len,
        overrides=args.model,
    )  # fmt: skip
    n_block = block_params(cfg_model)
    del cfg_model
    meta = {
        "command": "python benchmarks/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "smoke": args.smoke,
        "device": name,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "model": args.model,
        "block_params": n_block,
        "batch": args.batch,
        "context_len": args.context_len,
        "flop_formula": "batch · T · (6 · N + 12 · n_layer · n_embd · T), T = 3K tokens a window, N = block params",
        "flops_per_step": flops_per_step(n_block, args.model["n_layer"], args.model["n_embd"], args.batch, args.context_len),
        "peak_tflops": peak_for(name, args.peak_tflops)[0],
        "peak_source": peak_for(name, args.peak_tflops)[1],
    }
    print(f"[gpu] {name}: {json.dumps(args.model)}, batch {args.batch} x K={args.context_len}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            "meta": meta,
            "train": bench_train(args, device, tmp, skipped),
            "eval": bench_eval(args, device),
            "packing": bench_packing(args, device, tmp),
            "skipped": skipped,
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    if args.update_readme:
        update_readme(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
