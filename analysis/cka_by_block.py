"""Mean CKA (epoch 0 vs final) per init and block, state token: a table from diagnostics.

python analysis/cka_by_block.py SWEEP_DIR
"""

import sys
from pathlib import Path

import pandas as pd

sweep = Path(sys.argv[1])
cka = pd.read_parquet(sweep / "diagnostics" / "cka.parquet")
cka = cka[(cka["token"] == "state") & cka["swap_block"].isna()]

# Average the 9 activations of a block per trial first, then the seeds: each seed counts once.
# Studies stay apart (same init, different settings); debiased CKA when the file has it.
value = "cka_debiased" if "cka_debiased" in cka.columns else "cka"
per_trial = cka.groupby(["study", "init", "env", "context_len", "seed", "block"])[value].mean().reset_index()
table = per_trial.pivot_table(index="block", columns=["study", "init", "env"], values=value, aggfunc="mean")
print(f"{value}, state token")
print(table.to_string(float_format="%.3f"))
