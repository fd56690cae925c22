"""Recompute the report's final-score table with plain pandas.

    python analysis/final_scores.py SWEEP_DIR

Final score = the D4RL normalised score at each finished trial's last evaluated epoch;
one row per (init, env, context_len) with the number of seeds, mean, std and IQM.
"""

import sys
from pathlib import Path

import pandas as pd
from scipy.stats import trim_mean

sweep = Path(sys.argv[1])
metrics = pd.read_parquet(sweep / "metrics.parquet")
trials = pd.read_parquet(sweep / "trials.parquet")

finished = trials.loc[trials["status"] == "finished", "trial_id"]
m = metrics[metrics["trial_id"].isin(finished) & metrics["swap_block"].isna() & metrics["normalized_score"].notna()]
final = m.sort_values("epoch").groupby("trial_id").tail(1)  # last evaluated epoch of each trial

table = (
    final.groupby(["init", "env", "context_len"])["normalized_score"]
    .agg(n_seeds="count", mean="mean", std="std", iqm=lambda x: trim_mean(x, 0.25))
    .reset_index()
)
print(table.to_string(index=False, float_format="%.2f"))

report_table = sweep / "report" / "tables" / "final_scores.csv"
if report_table.exists():  # the report's means are the same numbers
    ours = table.merge(pd.read_csv(report_table), on=["init", "env", "context_len"], suffixes=("", "_report"))
    print(f"\nlargest |mean - report mean|: {(ours['mean'] - ours['mean_report']).abs().max():.2e}")
