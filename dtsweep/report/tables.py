"""Score tables: final and best epoch per condition (config_key) with seed CIs, and the papers' tables.

Scores are D4RL normalised scores of the evaluation at an epoch. The *final* score of a
trial is its last evaluated epoch (the papers' protocol reports the 40th epoch); the *best*
epoch score (max over epochs, what Takagi's Table 1 reports) is optimistic and kept apart.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dtsweep.envs import parse_dataset
from dtsweep.report.inputs import MAIN_K, NO_CONTEXT_K, MissingData, no_swap
from dtsweep.report.measures import TRIAL_KEYS
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
    """One row per trial: trial and condition columns (measures.TRIAL_KEYS),
    final_epoch/final_score (last evaluated epoch), best_epoch/best_score (highest score over
    evaluated epochs)."""
    evaluated = metrics[metrics["normalized_score"].notna()].sort_values(["trial_id", "epoch"])
    if evaluated.empty:
        raise MissingData("no evaluated epoch in the metrics (normalized_score is empty)")
    final = evaluated.groupby("trial_id").tail(1)
    best_rows = evaluated.groupby("trial_id")["normalized_score"].idxmax()
    best = evaluated.loc[best_rows, ["trial_id", "epoch", "normalized_score"]]
    best = best.rename(columns={"epoch": "best_epoch", "normalized_score": "best_score"})
    out = final.rename(columns={"epoch": "final_epoch", "normalized_score": "final_score"})
    keep = [*TRIAL_KEYS, "final_epoch", "final_score"]
    return out[keep].merge(best, on="trial_id").reset_index(drop=True)


def seed_summary(values, n_boot: int, seed: int) -> dict:
    """n_seeds, mean, 95% percentile-bootstrap CI of the mean and IQM of per-seed values."""
    x = np.asarray(values, dtype=float)
    point, low, high = mean_ci(x, n_boot, 0.95, seed)
    return {"n_seeds": len(x), "mean": point, "ci_low": low, "ci_high": high, "iqm": iqm(x)}


CONDITION_TABLE_KEYS = ["init", "env", "context_len", "study", "config_key", "dataset"]


def score_table(scores: pd.DataFrame, value: str, n_boot: int, seed: int, extra: list[str] = ()) -> pd.DataFrame:
    """Seed summary of `value` per condition (config_key): CONDITION_TABLE_KEYS, `extra`,
    n_seeds, mean, ci_low, ci_high, iqm; one row per config_key, sorted by study, init, env, K.

    Only seeds are pooled (DESIGN §7): two studies that differ in any training setting have
    different config_keys and never share a row. `study` lists every study that ran the
    condition (a condition listed by two studies is one condition).
    """
    rows = []
    for _key, g in scores.groupby("config_key", sort=False):
        first = g.iloc[0]
        row = {c: first[c] for c in CONDITION_TABLE_KEYS if c != "study"} | {c: first[c] for c in extra}
        row["study"] = ", ".join(sorted(g["study"].astype(str).unique()))
        rows.append(row | seed_summary(g[value], n_boot, seed))
    cols = CONDITION_TABLE_KEYS[:4] + list(extra) + CONDITION_TABLE_KEYS[4:] + SCORE_COLUMNS
    out = pd.DataFrame(rows, columns=cols)
    return out.sort_values(["study", "init", "env", "context_len", *extra], kind="stable").reset_index(drop=True)


def final_scores(scores: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """final_scores.csv: init, env, context_len, study, config_key, dataset, n_seeds, mean,
    ci_low, ci_high, iqm of the final-epoch normalised score per condition, over trials
    without a block swap."""
    return score_table(no_swap(scores), "final_score", n_boot, seed)


def best_epoch_scores(scores: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """best_epoch_scores.csv: the same for each trial's best epoch (optimistic: the max over
    epochs of a noisy evaluation), plus the mean best epoch."""
    table = score_table(no_swap(scores), "best_score", n_boot, seed)
    epochs = no_swap(scores).groupby("config_key")["best_epoch"].mean().rename("mean_best_epoch").reset_index()
    return table.merge(epochs, on="config_key")


def swap_scores(scores: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Final-epoch scores of block-swap trials per condition, with swap_block."""
    swaps = scores[scores["swap_block"].notna()]
    if swaps.empty:
        raise MissingData("no block-swap trials (swap_block set) in this sweep")
    swaps = swaps.assign(swap_block=swaps["swap_block"].astype(int))
    return score_table(swaps, "final_score", n_boot, seed, extra=["swap_block"])


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


def _sweep_cells(sel: pd.DataFrame, n_boot: int, seed: int) -> list[dict]:
    """One dict per condition in `sel`: sweep final and best epoch (mean [CI]), n_seeds, study."""
    if sel.empty:
        return [{"sweep final epoch": "not run", "sweep best epoch": "not run", "n_seeds": 0, "sweep condition": "—",
                 "sweep dataset": "—"}]  # fmt: skip
    out = []
    for _, g in sel.groupby("config_key", sort=True):
        s = seed_summary(g["final_score"], n_boot, seed)
        b = seed_summary(g["best_score"], n_boot, seed)
        out.append({
            "sweep final epoch": _fmt(s["mean"], s["ci_low"], s["ci_high"]),
            "sweep best epoch": _fmt(b["mean"], b["ci_low"], b["ci_high"]),
            "n_seeds": s["n_seeds"], "sweep condition": g["condition"].iloc[0],
            "sweep dataset": g["dataset"].iloc[0],
        })  # fmt: skip
    return out


# The papers' "Random Init" / DT numbers come from the reference code's random model (1 head,
# ReLU), which dtsweep names `random-ref`; `random` is GPT-2's architecture (DESIGN §4).
PAPER_RANDOM = "random-ref"


def random_family(scores: pd.DataFrame) -> str:
    """The family set beside the papers' random column: random-ref when it ran, else random."""
    return PAPER_RANDOM if (scores["init_family"] == PAPER_RANDOM).any() else "random"


def random_note(scores: pd.DataFrame) -> str:
    """What the papers' random rows are compared with, for the tables' header."""
    if random_family(scores) == PAPER_RANDOM:
        return ("The papers' random rows (Takagi's \"Random Init\", from the reference code: 1 head, ReLU) sit beside "
                "this sweep's `random-ref` trials, the same architecture.")  # fmt: skip
    return ("**Only `random` (GPT-2's architecture: 12 heads, GELU) ran in this sweep, not `random-ref`:** the papers' "
            "random rows come from the reference code's 1-head ReLU model, so those rows compare different models.")  # fmt: skip


def _paper_rows(scores: pd.DataFrame, k: int, keys, n_boot: int, seed: int) -> list[tuple[str, str, dict]]:
    """(paper init, env, sweep cell) per paper row and matching condition: paper init gpt2/igpt
    matches trials by init_family (a local model directory counts), random by random_family."""
    main = _medium_only(no_swap(scores))
    main = main[main["context_len"] == k]
    rand = random_family(scores) if len(scores) else "random"
    out = []
    for init, env in keys:
        family = rand if init == "random" else init
        sel = main[(main["init_family"] == family) & (main["env"] == env)]
        out += [(init, env, {"sweep family": family} | cell) for cell in _sweep_cells(sel, n_boot, seed)]
    return out


def paper_table1(scores: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Takagi's Table 1 (K=20, medium) beside the sweep's final and best-epoch scores, one row
    per paper row and sweep condition of the same family (see random_note for random)."""
    rows = []
    for init, env, cell in _paper_rows(scores, MAIN_K, PAPER_TABLE1, n_boot, seed):
        paper = PAPER_TABLE1[(init, env)]
        rows.append({
            "init": init, "env": env,
            "Reid et al. [9]": _pm(*paper["Reid et al."]) + (" (DT)" if init == "random" else ""),
            "Takagi (1 seed)": _pm(*paper["Takagi"]),
        } | cell)  # fmt: skip
    return pd.DataFrame(rows)


def paper_table2(scores: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Takagi's Table 2 (K=1, medium) beside the sweep's final and best-epoch scores."""
    rows = [
        {"init": init, "env": env, "Takagi (1 seed)": f"{PAPER_TABLE2[(init, env)]:.2f}"} | cell
        for init, env, cell in _paper_rows(scores, NO_CONTEXT_K, PAPER_TABLE2, n_boot, seed)
    ]
    return pd.DataFrame(rows)


def _pm(mean: float, pm: float | None) -> str:
    return f"{mean:.1f}" if pm is None else f"{mean:.1f} ± {pm:.1f}"
