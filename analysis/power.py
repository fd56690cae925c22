"""How many seeds would settle each finding? A power estimate from a sweep's measured variance.

    python analysis/power.py SWEEP_DIR [--envs 3] [--power 0.8]

Reads the report's `tables/findings.csv` (run `dtsweep report SWEEP_DIR` first). For each
primary comparison it backs out the seed-to-seed standard deviation from the Welch CI
(half-width = t * SE, SE = sd * sqrt(1/n_a + 1/n_b)), takes the measured effect as the true
one, and finds the smallest number of seeds per group at which a two-sided Welch t-test at
alpha / (number of primary comparisons of the finding at that scale) — the first step of
Holm's correction, so a lower bound on the power Holm gives — rejects with the asked power.
`--envs E` answers for a grid with E envs where each env shows the same standardised effect
(the paper grid: hopper, halfcheetah, walker2d): the stratified effect then averages E
independent estimates, so E envs of n seeds act like one env of E * n.

This is a planning figure, not a result: the measured effect of a few seeds is itself noisy
(an effect near 0 needs "more seeds than any budget", printed as >1000).
"""

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats as st

ALPHA = 0.05
MAX_SEEDS = 1000


def power_welch(d: float, n: int, alpha: float) -> float:
    """Power of a two-sided two-sample t-test with n per group at standardised effect d."""
    df = 2 * n - 2
    crit = st.t.ppf(1 - alpha / 2, df)
    nc = abs(d) * math.sqrt(n / 2)
    return float(st.nct.sf(crit, df, nc) + st.nct.cdf(-crit, df, nc))


def seeds_needed(d: float, alpha: float, power: float, envs: int) -> int | None:
    """Seeds per group and env for `power` at standardised effect d, or None beyond MAX_SEEDS."""
    if not np.isfinite(d) or d == 0:
        return None
    for n in range(2, MAX_SEEDS + 1):
        if power_welch(d, n * envs, alpha) >= power:
            return n
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep_dir")
    p.add_argument("--envs", type=int, default=1, help="envs of the planned grid (same effect in each)")
    p.add_argument("--power", type=float, default=0.8)
    args = p.parse_args()

    f = pd.read_csv(Path(args.sweep_dir) / "report" / "tables" / "findings.csv")
    f = f[(f["scope"] == "all") & f["primary"].astype(bool) & f["effect"].notna()].copy()
    if f.empty:
        print("no measured primary comparison in findings.csv")
        return
    n_a, n_b = f["n_treatment"].astype(float), f["n_control"].astype(float)
    crit = st.t.ppf(1 - ALPHA / 2, n_a + n_b - 2)
    se = (f["ci_high"] - f["ci_low"]) / (2 * crit)
    f["sd"] = se / np.sqrt(1 / n_a + 1 / n_b)
    f["d"] = f["effect"] / f["sd"]
    parts = f.groupby(["finding", "scale"])["comparison"].transform("size")
    needed = [seeds_needed(d, ALPHA / k, args.power, args.envs) for d, k in zip(f["d"], parts)]
    f["seeds_needed"] = [f">{MAX_SEEDS}" if n is None else str(n) for n in needed]
    cols = ["finding", "scale", "comparison", "n_treatment", "n_control", "effect", "sd", "d", "verdict", "seeds_needed"]
    with pd.option_context("display.width", 200, "display.max_colwidth", 60):
        print(f"seeds per group{' and env' if args.envs > 1 else ''} for {args.power:.0%} power, "
              f"{args.envs} env(s), two-sided alpha {ALPHA} / parts:")  # fmt: skip
        print(f[cols].round(3).to_string(index=False))


if __name__ == "__main__":
    main()
