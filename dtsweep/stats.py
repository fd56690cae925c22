"""Seed statistics: IQM, stratified bootstrap CIs, probability of improvement, verdicts.

The estimators follow rliable (Agarwal et al., "Deep RL at the Edge of the Statistical
Precipice", NeurIPS 2021), written here on numpy/scipy. `rliable` 1.2.0 itself does not work
with the project's pins: it pulls arch<8, statsmodels, seaborn and absl-py, and its bootstrap
fails at import with pandas 3 (arch 7.2) or at construction with arch 8. Its IQM and
probability of improvement agree with the functions below to the last digit.

Vocabulary: a *task* (stratum) is one cell that seeds are drawn within, e.g. one env; a
*run* is one seed of one trial; scores are per-run scalars (a normalised score, a mean CKA).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.stats

ScoresByTask = Mapping[str, np.ndarray] | pd.DataFrame

SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"
MIN_SEEDS = 3  # fewer seeds per group than this and no verdict is given


def iqm(x) -> float:
    """Interquartile mean of x (any shape, flattened): the mean of the middle 50% of values.

    As rliable: scipy's trim_mean with 25% cut from each end, so for n not divisible by 4
    int(n / 4) values are dropped from each end.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("iqm of an empty array")
    return float(scipy.stats.trim_mean(x, proportiontocut=0.25))


def _as_task_dict(scores_by_task: ScoresByTask) -> dict[str, np.ndarray]:
    """Normalise the input to {task: float array [n_runs, ...]}.

    A DataFrame is read the rliable way: rows are runs, columns are tasks; NaN cells (a task
    with fewer seeds) are dropped per column.
    """
    if isinstance(scores_by_task, pd.DataFrame):
        tasks = {str(c): scores_by_task[c].dropna().to_numpy(np.float64) for c in scores_by_task}
    else:
        tasks = {str(k): np.asarray(v, dtype=np.float64) for k, v in scores_by_task.items()}
    empty = [k for k, v in tasks.items() if len(v) == 0]
    if not tasks or empty:
        raise ValueError(f"every task needs at least one run; empty: {empty or 'all'}")
    return tasks


def stratified_bootstrap_ci(
    scores_by_task: ScoresByTask,
    statistic: Callable[[dict[str, np.ndarray]], float],
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Percentile bootstrap CI of `statistic`, resampling runs within each task (stratum).

    scores_by_task: {task: array [n_runs_task, ...]} (runs along axis 0; tasks may have
    different numbers of runs) or a DataFrame with runs as rows and tasks as columns.
    statistic: maps a dict of the same shape to a float, e.g.
    `lambda d: iqm(np.concatenate(list(d.values())))`.
    Returns (point, low, high): the statistic on the data and the (1-ci)/2, (1+ci)/2
    percentiles of n_boot resampled statistics. Deterministic for a given seed.
    """
    tasks = _as_task_dict(scores_by_task)
    idx = _draw(tasks, n_boot, seed)
    boots = np.array([statistic({k: v[idx[k][b]] for k, v in tasks.items()}) for b in range(n_boot)])
    low, high = _percentiles(boots, ci)
    return float(statistic(tasks)), low, high


def _draw(tasks: dict[str, np.ndarray], n_boot: int, seed: int) -> dict[str, np.ndarray]:
    """Resampling indices, one [n_boot, n_runs] matrix per task, drawn in the tasks' order
    (the vectorised mean paths below draw exactly the same resamples)."""
    rng = np.random.default_rng(seed)
    return {k: rng.integers(0, len(v), size=(n_boot, len(v))) for k, v in tasks.items()}


def _percentiles(boots: np.ndarray, ci: float) -> tuple[float, float]:
    low, high = np.percentile(boots, [50 * (1 - ci), 50 * (1 + ci)])
    return float(low), float(high)


def mean_ci(x, n_boot: int = 2000, ci: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of per-seed values x [n_seeds]: the percentile bootstrap CI of the
    mean. Equals stratified_bootstrap_ci({"x": x}, mean) draw for draw, vectorised."""
    tasks = _as_task_dict({"x": x})
    v = tasks["x"]
    boots = v[_draw(tasks, n_boot, seed)["x"]].mean(axis=1)
    low, high = _percentiles(boots, ci)
    return float(v.mean()), low, high


def probability_of_improvement(x, y) -> float:
    """P(X > Y) + 0.5 P(X = Y) over all pairs of runs of X and Y (Mann-Whitney U / (n m)).

    x, y: 1-D arrays of per-run scores of two algorithms on one task, or two dicts
    {task: array} with the same tasks, in which case the per-task values are averaged (as
    rliable does). 1.0 means every run of X beats every run of Y.
    """
    if isinstance(x, Mapping):
        if set(x) != set(y):
            raise ValueError(f"tasks differ: {sorted(x)} vs {sorted(y)}")
        return float(np.mean([probability_of_improvement(x[k], y[k]) for k in x]))
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.size == 0 or y.size == 0:
        raise ValueError("probability_of_improvement needs runs on both sides")
    greater = (x[:, None] > y[None, :]).mean()
    ties = (x[:, None] == y[None, :]).mean()
    return float(greater + 0.5 * ties)


def verdict(
    effect_low: float,
    effect_high: float,
    n_seeds: int,
    *,
    claimed: str = "greater",
    min_seeds: int = MIN_SEEDS,
) -> str:
    """The rule that turns an effect CI into a verdict on a claim.

    The effect is oriented so that the claim says effect > 0 (claimed="greater") or
    effect < 0 (claimed="less"). n_seeds is the smallest number of seeds in any group the
    effect compares.
    - fewer than `min_seeds` seeds: "inconclusive" (a CI from 1-2 seeds means nothing);
    - the CI lies entirely on the claimed side of 0: "supported";
    - the CI lies entirely on the other side of 0: "contradicted";
    - the CI contains 0: "inconclusive".
    """
    if claimed not in ("greater", "less"):
        raise ValueError(f"claimed must be 'greater' or 'less', not {claimed!r}")
    if not (np.isfinite(effect_low) and np.isfinite(effect_high)) or n_seeds < min_seeds:
        return INCONCLUSIVE
    sign = 1.0 if claimed == "greater" else -1.0
    low, high = sorted((sign * effect_low, sign * effect_high))
    if low > 0:
        return SUPPORTED
    if high < 0:
        return CONTRADICTED
    return INCONCLUSIVE


def combine_verdicts(verdicts: list[str]) -> str:
    """A claim made of several comparisons: contradicted if any part is contradicted,
    supported if every part is supported, inconclusive otherwise."""
    if not verdicts:
        return INCONCLUSIVE
    if CONTRADICTED in verdicts:
        return CONTRADICTED
    if all(v == SUPPORTED for v in verdicts):
        return SUPPORTED
    return INCONCLUSIVE


@dataclass(frozen=True)
class Effect:
    """Difference of group means, averaged over the tasks both groups share."""

    point: float
    low: float
    high: float
    poi: float  # probability that a run of A beats a run of B, averaged over tasks
    n_a: int  # fewest seeds of A in any shared task
    n_b: int
    tasks: tuple[str, ...]

    @property
    def n_seeds(self) -> int:
        return min(self.n_a, self.n_b)


def compare_groups(
    a_by_task: Mapping[str, np.ndarray],
    b_by_task: Mapping[str, np.ndarray],
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> Effect:
    """Effect of A over B: mean over shared tasks of (mean(A_task) - mean(B_task)).

    a_by_task, b_by_task: {task: per-seed scores [n_seeds]}. The groups are independent
    samples, so the bootstrap resamples A's and B's seeds separately within each task
    (a stratified bootstrap over (group, task) strata; the same resamples as
    stratified_bootstrap_ci over those strata, vectorised). Raises ValueError when the
    groups share no task.
    """
    tasks = tuple(sorted(set(a_by_task) & set(b_by_task)))
    if not tasks:
        raise ValueError(f"no shared task: A has {sorted(a_by_task)}, B has {sorted(b_by_task)}")
    strata = _as_task_dict({f"a/{t}": a_by_task[t] for t in tasks} | {f"b/{t}": b_by_task[t] for t in tasks})
    idx = _draw(strata, n_boot, seed)
    means = {k: v[idx[k]].mean(axis=1) for k, v in strata.items()}  # [n_boot] per stratum
    boots = np.mean([means[f"a/{t}"] - means[f"b/{t}"] for t in tasks], axis=0)
    low, high = _percentiles(boots, ci)
    point = float(np.mean([strata[f"a/{t}"].mean() - strata[f"b/{t}"].mean() for t in tasks]))
    poi = probability_of_improvement({t: a_by_task[t] for t in tasks}, {t: b_by_task[t] for t in tasks})
    n_a = min(len(a_by_task[t]) for t in tasks)
    n_b = min(len(b_by_task[t]) for t in tasks)
    return Effect(point, low, high, poi, n_a, n_b, tasks)


def bootstrap_band(
    values, n_boot: int = 1000, ci: float = 0.95, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean curve and percentile-bootstrap band across seeds, for plotting.

    values: [n_seeds, n_points] (a curve per seed, e.g. score per epoch). Seeds are
    resampled as whole curves. Returns (mean, low, high), each [n_points].
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or v.shape[0] == 0:
        raise ValueError(f"values must be [n_seeds >= 1, n_points], got {v.shape}")
    idx = np.random.default_rng(seed).integers(0, v.shape[0], size=(n_boot, v.shape[0]))
    boots = v[idx].mean(axis=1)  # [n_boot, n_points]
    low, high = np.percentile(boots, [50 * (1 - ci), 50 * (1 + ci)], axis=0)
    return v.mean(axis=0), low, high
