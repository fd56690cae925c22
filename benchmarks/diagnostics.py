"""Time each diagnostic kind of `diagnose` for one trial, in CPU seconds of one torch thread.

    python benchmarks/diagnostics.py --sweep runs/quickstart            # a finished trial of a real sweep
    python benchmarks/diagnostics.py --sweep runs/quickstart --trials all --out r.json
    python benchmarks/diagnostics.py --size quickstart --options fast   # a synthetic, untrained DT
    python benchmarks/diagnostics.py --size gpt2 --set cka.n_windows=64 ...

With --sweep, the trial's own checkpoints are measured (trained weights matter for MINE, whose
critics stop early once nothing more is learned). Without it, a real DecisionTransformer
(random init, offline) is written as the epoch-0 checkpoint and perturbed copies as epochs 1
and final. Either way the job's measure_* functions are called directly (no Ray), one kind at a
time, and each kind's CPU seconds (`time.process_time`: what a core of its own would take, also
on a shared machine) and wall seconds are printed; loading the dataset is timed on its own.
"""

import argparse
import json
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DTSWEEP_OFFLINE", "1")

import torch

from dtsweep.diagnostics import job
from dtsweep.models import backbone_config_dict, build_decision_transformer
from dtsweep.spec import Trial, parse_spec
from dtsweep.store import Store, write_checkpoint

SIZES = {
    "quickstart": {"n_layer": 3, "n_embd": 128, "n_head": 1},
    "gpt2": {"n_layer": 12, "n_embd": 768, "n_head": 12},
}


def synthetic_trial(size: str, out: str) -> tuple[Trial, dict[int, str]]:
    """A random-init DT of `size` saved at epochs 0, 1 and final (perturbed copies)."""
    spec = parse_spec({
        "name": f"bench-{size}", "storage": out,
        "defaults": {"context_len": 20, "data": {"steps": 50000, "seed": 0}, "model": SIZES[size],
                     "train": {"epochs": 3}, "checkpoint_epochs": [0, 1, "final"]},
        "studies": [{"name": "main", "init": ["random"], "dataset": ["hopper-medium"], "seed": [0]}],
    })  # fmt: skip
    trial = spec.trials()[0]
    store = Store(spec.sweep_dir)
    model = build_decision_transformer("random", state_dim=11, act_dim=3, seed=0, context_len=20, overrides=SIZES[size])
    ckpts = {}
    g = torch.Generator().manual_seed(1)
    for epoch in (0, 1, trial.epochs):
        if epoch:
            with torch.no_grad():
                for t in model.parameters():
                    t.add_(0.01 * torch.randn(t.shape, generator=g))
        rel = f"checkpoints/{trial.trial_id}/epoch={epoch}.parquet"
        meta = {"trial_id": trial.trial_id, "epoch": epoch, "state_dim": 11, "act_dim": 3,
                "backbone_config": backbone_config_dict(model)}  # fmt: skip
        write_checkpoint(store, rel, model.state_dict(), meta)
        ckpts[epoch] = store.uri(rel)
    return trial, ckpts


def sweep_trials(sweep_dir: str, which: str) -> list[tuple[Trial, dict[int, str]]]:
    """(trial, epoch -> checkpoint) of the sweep's finished trials: "first", "all" or "id1,id2"."""
    store = Store(sweep_dir)
    trials = store.read_pandas("trials.parquet")
    index = job._checkpoint_index(store)
    out = []
    finished = trials[trials.status == "finished"].sort_values("trial_id")
    if which not in ("first", "all"):
        finished = finished[finished.trial_id.isin(which.split(","))]
    for row in finished.itertuples():
        own = index[index.trial_id == row.trial_id]
        ckpts = {int(e): store.resolve_rel(p) for e, p in zip(own.epoch, own.path)}
        out.append((Trial.from_dict(json.loads(row.config_json)), ckpts))
        if which == "first":
            break
    if not out:
        raise SystemExit(f"{sweep_dir}: no finished trial")
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sweep", help="a finished sweep directory: measure its trials' own checkpoints")
    p.add_argument("--trials", default="first", help="with --sweep: first, all, or comma-separated trial ids")
    p.add_argument("--size", choices=SIZES, default="quickstart", help="without --sweep")
    p.add_argument("--options", choices=["fast", "default"], default="default")
    p.add_argument("--set", nargs="*", default=[], help="kind.option=value overrides (JSON values)")
    p.add_argument("--kinds", default=",".join(job.KINDS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tmp", default="/tmp/diag_bench/run", help="where the synthetic checkpoints go")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    items = sweep_trials(args.sweep, args.trials) if args.sweep else [synthetic_trial(args.size, args.tmp)]
    overrides: dict = {k: dict(v) for k, v in (job.FAST_OPTIONS if args.options == "fast" else {}).items()}
    for item in args.set:
        key, value = item.split("=", 1)
        kind, name = key.split(".")
        overrides.setdefault(kind, {})[name] = json.loads(value)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctx = job.Context(device=device, options=job._merge_options(overrides), max_grad_elements=job._grad_budget(device))
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    print(f"device={device} threads={args.threads} machine={machine} options={json.dumps(ctx.options)}")
    results = []
    for trial, ckpts in items:
        c0 = time.process_time()
        ctx.trajectories(trial)
        data_s = time.process_time() - c0
        print(f"trial {trial.trial_id} ({trial.init}, K={trial.context_len}): dataset {data_s:.2f} cpu-s", flush=True)
        row = {"trial_id": trial.trial_id, "init": trial.init, "dataset_cpu_s": data_s}
        for kind in args.kinds.split(","):
            need = job._required_epochs(kind, trial, set(ckpts))
            if isinstance(need, str):
                print(f"  {kind:10s} skipped: {need}")
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            rows = job.MEASURES[kind](ctx, trial, {e: ckpts[e] for e in need})
            cpu, wall = time.process_time() - c0, time.perf_counter() - t0
            row[f"{kind}_cpu_s"], row[f"{kind}_wall_s"] = cpu, wall
            row[f"{kind}_rows"] = rows
            print(f"  {kind:10s} {cpu:8.2f} cpu-s {wall:8.2f} wall-s  {len(rows)} rows", flush=True)
        results.append(row)
    total = [sum(v for k, v in r.items() if k.endswith("_cpu_s")) for r in results]
    print("total cpu-s per trial: " + ", ".join(f"{t:.1f}" for t in total))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"machine": machine, "threads": args.threads, "options": ctx.options, "trials": results}, f, indent=1, default=str
            )


if __name__ == "__main__":
    main()
