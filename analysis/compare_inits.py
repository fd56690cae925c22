"""Is init A better than init B at the final epoch? Effect, 95% CI, p-value and a verdict.

    python analysis/compare_inits.py SWEEP_DIR [A B [K]]      (default: gpt2 random 20)

Only conditions that differ in nothing but the init are compared: A and B are compared
within each study that ran both at K (one comparison per study, never pooled). Uses
dtsweep.stats.compare: Welch's t-test stratified by env, the effect is mean(A) - mean(B)
averaged over the envs both ran, and no verdict below stats.MIN_SEEDS seeds.
"""

import sys
from pathlib import Path

import pandas as pd

from dtsweep.stats import compare, probability_of_improvement

sweep = Path(sys.argv[1])
a, b = (sys.argv[2], sys.argv[3]) if len(sys.argv) > 3 else ("gpt2", "random")
k = int(sys.argv[4]) if len(sys.argv) > 4 else 20

m = pd.read_parquet(sweep / "metrics.parquet")
finished = pd.read_parquet(sweep / "trials.parquet").query("status == 'finished'")["trial_id"]
m = m[m["trial_id"].isin(finished) & m["swap_block"].isna() & m["normalized_score"].notna() & (m["context_len"] == k)]
final = m.sort_values("epoch").groupby("trial_id").tail(1)


def scores(study: pd.DataFrame, init: str) -> dict:
    """{env: final scores of the seeds of `init` in one study}."""
    return {env: g["normalized_score"].to_numpy() for env, g in study[study["init"] == init].groupby("env")}


compared = 0
for name, study in final.groupby("study"):
    sa, sb = scores(study, a), scores(study, b)
    if not (set(sa) & set(sb)):
        continue
    d = compare(sa, sb, claimed="greater")
    envs = list(d.envs)
    poi = probability_of_improvement({e: sa[e] for e in envs}, {e: sb[e] for e in envs})
    print(f"study {name}, K={k}, envs {', '.join(envs)}, seeds {d.n_treatment} ({a}) / {d.n_control} ({b})")
    print(f"  final score {a} - {b}: {d.effect:.2f} [95% CI {d.ci_low:.2f}, {d.ci_high:.2f}], p = {d.p_value:.2g} ({d.test})")
    print(f"  P({a} > {b}) = {poi:.2f}; claim '{a} > {b}': {d.verdict}")
    compared += 1
if not compared:
    print(f"no study ran both {a} and {b} at K={k}")
