"""Is init A better than init B at the final epoch? Effect, 95% CI, P(A > B) and a verdict.

    python analysis/compare_inits.py SWEEP_DIR [A B [K]]      (default: gpt2 random 20)

Uses dtsweep.stats: seeds are resampled within each env (stratified bootstrap), the effect
is mean(A) - mean(B) averaged over the envs both ran.
"""

import sys
from pathlib import Path

import pandas as pd

from dtsweep.stats import compare_groups, verdict

sweep = Path(sys.argv[1])
a, b = (sys.argv[2], sys.argv[3]) if len(sys.argv) > 3 else ("gpt2", "random")
k = int(sys.argv[4]) if len(sys.argv) > 4 else 20

m = pd.read_parquet(sweep / "metrics.parquet")
finished = pd.read_parquet(sweep / "trials.parquet").query("status == 'finished'")["trial_id"]
m = m[m["trial_id"].isin(finished) & m["swap_block"].isna() & m["normalized_score"].notna() & (m["context_len"] == k)]
final = m.sort_values("epoch").groupby("trial_id").tail(1)


def scores(init: str) -> dict:
    """{env: final scores of the seeds of `init`}."""
    return {env: g["normalized_score"].to_numpy() for env, g in final[final["init"] == init].groupby("env")}


effect = compare_groups(scores(a), scores(b))
print(f"K={k}, envs {', '.join(effect.tasks)}, seeds {effect.n_a} ({a}) / {effect.n_b} ({b})")
print(f"final score {a} - {b}: {effect.point:.2f} [95% CI {effect.low:.2f}, {effect.high:.2f}]")
print(f"P({a} > {b}) = {effect.poi:.2f}")
print(f"claim '{a} > {b}': {verdict(effect.low, effect.high, effect.n_seeds)}")
