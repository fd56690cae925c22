"""Draw normalised score per epoch, mean ± standard error over seeds, one panel per env.

python analysis/return_curves.py SWEEP_DIR [OUT.png]
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # write files, no window
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

sweep = Path(sys.argv[1])
out = Path(sys.argv[2] if len(sys.argv) > 2 else "return_curves.png")
m = pd.read_parquet(sweep / "metrics.parquet")
finished = pd.read_parquet(sweep / "trials.parquet").query("status == 'finished'")["trial_id"]
m = m[m["trial_id"].isin(finished) & m["swap_block"].isna() & m["normalized_score"].notna()]

# One row per (study, init, env, K, epoch): mean and standard error across seeds. Studies
# stay apart: two studies with the same init and K may differ in a training setting.
curves = (
    m.groupby(["study", "init", "env", "context_len", "epoch"])["normalized_score"].agg(["mean", "sem", "count"]).reset_index()
)
envs = sorted(curves["env"].unique())
fig, axes = plt.subplots(1, len(envs), figsize=(5 * len(envs), 3.5), squeeze=False)
for ax, env in zip(axes[0], envs):
    for (study, init, k), c in curves[curves["env"] == env].groupby(["study", "init", "context_len"]):
        line = ax.plot(c["epoch"], c["mean"], ls="-" if k == 1 else "--", label=f"{init} K={k} [{study}]")[0]
        ax.fill_between(c["epoch"], c["mean"] - c["sem"], c["mean"] + c["sem"], color=line.get_color(), alpha=0.2)
    ax.set(title=env, xlabel="epoch", ylabel="normalised score")
    ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(out, dpi=110)
print(f"wrote {out.resolve()}")
