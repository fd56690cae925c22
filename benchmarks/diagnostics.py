"""Time each diagnostic kind per checkpoint pair, on this machine's CPU or GPU.

    python benchmarks/diagnostics.py --size quickstart --options fast
    python benchmarks/diagnostics.py --size gpt2 --options default --scale cka.n_windows=64 ...

Builds a real DecisionTransformer (random init, offline), writes it as the epoch-0 checkpoint
and a perturbed copy as epochs 1 and final, then calls the job's measure_* functions directly
(no Ray), one kind at a time, and prints seconds per kind.
"""

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DTSWEEP_OFFLINE", "1")

import torch

from dtsweep.diagnostics import job
from dtsweep.models import backbone_config_dict, build_decision_transformer
from dtsweep.spec import parse_spec
from dtsweep.store import Store, write_checkpoint

SIZES = {
    "quickstart": {"n_layer": 3, "n_embd": 128, "n_head": 1},
    "gpt2": {"n_layer": 12, "n_embd": 768, "n_head": 12},
}

p = argparse.ArgumentParser()
p.add_argument("--size", choices=SIZES, default="quickstart")
p.add_argument("--options", choices=["fast", "default"], default="fast")
p.add_argument("--set", nargs="*", default=[], help="kind.option=value overrides")
p.add_argument("--kinds", default=",".join(job.KINDS))
p.add_argument("--threads", type=int, default=1)
p.add_argument("--out", default="/tmp/diag_bench/run")
args = p.parse_args()
torch.set_num_threads(args.threads)

spec = parse_spec({
    "name": f"bench-{args.size}", "storage": args.out,
    "defaults": {"context_len": 20, "data": {"steps": 50000, "seed": 0}, "model": SIZES[args.size],
                 "train": {"epochs": 3}, "checkpoint_epochs": [0, 1, "final"]},
    "studies": [{"name": "main", "init": ["random"], "dataset": ["hopper-medium"], "seed": [0]}],
})  # fmt: skip
trial = spec.trials()[0]
store = Store(spec.sweep_dir)
model = build_decision_transformer("random", state_dim=11, act_dim=3, seed=0, context_len=20, overrides=SIZES[args.size])
ckpts = {}
g = torch.Generator().manual_seed(1)
for epoch in (0, 1, trial.epochs):
    if epoch:
        with torch.no_grad():
            for t in model.parameters():
                t.add_(0.01 * torch.randn(t.shape, generator=g))
    rel = f"checkpoints/{trial.trial_id}/epoch={epoch}.parquet"
    meta = {"trial_id": trial.trial_id, "epoch": epoch, "state_dim": 11, "act_dim": 3,
            "backbone_config": backbone_config_dict(model)}
    write_checkpoint(store, rel, model.state_dict(), meta)
    ckpts[epoch] = store.uri(rel)

options = job.DEFAULT_OPTIONS if args.options == "default" else job.FAST_OPTIONS
overrides: dict = {k: dict(v) for k, v in options.items()}
for item in args.set:
    key, value = item.split("=")
    kind, name = key.split(".")
    overrides.setdefault(kind, {})[name] = json.loads(value)
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ctx = job.Context(device=device, options=job._merge_options(overrides), max_grad_elements=job._grad_budget(device))
ctx.trajectories(trial)  # dataset loading is not part of any kind's time
n_params = sum(t.numel() for t in model.state_dict().values())
print(f"size={args.size} params={n_params} device={device} threads={args.threads} options={json.dumps(ctx.options)}")
for kind in args.kinds.split(","):
    need = job._required_epochs(kind, trial, set(ckpts))
    t0, c0 = time.perf_counter(), time.process_time()
    rows = job.MEASURES[kind](ctx, trial, {e: ckpts[e] for e in need})
    # CPU seconds of this process: what a core of its own would take, on a shared machine too.
    print(f"{kind:10s} {time.process_time() - c0:8.2f} cpu-s {time.perf_counter() - t0:8.2f} wall-s  {len(rows)} rows",
          flush=True)
