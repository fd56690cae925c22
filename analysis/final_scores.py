"""Recompute the report's final-score table with plain pandas.

    python analysis/final_scores.py SWEEP_DIR

Final score = the D4RL normalised score at each finished trial's last evaluated epoch;
one row per condition with the number of seeds, mean, std and IQM. A condition is
everything but the seed: the ledger's `config_key` when it has one (else study, init, env,
K), so two studies that differ in a training setting are two rows, never one.
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

keys = ["study", "init", "env", "context_len"]
if "config_key" in trials.columns:
    final = final.merge(trials[["trial_id", "config_key"]], on="trial_id")
    keys.append("config_key")
table = (
    final.groupby(keys)["normalized_score"]
    .agg(n_seeds="count", mean="mean", std="std", iqm=lambda x: trim_mean(x, 0.25))
    .reset_index()
)
print(table.to_string(index=False, float_format="%.2f"))

report_table = sweep / "report" / "tables" / "final_scores.csv"
if report_table.exists():  # the report's means are the same numbers
    ours = table.merge(pd.read_csv(report_table), on=keys, suffixes=("", "_report"))
    print(f"\nlargest |mean - report mean|: {(ours['mean'] - ours['mean_report']).abs().max():.2e}")
