"""How often each verdict rule speaks when it should not, and when it should: a simulation.

    python benchmarks/verdicts.py --out benchmarks/results/verdicts.json      # full: 2,000 per cell
    python benchmarks/verdicts.py --quick --out /tmp/verdicts.json            # 300 per cell

Null cells: treatment and control drawn from the same distribution ({3, 5, 10} seeds per group
x {1, 3} envs x normal, lognormal sigma=1, exponential, t(3), and normal with the control's SD
3x the treatment's: equal means, unequal spreads). Each cell measures, over the same draws:

- "new": `stats.decide` (stratified Welch t, MIN_SEEDS = 5): the rate of non-inconclusive verdicts;
- "new_test_only": the rate of p < alpha, i.e. the same test without the MIN_SEEDS rule;
- "old": the previous rule, `stats.compare_groups` (percentile bootstrap, 2,000 resamples, as the
  report ran it) fed to `stats.verdict` with min_seeds=3.

Each rate comes with its binomial standard error sqrt(r (1 - r) / n). A null cell whose new-rule
rate comes out above alpha is measured again on 10x as many fresh draws (new rule only, under
"confirm"), to tell Monte-Carlo noise from a real excess. Power cells: normal
scores, 1 and 3 envs, 5 and 10 seeds, a true effect of 0.5-2 SD, the rate of "supported".
Multi-part cells: findings of 3 parts, all null, decided by `stats.combine` (Holm) and by the old
`combine_verdicts` over old-rule parts. Every cell draws from its own fixed seed, so a rerun gives
the same counts on any machine with the same numpy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dtsweep import stats  # noqa: E402

ALPHA = 0.05
Draw = Callable[[np.random.Generator, int, str], np.ndarray]  # (rng, n_seeds, side) -> scores [n_seeds]

# Scores under no effect: both sides from one distribution (except "normal_unequal_sd", which
# keeps the means equal and makes the control 3x as spread out).
NULLS: dict[str, Draw] = {
    "normal": lambda rng, n, side: rng.normal(50.0, 10.0, n),
    "lognormal": lambda rng, n, side: rng.lognormal(0.0, 1.0, n),
    "exponential": lambda rng, n, side: rng.exponential(1.0, n),
    "t3": lambda rng, n, side: rng.standard_t(3, n),
    "normal_unequal_sd": lambda rng, n, side: rng.normal(0.0, 1.0 if side == "treatment" else 3.0, n),
}


def _draw_pair(rng, draw: Draw, n_seeds: int, n_envs: int, shift: float = 0.0):
    t = {f"env{e}": draw(rng, n_seeds, "treatment") + shift for e in range(n_envs)}
    c = {f"env{e}": draw(rng, n_seeds, "control") for e in range(n_envs)}
    return t, c


def old_rule(t, c) -> str:
    eff = stats.compare_groups(t, c, n_boot=2000, ci=1 - ALPHA, seed=0)
    return stats.verdict(eff.low, eff.high, eff.n_seeds, min_seeds=3)


def _rate(k: int, n: int) -> dict:
    r = k / n
    return {"rate": r, "se": float(np.sqrt(r * (1 - r) / n)), "count": k, "n": n}


def null_cell(dist: str, n_seeds: int, n_envs: int, n_sims: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    new = test_only = old = 0
    for _ in range(n_sims):
        t, c = _draw_pair(rng, NULLS[dist], n_seeds, n_envs)
        d = stats.compare(t, c, alpha=ALPHA)
        new += d.verdict != stats.INCONCLUSIVE
        test_only += d.p_value < ALPHA
        old += old_rule(t, c) != stats.INCONCLUSIVE
    return {"dist": dist, "n_seeds": n_seeds, "n_envs": n_envs,
            "new": _rate(new, n_sims), "new_test_only": _rate(test_only, n_sims), "old": _rate(old, n_sims)}  # fmt: skip


def confirm_cell(dist: str, n_seeds: int, n_envs: int, n_sims: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    calls = sum(stats.decide(*_draw_pair(rng, NULLS[dist], n_seeds, n_envs), alpha=ALPHA) != stats.INCONCLUSIVE
                for _ in range(n_sims))  # fmt: skip
    return {"dist": dist, "n_seeds": n_seeds, "n_envs": n_envs, "new": _rate(calls, n_sims)}


def power_cell(effect_sd: float, n_seeds: int, n_envs: int, n_sims: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    new = old = 0
    for _ in range(n_sims):
        t, c = _draw_pair(rng, lambda r, n, side: r.normal(0.0, 1.0, n), n_seeds, n_envs, shift=effect_sd)
        new += stats.decide(t, c, alpha=ALPHA) == stats.SUPPORTED
        old += old_rule(t, c) == stats.SUPPORTED
    return {"effect_sd": effect_sd, "n_seeds": n_seeds, "n_envs": n_envs,
            "new": _rate(new, n_sims), "old": _rate(old, n_sims)}  # fmt: skip


def multipart_cell(dist: str, n_seeds: int, n_parts: int, n_sims: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    new = old = 0
    for _ in range(n_sims):
        pairs = [_draw_pair(rng, NULLS[dist], n_seeds, 1) for _ in range(n_parts)]
        new += stats.combine([stats.compare(t, c, alpha=ALPHA) for t, c in pairs], alpha=ALPHA)[0] != stats.INCONCLUSIVE
        old += stats.combine_verdicts([old_rule(t, c) for t, c in pairs]) != stats.INCONCLUSIVE
    return {"dist": dist, "n_seeds": n_seeds, "n_parts": n_parts, "new": _rate(new, n_sims), "old": _rate(old, n_sims)}


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "platform": platform.platform()}  # fmt: skip


def _fmt(r: dict) -> str:
    return f"{r['rate']:.3f} ± {r['se']:.3f}"


def table(results: dict) -> str:
    """Markdown tables of the results (the README section quotes them)."""
    lines = ["Null (no true effect): rate of non-inconclusive verdicts, ± binomial standard error, "
             f"{results['n_sims']} comparisons per cell.", "",
             "| scores | seeds | envs | new rule | new test alone (p < α) | old rule |", "|---|---|---|---|---|---|"]  # fmt: skip
    for c in results["null"]:
        lines.append(f"| {c['dist']} | {c['n_seeds']} | {c['n_envs']} | {_fmt(c['new'])} "
                     f"| {_fmt(c['new_test_only'])} | {_fmt(c['old'])} |")  # fmt: skip
    if results["confirm"]:
        lines += ["", "Null cells above alpha, measured again (new rule, fresh draws):", "",
                  "| scores | seeds | envs | comparisons | new rule |", "|---|---|---|---|---|"]  # fmt: skip
        for c in results["confirm"]:
            lines.append(f"| {c['dist']} | {c['n_seeds']} | {c['n_envs']} | {c['new']['n']} | {_fmt(c['new'])} |")
    lines += ["", "Power: rate of \"supported\" for a true effect (normal scores, SD 1).", "",
              "| effect (SD) | seeds | envs | new rule | old rule |", "|---|---|---|---|---|"]  # fmt: skip
    for c in results["power"]:
        lines.append(f"| {c['effect_sd']} | {c['n_seeds']} | {c['n_envs']} | {_fmt(c['new'])} | {_fmt(c['old'])} |")
    lines += ["", "Findings of several parts, every part null: rate of a finding-level verdict.", "",
              "| scores | seeds | parts | new (`combine`, Holm) | old (`combine_verdicts`) |", "|---|---|---|---|---|"]  # fmt: skip
    for c in results["multipart"]:
        lines.append(f"| {c['dist']} | {c['n_seeds']} | {c['n_parts']} | {_fmt(c['new'])} | {_fmt(c['old'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="300 simulations per cell instead of 2,000")
    p.add_argument("--sims", type=int, default=None, help="simulations per cell (overrides --quick)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    n_sims = args.sims or (300 if args.quick else 2000)
    t0 = time.perf_counter()
    results: dict = {"command": "python benchmarks/verdicts.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                     "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
                     "alpha": ALPHA, "min_seeds": stats.MIN_SEEDS, "n_sims": n_sims,
                     "null": [], "confirm": [], "power": [], "multipart": []}  # fmt: skip
    seed = 0
    for dist in NULLS:
        for n_seeds in (3, 5, 10):
            for n_envs in (1, 3):
                seed += 1
                cell = null_cell(dist, n_seeds, n_envs, n_sims, seed)
                results["null"].append(cell)
                print(f"null {dist:18s} seeds {n_seeds:2d} envs {n_envs}: new {_fmt(cell['new'])}  "
                      f"test {_fmt(cell['new_test_only'])}  old {_fmt(cell['old'])}", flush=True)  # fmt: skip
    for i, cell in enumerate([c for c in results["null"] if c["new"]["rate"] > ALPHA]):
        again = confirm_cell(cell["dist"], cell["n_seeds"], cell["n_envs"], 10 * n_sims, 1000 + i)
        results["confirm"].append(again)
        print(f"confirm {cell['dist']} seeds {cell['n_seeds']} envs {cell['n_envs']}: new {_fmt(again['new'])}",
              flush=True)  # fmt: skip
    for n_seeds, n_envs in ((10, 1), (5, 1), (10, 3), (5, 3)):
        for effect in (0.5, 1.0, 1.5, 2.0):
            seed += 1
            cell = power_cell(effect, n_seeds, n_envs, n_sims, seed)
            results["power"].append(cell)
            print(f"power {effect} SD seeds {n_seeds:2d} envs {n_envs}: new {_fmt(cell['new'])}  old {_fmt(cell['old'])}",
                  flush=True)  # fmt: skip
    for dist in ("normal", "lognormal"):
        for n_seeds in (5, 10):
            seed += 1
            cell = multipart_cell(dist, n_seeds, 3, n_sims, seed)
            results["multipart"].append(cell)
            print(f"3 parts {dist:9s} seeds {n_seeds:2d}: new {_fmt(cell['new'])}  old {_fmt(cell['old'])}", flush=True)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    print()
    print(table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
