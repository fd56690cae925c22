"""Score tables: final and best epoch per (init, env, K) with seed CIs, and the papers' tables.

Scores are D4RL normalised scores of the evaluation at an epoch. The *final* score of a
trial is its last evaluated epoch (the papers' protocol reports the 40th epoch); the *best*
epoch score (max over epochs, what Takagi's Table 1 reports) is optimistic and kept apart.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dtsweep.envs import parse_dataset
from dtsweep.report.inputs import MAIN_K, NO_CONTEXT_K, MissingData, no_swap
from dtsweep.stats import iqm, mean_ci

SCORE_COLUMNS = ["n_seeds", "mean", "ci_low", "ci_high", "iqm"]

# Takagi 2022 (NeurIPS), Table 1 "Normalized mean return", D4RL medium datasets, transcribed
# from ../shared/papers/000_bcc896797052afb9.txt. (mean, ±) as printed; the paper does not
# say what ± is (Takagi ran one seed). Reid et al.'s "DT" column is the original Decision
# Transformer (its own architecture), listed against `random` for reference only.
PAPER_TABLE1: dict[tuple[str, str], dict[str, tuple[float, float | None]]] = {
    ("gpt2", "hopper"): {"Reid et al.": (79.1, 1.1), "Takagi": (79.5, 1.3)},
    ("gpt2", "halfcheetah"): {"Reid et al.": (42.8, 0.1), "Takagi": (48.4, 0.0)},
    ("gpt2", "walker2d"): {"Reid et al.": (78.3, 1.5), "Takagi": (71.2, 1.3)},
    ("igpt", "hopper"): {"Reid et al.": (5.7, 1.5), "Takagi": (2.6, 0.3)},
    ("igpt", "halfcheetah"): {"Reid et al.": (1.5, 0.1), "Takagi": (1.3, 0.1)},
    ("igpt", "walker2d"): {"Reid et al.": (0.4, 0.4), "Takagi": (4.3, 1.9)},
    ("random", "hopper"): {"Reid et al.": (67.6, None), "Takagi": (67.7, 3.0)},
    ("random", "halfcheetah"): {"Reid et al.": (42.6, None), "Takagi": (48.6, 0.2)},
    ("random", "walker2d"): {"Reid et al.": (74.0, None), "Takagi": (71.0, 0.5)},
}

# Takagi 2022, Table 2 "Normalized return of K = 1" (medium datasets, one seed).
PAPER_TABLE2: dict[tuple[str, str], float] = {
    ("gpt2", "hopper"): 83.73,
    ("gpt2", "halfcheetah"): 47.7,
    ("gpt2", "walker2d"): 69.0,
    ("random", "hopper"): -0.24,
    ("random", "halfcheetah"): 49.0,
    ("random", "walker2d"): 69.1,
}


def per_trial_scores(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per trial: trial columns, final_epoch/final_score (last evaluated epoch),
    best_epoch/best_score (highest score over evaluated epochs)."""
    evaluated = metrics[metrics["normalized_score"].notna()].sort_values(["trial_id", "epoch"])
    if evaluated.empty:
        raise MissingData("no evaluated epoch in the metrics (normalized_score is empty)")
    final = evaluated.groupby("trial_id").tail(1)
    best_rows = evaluated.groupby("trial_id")["normalized_score"].idxmax()
    best = evaluated.loc[best_rows, ["trial_id", "epoch", "normalized_score"]]
    best = best.rename(columns={"epoch": "best_epoch", "normalized_score": "best_score"})
    out = final.rename(columns={"epoch": "final_epoch", "normalized_score": "final_score"})
    keep = ["trial_id", "init", "env", "dataset", "context_len", "swap_block", "seed", "final_epoch", "final_score"]
    return out[keep].merge(best, on="trial_id").reset_index(drop=True)


def seed_summary(values, n_boot: int, seed: int) -> dict:
    """n_seeds, mean, 95% percentile-bootstrap CI of the mean and IQM of per-seed values."""
    x = np.asarray(values, dtype=float)
    point, low, high = mean_ci(x, n_boot, 0.95, seed)
    return {"n_seeds": len(x), "mean": point, "ci_low": low, "ci_high": high, "iqm": iqm(x)}


def score_table(scores: pd.DataFrame, value: str, keys: list[str], n_boot: int, seed: int) -> pd.DataFrame:
    """Seed summary of `value` per group of `keys`: keys, n_seeds, mean, ci_low, ci_high, iqm.

    When some env was trained on more than one dataset a trailing `dataset` column is added
    (and grouped by), because averaging over datasets would mix different tasks.
    """
    extra = ["dataset"] if scores.groupby("env")["dataset"].nunique().max() > 1 else []
    rows = [
        dict(zip(keys + extra, k)) | seed_summary(g[value], n_boot, seed)
        for k, g in scores.groupby(keys + extra, sort=True)
    ]
    return pd.DataFrame(rows, columns=keys + SCORE_COLUMNS + extra)


def final_scores(scores: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """final_scores.csv: init, env, context_len, n_seeds, mean, ci_low, ci_high, iqm of the
    final-epoch normalised score, over trials without a block swap."""
    return score_table(no_swap(scores), "final_score", ["init", "env", "context_len"], n_boot, seed)


def best_epoch_scores(scores: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """best_epoch_scores.csv: the same for each trial's best epoch (optimistic: the max over
    epochs of a noisy evaluation), plus the mean best epoch."""
    table = score_table(no_swap(scores), "best_score", ["init", "env", "context_len"], n_boot, seed)
    keys = [c for c in ("init", "env", "context_len", "dataset") if c in table.columns]
    epochs = no_swap(scores).groupby(keys)["best_epoch"].mean().rename("mean_best_epoch").reset_index()
    return table.merge(epochs, on=keys)


def swap_scores(scores: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Final-epoch scores of block-swap trials per (init, env, context_len, swap_block)."""
    swaps = scores[scores["swap_block"].notna()]
    if swaps.empty:
        raise MissingData("no block-swap trials (swap_block set) in this sweep")
    swaps = swaps.assign(swap_block=swaps["swap_block"].astype(int))
    return score_table(swaps, "final_score", ["init", "env", "context_len", "swap_block"], n_boot, seed)


def _medium_only(scores: pd.DataFrame) -> pd.DataFrame:
    """The papers' tables are on D4RL medium datasets; use those where the sweep has them."""
    quality = scores["dataset"].map(_quality)
    return scores[quality == "medium"] if (quality == "medium").any() else scores


def _quality(dataset: str) -> str | None:
    try:
        return parse_dataset(dataset)[1]
    except ValueError:
        return None


def _fmt(mean: float, low: float, high: float) -> str:
    return f"{mean:.1f} [{low:.1f}, {high:.1f}]"


def _sweep_cell(sel: pd.DataFrame, value: str, n_boot: int, seed: int) -> tuple[str, str, int]:
    if sel.empty:
        return "not run", "not run", 0
    s = seed_summary(sel[value], n_boot, seed)
    b = seed_summary(sel["best_score"], n_boot, seed)
    return _fmt(s["mean"], s["ci_low"], s["ci_high"]), _fmt(b["mean"], b["ci_low"], b["ci_high"]), s["n_seeds"]


def paper_table1(scores: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Takagi's Table 1 (K=20, medium) beside the sweep's final and best-epoch scores."""
    main = _medium_only(no_swap(scores))
    main = main[main["context_len"] == MAIN_K]
    rows = []
    for (init, env), paper in PAPER_TABLE1.items():
        sel = main[(main["init"] == init) & (main["env"] == env)]
        final, best, n = _sweep_cell(sel, "final_score", n_boot, seed)
        rows.append({
            "init": init, "env": env,
            "Reid et al. [9]": _pm(*paper["Reid et al."]) + (" (DT)" if init == "random" else ""),
            "Takagi (1 seed)": _pm(*paper["Takagi"]),
            "sweep final epoch": final, "sweep best epoch": best, "n_seeds": n,
            "sweep dataset": ", ".join(sorted(sel["dataset"].unique())) or "—",
        })  # fmt: skip
    return pd.DataFrame(rows)


def paper_table2(scores: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Takagi's Table 2 (K=1, medium) beside the sweep's final and best-epoch scores."""
    k1 = _medium_only(no_swap(scores))
    k1 = k1[k1["context_len"] == NO_CONTEXT_K]
    rows = []
    for (init, env), paper in PAPER_TABLE2.items():
        sel = k1[(k1["init"] == init) & (k1["env"] == env)]
        final, best, n = _sweep_cell(sel, "final_score", n_boot, seed)
        rows.append({
            "init": init, "env": env, "Takagi (1 seed)": f"{paper:.2f}",
            "sweep final epoch": final, "sweep best epoch": best, "n_seeds": n,
            "sweep dataset": ", ".join(sorted(sel["dataset"].unique())) or "—",
        })  # fmt: skip
    return pd.DataFrame(rows)


def _pm(mean: float, pm: float | None) -> str:
    return f"{mean:.1f}" if pm is None else f"{mean:.1f} ± {pm:.1f}"
