"""Command line: `dtsweep {plan,run,status,data,...}`.

Errors a user can fix (bad spec, missing dataset, unreachable model or cluster, storage
that cannot be written) print one line and exit with code 2, without a traceback and
before anything is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import yaml

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
MAX_TRIALS_TEXT = "100,000"  # dtsweep.spec.MAX_TRIALS (not imported: keeps --help instant)


class UserError(Exception):
    """An input problem the user can fix; printed as one line, exit code 2."""


# Errors a user can fix, as (module, class). An exception of a class can only exist once its
# module is imported, so only loaded modules are consulted: a typo in a spec then fails in
# about a second instead of first importing torch and transformers to name their errors.
_USER_ERROR_CLASSES = (
    ("dtsweep.spec", "SpecError"),
    ("dtsweep.preflight", "PreflightError"),
    ("dtsweep.tracking", "TrackingError"),
    ("dtsweep.data.d4rl", "DatasetNotFoundError"),
    ("dtsweep.data.d4rl", "DatasetError"),
    ("dtsweep.models.backbones", "InitError"),
    ("dtsweep.store", "LeaseHeld"),
    ("dtsweep.store", "StorageError"),
    ("dtsweep.cluster", "NoGpuError"),
)


def _user_errors() -> tuple[type[BaseException], ...]:
    loaded = (sys.modules.get(module) for module, _ in _USER_ERROR_CLASSES)
    return (UserError, *(getattr(m, name) for m, (_, name) in zip(loaded, _USER_ERROR_CLASSES) if m is not None))


def _load(path: str, storage: str | None = None, allow_large: bool = False):
    from dtsweep.spec import check_grid_size, load_spec

    spec = load_spec(path)
    check_grid_size(spec, allow_large=allow_large)
    # --storage, else $DTSWEEP_STORAGE, else the spec's own `storage:`.
    storage = storage or os.environ.get("DTSWEEP_STORAGE") or None
    return spec.with_storage(storage) if storage else spec


# ---- plan


def cmd_plan(args) -> int:
    from dtsweep.costs import plan_sweep

    spec = _load(args.sweep, args.storage, args.allow_large)
    plan = plan_sweep(spec, with_trials=args.json)
    if args.json:
        print(json.dumps(plan, indent=1))
        return 0

    def hours(h: dict) -> str:
        return " + ".join(f"~{h[d]:,.1f} {d}-h" for d in ("GPU", "CPU") if h[d] > 0) or "~0 h"

    total = {d: sum(h[d] for h in plan["hours"].values()) for d in ("GPU", "CPU")}
    print(f"sweep {spec.name} -> {spec.sweep_dir}")
    for st in spec.studies:
        kind = f" (search: {len(spec.grid(st))} groups x {st.search.num_samples} samples, at most)" if st.search else ""
        print(f"  {st.name:<16} {plan['studies'][st.name]:>5} trials  inits={','.join(st.init)}  datasets={','.join(st.dataset)}  "
              f"K={','.join(map(str, st.context_len))}  seeds={len(st.seed)}  {hours(plan['hours'][st.name])}{kind}")  # fmt: skip
    print(f"  total            {plan['total_trials']:>5} trials  {hours(total)}  "
          "(estimates: dtsweep/costs.py; CPU figures measured, GPU figures estimated)")  # fmt: skip
    dtypes = sorted({st.checkpoint_dtype for st in spec.studies})
    print(f"  storage: checkpoints ~{plan['checkpoint_storage_gb']:,.1f} GB ({'/'.join(dtypes)}), "
          f"metrics ~{plan['metrics_storage_gb']:,.2f} GB: kept")  # fmt: skip
    peak = (f", ~{plan['resume_state_gb_peak']:,.2f} GB with {plan['concurrent_trials']} trials running at once"
            if plan["resume_state_gb_peak"] is not None else " times the trials running at once")  # fmt: skip
    print(f"  storage: resume states ~{plan['resume_state_gb_per_trial']:,.2f} GB per running trial{peak}: "
          "deleted when each trial finishes")  # fmt: skip
    print(f"  diagnostics: ~{plan['diagnostics_cpu_hours']:,.1f} CPU-core-hours for the default `diagnose` "
          "(measured per kind on CPU; benchmarks/README.md)")  # fmt: skip
    return 0


# ---- run


def cmd_run(args) -> int:
    spec = _load(args.sweep, args.storage, args.allow_large)  # before the heavy imports: spec typos fail fast
    from dtsweep.orchestrate import run_sweep
    from dtsweep.preflight import check_run
    from dtsweep.store import Lease, Store

    try:
        store = Store(spec.sweep_dir)
        present = store.exists()
    except (OSError, ValueError):  # unusable storage (ArrowInvalid is a ValueError): check_run says why
        present = False
    if present:
        Lease(store).check_free()  # another live run: refused at once, before the slower checks
    address = args.address or spec.ray.address or os.environ.get("RAY_ADDRESS")
    check_run(spec, address=address)  # datasets, models, storage, cluster: before any write
    summary = run_sweep(spec, address=address, retry_failed=args.retry_failed)
    return 0 if summary.failed == 0 else 1


# ---- status


def cmd_status(args) -> int:
    from dtsweep.sweepdir import sweep_status

    try:
        st = sweep_status(args.sweep_dir)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    if args.json:
        out = {k: v for k, v in st.items() if k != "trials"}
        out["trials"] = st["trials"].to_dict("records")
        print(json.dumps(out, indent=1, default=str))
        return 0
    counts = ", ".join(f"{v} {k}" for k, v in sorted(st["counts"].items()))
    print(f"{st['sweep_dir']}: {st['total']} trials: {counts}")
    if st["run"] == "running":
        from dtsweep.store import describe_lease

        print(f"  a run is active: {describe_lease(st['lease'])}")
    elif st["run"] == "interrupted":
        print("  interrupted: no run is active and trials were left running; run the same command again to resume them")
    for problem in st["problems"]:
        print(f"  damaged: {problem}")
    for f in st["failures"]:
        where = f" (traceback: {f['error_file']})" if f.get("error_file") else ""
        print(f"  failed {f['trial_id']} ({f['init']} {f['dataset']} K={f['context_len']} seed={f['seed']}): {f['error']}{where}")
    for w in st.get("warnings", []):
        print(w)
    return 0


# ---- data


def cmd_data_make(args) -> int:
    _check_data_make(args.name, args.steps, args.seed, args.out)
    from dtsweep.data import make_dataset

    card = make_dataset(args.name, steps=args.steps, seed=args.seed, out_path=args.out)
    print(json.dumps(card, indent=1, default=str))
    return 0


def _check_data_make(name: str, steps: int, seed: int, out: str) -> None:
    """Every argument of `data make`, before anything is generated (UserError, one line)."""
    import tempfile
    from pathlib import Path

    from dtsweep.data.d4rl import generators
    from dtsweep.envs import parse_dataset

    try:
        env, quality, version = parse_dataset(name)
    except ValueError as e:
        raise UserError(f"data make: {e}") from None
    if version is not None:
        raise UserError(f"data make: {name!r} names a D4RL release; generated datasets are unversioned (use {env}-{quality})")
    if quality not in generators():
        raise UserError(f"data make: no generator for {quality!r} datasets (have: {', '.join(sorted(generators()))})")
    if not 1 <= steps < 2**63:
        raise UserError(f"data make: --steps {steps} is not valid; expected a positive number of environment steps")
    if not 0 <= seed < 2**63:
        raise UserError(f"data make: --seed {seed} is not valid; expected an integer in [0, 2**63)")
    path = Path(out).expanduser()
    if path.is_dir():
        raise UserError(f"data make: --out {out} is a directory; give a file path such as {path / (name + '.hdf5')}")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"data make: --out {out} cannot be written: {ancestor} is a file, not a directory")
    try:  # os.access says yes to root even on /proc: create and remove a real file
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as e:
        raise UserError(f"data make: --out {out} cannot be written: {e.strerror or e} ({ancestor})") from None


# ---- assets, diagnostics, report


def cmd_assets(args) -> int:
    from dtsweep.assets import list_assets, summary

    assets = list_assets()
    if args.json:
        print(json.dumps(assets, indent=1))
    else:
        for a in assets:
            print(summary(a))
    return 0


def cmd_diagnose(args) -> int:
    from dtsweep.diagnostics.job import FAST_OPTIONS, KINDS, run_diagnostics

    kinds = args.kinds.split(",") if args.kinds else list(KINDS)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise UserError(f"--kinds: unknown kind {unknown[0]!r}; allowed: {','.join(KINDS)}")
    _require_sweep_dir(args.sweep_dir, "checkpoints.parquet")
    options = {kind: dict(values) for kind, values in (FAST_OPTIONS if args.fast else {}).items()}
    for item in args.set or []:
        key, sep, raw = item.partition("=")
        kind, dot, name = key.partition(".")
        if not (sep and dot and kind in KINDS):
            raise UserError(f"--set {item!r}: expected KIND.OPTION=VALUE with KIND one of {','.join(KINDS)}")
        value = yaml.safe_load(raw)
        options.setdefault(kind, {})[name] = value.split(",") if name == "depths" and isinstance(value, str) else value
    try:
        out = run_diagnostics(args.sweep_dir, kinds, options=options or None, address=args.address, gpu=args.gpu,
                              max_workers=args.max_workers)  # fmt: skip
    except ValueError as e:  # unknown option names, bad values: the user's input
        if "option" not in str(e):
            raise
        raise UserError(f"--set: {e}") from None
    for kind, path in out.items():
        print(f"{kind:<10} {path}")
    return 0


def cmd_report(args) -> int:
    from dtsweep.report import Sweep, write_report

    _require_sweep_dir(args.sweep_dir, "trials.parquet")
    sweep = Sweep.load(args.sweep_dir)
    index = write_report(sweep, out=args.out)
    if sweep.metrics is None:
        # Not an error: a sweep that has not finished a trial yet still gets its (minimal) report.
        print(f"{args.sweep_dir}: no finished trial with metrics yet; wrote a minimal report to {index}", file=sys.stderr)
    else:
        print(index)
    return 0


def _positive_int(text: str) -> int:
    value = int(text) if text.strip().lstrip("+").isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _require_sweep_dir(sweep_dir: str, needed: str) -> None:
    from dtsweep.store import Store

    if not Store(sweep_dir).exists(needed):
        raise UserError(f"{sweep_dir}: no {needed}; is it a sweep directory that `dtsweep run` finished?")


# ---- entry point


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    from dtsweep import __version__

    # `dtsweep` is the console script; `python -m dtsweep` runs the same parser.
    p = argparse.ArgumentParser(prog="dtsweep", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"dtsweep {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("plan", help="list the trials of a sweep and estimate GPU-hours and storage")
    q.add_argument("sweep", help="sweep YAML file")
    q.add_argument(
        "--storage", help="override the spec's storage (local path or URI; default: $DTSWEEP_STORAGE, else the spec's)"
    )
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.add_argument("--allow-large", action="store_true", help=f"accept a grid of more than {MAX_TRIALS_TEXT} trials")
    q.set_defaults(func=cmd_plan)

    q = sub.add_parser("run", help="train every unfinished trial of a sweep (resumable)")
    q.add_argument("sweep", help="sweep YAML file")
    q.add_argument(
        "--storage",
        help="override the spec's storage (default: $DTSWEEP_STORAGE, else the spec's); outputs land in STORAGE/<name>/",
    )
    q.add_argument(
        "--address",
        help="Ray cluster address, e.g. 10.0.0.5:6379 or auto (default: RAY_ADDRESS, "
        "else the Ray started on this machine by `ray start`, else a new local Ray)",
    )
    q.add_argument("--retry-failed", action="store_true", help="also rerun trials recorded as failed")
    q.add_argument("--allow-large", action="store_true", help=f"accept a grid of more than {MAX_TRIALS_TEXT} trials")
    q.set_defaults(func=cmd_run)

    q = sub.add_parser("status", help="counts by status and failures of a sweep directory")
    q.add_argument("sweep_dir")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_status)

    d = sub.add_parser("data", help="offline datasets in D4RL's HDF5 layout")
    dsub = d.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("make", help="generate ENV-QUALITY (e.g. hopper-random) with Gymnasium MuJoCo v5")
    q.add_argument("name", help="dataset name, e.g. hopper-random or hopper-medium")
    q.add_argument("--steps", type=int, default=1_000_000)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", required=True, help="output .hdf5 path")
    q.set_defaults(func=cmd_data_make)

    q = sub.add_parser("assets", help="list the pretrained models and behaviour policies shipped in the package")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_assets)

    q = sub.add_parser("pretrain", help="make an offline asset: a small GPT-2 (language or image) or a behaviour policy")
    if argv[:1] == ["pretrain"]:
        # Its flags come from the pretraining configs, which import torch and transformers:
        # only pay for that when pretraining, so typos in other commands fail in a blink.
        from dtsweep.pretrain import add_arguments as add_pretrain_arguments

        add_pretrain_arguments(q)

    q = sub.add_parser("diagnose", help="Ray Data job: every diagnostic of the sweep's checkpoints -> diagnostics/*.parquet")
    q.add_argument("sweep_dir")
    q.add_argument("--kinds", help="comma-separated subset of cka,mine,params,gradients,attention (default: all)")
    q.add_argument(
        "--fast",
        action="store_true",
        help="small samples and critics: a CPU smoke run, ~20 s of one core per ChibiT-size trial against "
        "~156 s by default; not for conclusions: MINE's figures come out ~1/3 of the default's (ratio of "
        "means 0.36, median per-critic ratio 0.21 on a quickstart trial), CKA within 0.03 "
        "(benchmarks/README.md, 'Diagnostics cost')",
    )
    q.add_argument(
        "--set",
        action="append",
        metavar="KIND.OPTION=VALUE",
        help="override a measurement setting (dtsweep/diagnostics/job.py DEFAULT_OPTIONS), e.g. "
        "mine.depths=middle (MINE at the middle block only), mine.n_windows=2048; repeatable",
    )
    q.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, the cluster on this node, else a local Ray)")
    q.add_argument(
        "--gpu",
        choices=["auto", "on", "off"],
        default="auto",
        help="one GPU per worker: auto = when the cluster has GPUs now (else CPUs, said so), on = wait for GPU nodes "
        "an autoscaler starts, off = CPUs only (default: auto)",
    )
    q.add_argument(
        "--max-workers",
        type=_positive_int,
        metavar="N",
        help="largest worker pool; it starts with what the cluster fits and grows as nodes join (default: one per item)",
    )
    q.set_defaults(func=cmd_diagnose)

    q = sub.add_parser("report", help="tables, figures and the papers' findings with seed CIs -> report/")
    q.add_argument("sweep_dir", help="sweep directory: a local path or a URI (s3://, gs://, file://)")
    q.add_argument("--out", help="write the report here (a local directory or URI) instead of SWEEP_DIR/report")
    q.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
