"""Per-trial numbers derived from metrics and diagnostics, shared by figures and findings.

Each function takes the long tables of the sweep and returns one row per trial (or per
trial and position), carrying `TRIAL_KEYS`, so that a figure draws exactly what a finding
tests.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from dtsweep.report.inputs import ATTENTION_EPOCH, MissingData, no_swap, pick_context_len

# What identifies a trial and its condition (inputs.CONDITION_COLUMNS): every per-trial table
# carries them, so figures and findings group by condition, never by init name.
TRIAL_KEYS = [
    "trial_id", "study", "init", "init_family", "env", "dataset", "context_len", "swap_block", "seed",
    "config_key", "condition", "variant", "match",
]  # fmt: skip

# Order of the 9 internal activations inside a GPT-2 block (DESIGN §4), for the CKA x-axis.
BLOCK_LAYERS = [
    "ln_1", "attn.c_attn", "attn.c_proj", "attn.resid_dropout",
    "ln_2", "mlp.c_fc", "mlp.act", "mlp.c_proj", "mlp.dropout",
]  # fmt: skip
_LAYER = re.compile(r"h\.(\d+)\.(.+)$")


def runs_at(df: pd.DataFrame, preferred_k: int) -> tuple[pd.DataFrame, int]:
    """Rows of trials without a block swap at context length `preferred_k` (or the closest
    one the table has), and that K."""
    k = pick_context_len(df, preferred_k)
    sel = no_swap(df)
    return sel[sel["context_len"] == k], k


def trial_scalar(df: pd.DataFrame, value: str) -> pd.DataFrame:
    """Mean of column `value` per trial: one row per trial with TRIAL_KEYS and "value"."""
    return df.groupby(TRIAL_KEYS, as_index=False, dropna=False)[value].mean().rename(columns={value: "value"})


# ---- metrics


def curve_mean(metrics: pd.DataFrame, value: str, first_epoch: int, last_epoch: int) -> pd.DataFrame:
    """Mean of `value` over epochs first..last per trial: the area under the learning curve
    divided by its length, a single number for "learns faster" (higher score, lower error)."""
    sel = metrics[metrics["epoch"].between(first_epoch, last_epoch) & metrics[value].notna()]
    return trial_scalar(sel, value)


def ema(curves: np.ndarray, alpha: float) -> np.ndarray:
    """Exponential moving average of each curve of curves [n_seeds, n_epochs] along epochs
    (Takagi smooths Fig. 9 this way); same shape out."""
    by_epoch = pd.DataFrame(np.asarray(curves, dtype=float).T)  # rows are epochs
    return by_epoch.ewm(alpha=alpha, adjust=False).mean().to_numpy().T


# ---- cka


def layer_order(layers: pd.Series) -> list[str]:
    """Layer names in network order: by block, then the order of BLOCK_LAYERS."""

    def key(name: str):
        m = _LAYER.search(name)
        if not m:
            return (10**6, 0, name)
        sub = m.group(2)
        return (int(m.group(1)), BLOCK_LAYERS.index(sub) if sub in BLOCK_LAYERS else len(BLOCK_LAYERS), sub)

    return sorted(layers.unique(), key=key)


def cka_matrix(cka: pd.DataFrame, condition: str, dataset: str, token: str, value: str = "cka") -> tuple[np.ndarray, np.ndarray]:
    """CKA per layer of one (condition, dataset, token): ([n_seeds, n_layers], seeds) in layer
    order; layers some seed lacks are left out."""
    sel = cka[(cka["condition"] == condition) & (cka["dataset"] == dataset) & (cka["token"] == token)]
    wide = sel.pivot_table(index="seed", columns="layer", values=value, aggfunc="mean")
    wide = wide.reindex(columns=layer_order(sel["layer"])).dropna(axis=1)
    return wide.to_numpy(float), wide.index.to_numpy()


def to_reference_layers(m: np.ndarray, n_ref: int) -> tuple[np.ndarray, np.ndarray]:
    """Put a [n_seeds, n_layers] CKA matrix on an n_ref-layer axis, as Takagi did for iGPT.

    A model with k times the reference's layers (iGPT: 216 = 2 x 108) is averaged over
    groups of k adjacent layers starting at layer 0; any other count is placed at
    proportional positions. Returns (x [n], values [n_seeds, n]).
    """
    n = m.shape[1]
    if n > n_ref and n % n_ref == 0:
        k = n // n_ref
        return np.arange(n_ref, dtype=float), m.reshape(m.shape[0], n_ref, k).mean(axis=2)
    return np.arange(n) * (n_ref / n), m


# ---- mine


def middle_blocks(mine: pd.DataFrame) -> dict[str, int]:
    """The middle of the blocks MINE was measured at, per condition (depth differs by init)."""
    out = {}
    for cond, g in mine.groupby("condition"):
        blocks = sorted(int(b) for b in g["block"].unique())
        out[str(cond)] = blocks[len(blocks) // 2]
    return out


def mine_middle(mine: pd.DataFrame) -> pd.DataFrame:
    """MINE rows at each condition's middle measured block."""
    mids = middle_blocks(mine)
    return mine[mine["block"] == mine["condition"].map(mids)]


# ---- gradients (one file, three row types: see inputs.DIAGNOSTIC_COLUMNS)


def gradient_samples(grads: pd.DataFrame) -> pd.DataFrame:
    rows = grads[grads["grad_norm"].notna() & grads["grad_norm_clipped"].notna()]
    if rows.empty:
        raise MissingData("diagnostics/gradients.parquet has no per-sample rows (grad_norm)")
    return rows


def clipped_fraction(grads: pd.DataFrame) -> pd.DataFrame:
    """Per trial: the fraction of per-sample gradients that clipping shortened, i.e. whose
    norm collapses onto the threshold (Takagi 5.4: iGPT's do)."""
    s = gradient_samples(grads)
    return trial_scalar(s.assign(clipped=(s["grad_norm_clipped"] < s["grad_norm"] * (1 - 1e-6)).astype(float)), "clipped")


def confusion(grads: pd.DataFrame) -> pd.DataFrame:
    """Per trial gradient confusion (minimum pairwise cosine of clipped per-sample grads)."""
    rows = grads[grads["confusion"].notna()]
    if rows.empty:
        raise MissingData("diagnostics/gradients.parquet has no confusion rows")
    return trial_scalar(rows, "confusion")


def tensor_shares(grads: pd.DataFrame) -> pd.DataFrame:
    rows = grads[grads["tensor"].notna() & grads["share"].notna()]
    if rows.empty:
        raise MissingData("diagnostics/gradients.parquet has no per-tensor share rows")
    return rows


def first_ln_share(grads: pd.DataFrame) -> pd.DataFrame:
    """Per trial: the share of the gradient norm in block 0's first LayerNorm (weight and
    bias), the tensors Takagi found dominating iGPT's gradient."""
    rows = tensor_shares(grads)
    rows = rows.assign(first_ln=rows["tensor"].str.contains(r"(?:^|\.)0\.ln_1\.", regex=True) * rows["share"])
    return rows.groupby(TRIAL_KEYS, as_index=False, dropna=False)["first_ln"].sum().rename(columns={"first_ln": "value"})


# ---- attention


def attention_gaps(att: pd.DataFrame, epoch: int = ATTENTION_EPOCH) -> tuple[pd.DataFrame, int]:
    """Per (trial, block): |d(epoch) - d(0)| with d the head-mean attention distance (tokens).

    Uses `epoch` when the data has it, else the closest measured epoch above 0. Returns the
    rows (TRIAL_KEYS, block, gap) and the epoch used.
    """
    epochs = sorted(e for e in att["epoch"].unique() if e > 0)
    if 0 not in set(att["epoch"]) or not epochs:
        raise MissingData("attention distances need epoch 0 and a later epoch")
    used = int(min(epochs, key=lambda e: (abs(e - epoch), e)))
    d = att[att["epoch"].isin([0, used])].groupby(TRIAL_KEYS + ["block", "epoch"], dropna=False)["distance_tokens"].mean()
    d = d.unstack("epoch").dropna()
    gaps = (d[used] - d[0]).abs().rename("gap").reset_index()
    return gaps, used


def swap_runs(m: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """(block-swap rows, their unswapped rows at the same K up to the last swap epoch, K).

    The papers swap at one context length (K=1); the most common K of the swap trials is used.
    """
    swaps = m[m["swap_block"].notna()]
    if swaps.empty:
        raise MissingData("needs block-swap trials (swap_block set): add a block-swap study to the sweep and run it")
    k = int(swaps["context_len"].mode().iloc[0])
    swaps = swaps[swaps["context_len"] == k]
    base = no_swap(m)
    base = base[(base["context_len"] == k) & (base["epoch"] <= int(swaps["epoch"].max()))]
    return swaps, base, k
