"""What the report reads from a sweep directory, and what it says when something is missing.

The column names the report relies on are all here, in `DIAGNOSTIC_COLUMNS` and the
constants below, so aligning the report with a changed output schema is a one-place edit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

FINISHED = "finished"  # trials.parquet status of a trial whose final epoch is written
TRIAL_COLUMNS = ["trial_id", "study", "init", "env", "dataset", "context_len", "swap_block", "seed"]
MAIN_K = 20  # context length of the papers' main runs (K=20)
NO_CONTEXT_K = 1  # K=1: the no-context runs, block swaps and attention analysis
ATTENTION_EPOCH = 4  # Takagi compares attention distance at epoch 4 with epoch 0
GRAD_CLIP = 0.25  # max grad norm of both papers; drawn as a line on the gradient figure

# Columns each diagnostic kind must have (besides trial_id and the trial columns) for the
# figures and findings that read it. One row per measured value:
#   cka:       one row per (trial, layer, token): layer "h.3.mlp.c_fc", block 3,
#              token "return" | "state" | "action", cka in [0, 1] (epoch 0 vs final)
#   mine:      one row per (trial, block, position, which): position = token index in
#              the context, token its type, which "X" (I(X;T)) or "Y" (I(Y;T)), mi_nats
#   params:    one row per (trial, tensor): block, l2 distance and cosine similarity of the
#              tensor between epoch 0 and the final epoch
#   gradients: three row types in one file, told apart by which columns are set:
#              per-sample rows (grad_norm before clipping, grad_norm_clipped), one summary
#              row per trial (confusion = minimum pairwise cosine of clipped gradients),
#              per-tensor rows (tensor, share of the gradient norm)
#   attention: one row per (trial, epoch, block, head): distance_tokens, the mean over
#              queries of sum_j attn[i, j] |i - j|
DIAGNOSTIC_COLUMNS: dict[str, list[str]] = {
    "cka": ["layer", "block", "token", "cka"],
    "mine": ["block", "position", "token", "which", "mi_nats"],
    "params": ["tensor", "block", "l2", "cosine"],
    "gradients": ["grad_norm", "grad_norm_clipped", "confusion", "tensor", "share"],
    "attention": ["epoch", "block", "head", "distance_tokens"],
}


class MissingData(Exception):
    """A figure, table or finding cannot be computed; the message says what to run or add."""


@dataclass
class Sweep:
    """The outputs of one sweep, loaded once.

    metrics: one row per (trial, epoch) of the *finished* trials, with the trial columns.
    trials: every trial of the ledger (or, without trials.parquet, those seen in metrics).
    diagnostics: {kind: DataFrame} for the kinds whose file exists.
    notes: what was left out and why, for the report's "missing" section.
    """

    root: Path
    metrics: pd.DataFrame | None
    trials: pd.DataFrame
    diagnostics: dict[str, pd.DataFrame]
    notes: list[str] = field(default_factory=list)
    search: pd.DataFrame | None = None  # search.parquet of search studies, if any

    @classmethod
    def load(cls, sweep_dir: str | Path) -> "Sweep":
        root = Path(sweep_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"sweep directory {root} does not exist")
        notes: list[str] = []
        metrics = _read_metrics(root)
        search = pd.read_parquet(root / "search.parquet") if (root / "search.parquet").exists() else None
        if search is not None and metrics is not None:
            # Samples of a search differ in their settings, not only in their seed: they
            # are not replicates, so they stay out of every seed statistic.
            studies = set(search["study"])
            n = metrics.loc[metrics["study"].isin(studies), "trial_id"].nunique()
            metrics = metrics[~metrics["study"].isin(studies)]
            if n:
                notes.append(f"{n} trials of search studies ({', '.join(sorted(studies))}) are left out of the seed "
                             "statistics; see the `search_objective` figure and search.parquet.")  # fmt: skip
        if (root / "trials.parquet").exists():
            trials = pd.read_parquet(root / "trials.parquet")
            if "status" not in trials.columns:
                trials = trials.assign(status=FINISHED)
                notes.append("`trials.parquet` has no status column: every trial is taken as finished.")
        elif metrics is not None:
            trials = metrics[TRIAL_COLUMNS].drop_duplicates("trial_id").assign(status=FINISHED)
            notes.append("no `trials.parquet`: every trial in the metrics is taken as finished.")
        else:
            trials = pd.DataFrame(columns=TRIAL_COLUMNS + ["status"])

        unfinished = trials[trials["status"] != FINISHED]
        if len(unfinished):
            counts = ", ".join(f"{n} {s}" for s, n in unfinished["status"].value_counts().items())
            notes.append(f"{len(unfinished)} of {len(trials)} trials are not finished ({counts}) and are left out.")
        if metrics is not None:
            metrics = metrics[metrics["trial_id"].isin(trials.loc[trials["status"] == FINISHED, "trial_id"])]
            metrics = metrics.reset_index(drop=True)
            if metrics.empty:
                metrics = None
        if metrics is None:
            notes.append(
                "no finished trial with metrics: run `python -m dtsweep run SPEC` "
                "(metrics.parquet, or metrics/<trial_id>.parquet while a sweep runs)."
            )

        diagnostics = {}
        for kind in DIAGNOSTIC_COLUMNS:
            path = root / "diagnostics" / f"{kind}.parquet"
            if path.exists():
                diagnostics[kind] = _with_trial_columns(pd.read_parquet(path), trials)
                if search is not None and "study" in diagnostics[kind].columns:
                    diagnostics[kind] = diagnostics[kind][~diagnostics[kind]["study"].isin(set(search["study"]))]
        return cls(root, metrics, trials, diagnostics, notes, search)

    def require_metrics(self) -> pd.DataFrame:
        if self.metrics is None:
            raise MissingData(f"needs finished trials in {self.root}: run `python -m dtsweep run SPEC`")
        return self.metrics

    def diag(self, kind: str) -> pd.DataFrame:
        """diagnostics/<kind>.parquet, or MissingData naming the command that writes it.

        Raises MissingData too when a column the report reads is absent (listed in
        DIAGNOSTIC_COLUMNS), so a schema mismatch shows up in the report, not as a KeyError.
        """
        if kind not in self.diagnostics:
            raise MissingData(
                f"needs diagnostics kind '{kind}': run `python -m dtsweep diagnose {self.root} --kinds {kind}`"
            )
        df = self.diagnostics[kind]
        needed = DIAGNOSTIC_COLUMNS[kind] + ["init", "env", "context_len", "swap_block", "seed"]
        absent = [c for c in needed if c not in df.columns]
        if absent:
            raise MissingData(f"diagnostics/{kind}.parquet lacks columns {absent} (has {sorted(df.columns)})")
        return df


def _read_metrics(root: Path) -> pd.DataFrame | None:
    """The compacted metrics.parquet, else the per-trial files of a sweep still running."""
    if (root / "metrics.parquet").exists():
        return pd.read_parquet(root / "metrics.parquet")
    files = sorted((root / "metrics").glob("*.parquet"))
    if not files:
        return None
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def _with_trial_columns(df: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """Add trial columns a diagnostics file lacks (it should carry them; this keeps the
    report working on files written before they were added)."""
    lacking = [c for c in TRIAL_COLUMNS if c not in df.columns and c in trials.columns]
    if not lacking or "trial_id" not in df.columns:
        return df
    return df.merge(trials[["trial_id", *lacking]], on="trial_id", how="left")


def no_swap(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["swap_block"].isna()]


def pick_context_len(df: pd.DataFrame, preferred: int) -> int:
    """`preferred` if some non-swap trial has it, else the context length closest to it."""
    ks = sorted(no_swap(df)["context_len"].dropna().unique())
    if not ks:
        raise MissingData("needs trials without a block swap")
    return int(min(ks, key=lambda k: (abs(k - preferred), -k)))


def by_env(per_trial: pd.DataFrame, value: str, **where) -> dict[str, np.ndarray]:
    """{env: per-seed values [n_seeds]} of `value` in the rows of `per_trial` where every
    `column == value` filter in `where` holds (NaN values dropped, empty envs left out)."""
    sel = per_trial
    for col, val in where.items():
        sel = sel[sel[col] == val]
    out = {str(env): g[value].dropna().to_numpy(float) for env, g in sel.groupby("env")}
    return {env: v for env, v in out.items() if len(v)}
