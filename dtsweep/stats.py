"""Seed statistics: IQM, stratified bootstrap CIs, probability of improvement, verdicts.

The estimators follow rliable (Agarwal et al., "Deep RL at the Edge of the Statistical
Precipice", NeurIPS 2021), written here on numpy/scipy. `rliable` 1.2.0 itself does not work
with the project's pins: it pulls arch<8, statsmodels, seaborn and absl-py, and its bootstrap
fails at import with pandas 3 (arch 7.2) or at construction with arch 8. Its IQM and
probability of improvement agree with the functions below to the last digit.

Vocabulary: a *task* (stratum) is one cell that seeds are drawn within, e.g. one env; a
*run* is one seed of one trial; scores are per-run scalars (a normalised score, a mean CKA).

Verdicts (`compare`, `decide`, `combine`). The effect of a treatment over a control is the
mean over the envs both have of (mean of treatment seeds - mean of control seeds). It is
tested with a Welch t-test stratified by env: its variance is the sum of the per-group
s^2 / n (over the envs, divided by n_envs^2) and its degrees of freedom are Welch-Satterthwaite's.
The (1 - alpha) CI is that test inverted, so the CI excludes 0 exactly when p < alpha. A claim
("treatment > control" or "<") is *supported* when the two-sided test is significant with the
effect on the claimed side, *contradicted* when significant on the other side, *inconclusive*
otherwise, and always inconclusive with fewer than MIN_SEEDS seeds in any group compared.
Why not the percentile bootstrap CI of the difference: with 3-10 seeds it is too narrow (it
ignores the uncertainty in the spread), and under no effect it gave a verdict in 19.8% of
comparisons at 3 seeds, 11.5% at 5 and 9.2% at 10 instead of 5%. The Welch test holds the
rate at or below alpha, within Monte-Carlo error, with 5 and 10 seeds, 1 and 3 envs, normal,
lognormal, exponential and t(3) scores (benchmarks/verdicts.py measures it, 2,000 comparisons
a cell; tests/test_stats.py keeps it); with very unequal spreads at 5 seeds it reaches about
0.053. The bootstrap functions remain for descriptive CIs only.
Multiplicity: a finding made of several comparisons is decided on Holm-adjusted p-values
(`combine`), supported when every part is and contradicted when any part is, so under no
effect the finding gets a verdict at most alpha of the time however many parts it has.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.stats

ScoresByTask = Mapping[str, np.ndarray] | pd.DataFrame

SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"
MIN_SEEDS = 5  # fewer seeds in any group compared (in any env) and the verdict is inconclusive


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
    """The old rule that turned a bootstrap effect CI into a verdict; kept for old callers.

    Superseded by `compare`/`decide`: fed percentile bootstrap CIs of 3-10 seeds, this rule
    gives a verdict far more often than 5% of the time when there is no effect (see the
    module docstring). Do not use it to decide a claim.

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
    supported if every part is supported, inconclusive otherwise.

    Superseded by `combine`, which corrects the parts for multiplicity (Holm) first; this one
    does not, so its error rate grows with the number of parts.
    """
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


def bootstrap_band(values, n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


# --- Verdicts: a calibrated test per comparison, Holm across the parts of a finding ---------

Scores = np.ndarray | Sequence[float] | Mapping[str, np.ndarray | Sequence[float]]


@dataclass(frozen=True)
class Decision:
    """The verdict on one comparison of treatment with control, and the numbers behind it."""

    verdict: str  # "supported" | "contradicted" | "inconclusive"
    effect: float  # mean over shared envs of (mean(treatment_env) - mean(control_env)); not flipped by `claimed`
    ci_low: float  # (1 - alpha) confidence interval of `effect`: excludes 0 exactly when p_value < alpha
    ci_high: float
    p_value: float  # two-sided p-value of "no difference"
    test: str  # the test used, e.g. "Welch t, stratified by env"
    n_treatment: int  # fewest treatment seeds in any shared env
    n_control: int
    envs: tuple[str, ...]
    claimed: str = "greater"  # the claimed side, so that `combine` can re-decide the part
    alpha: float = 0.05  # the level of `verdict` and of the CI


def _check(claimed: str, alpha: float) -> None:
    if claimed not in ("greater", "less"):
        raise ValueError(f"claimed must be 'greater' or 'less', not {claimed!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")


def _by_env(scores: Scores, side: str) -> dict[str, np.ndarray]:
    """{env: finite-or-inf float scores [n_seeds]}, NaN (a missing run) dropped; a bare 1-D
    array is one env named ""."""
    items = scores.items() if isinstance(scores, Mapping) else [("", scores)]
    out = {}
    for env, v in items:
        v = np.asarray(v, dtype=np.float64)
        if v.ndim != 1:
            raise ValueError(f"{side} scores of env {env!r} must be 1-D [n_seeds], got shape {v.shape}")
        out[str(env)] = v[~np.isnan(v)]
    return out


def _verdict(effect: float, p_value: float, n: int, claimed: str, alpha: float) -> str:
    if n < MIN_SEEDS or not (np.isfinite(effect) and p_value < alpha):  # NaN p compares False
        return INCONCLUSIVE
    on_claimed_side = effect > 0 if claimed == "greater" else effect < 0
    return SUPPORTED if on_claimed_side else CONTRADICTED


def compare(treatment: Scores, control: Scores, *, claimed: str = "greater", alpha: float = 0.05) -> Decision:
    """Test the claim "treatment > control" (claimed="greater") or "<" (claimed="less").

    treatment, control: per-seed scores, either 1-D arrays [n_seeds] or dicts
    {env: 1-D array [n_seeds]} (both the same kind). With dicts the effect is stratified by
    env: the mean over the envs both sides have of the difference of the env means, in the
    scores' units; an env present on one side only is ignored, and no shared env raises
    ValueError. NaN scores are missing runs and are dropped before counting seeds.

    The test is Welch's t stratified by env (module docstring); the CI is its inversion at
    level 1 - alpha. Verdict: inconclusive with fewer than MIN_SEEDS seeds in any compared
    group; otherwise supported / contradicted when p < alpha with the effect on the claimed /
    other side, inconclusive when p >= alpha.

    Degenerate input never raises:
    - a group with fewer than 2 seeds in some env: no variance, so p and the CI are NaN and
      the verdict is inconclusive (the effect is NaN too when a group has no seed);
    - no spread in any group: the limit of the t-test as the spread goes to 0, i.e. p = 1 and
      CI (0, 0) when the effect is 0, p = 0 and CI (effect, effect) otherwise;
    - an infinite score: the effect is not finite, p is NaN, inconclusive.
    """
    _check(claimed, alpha)
    if isinstance(treatment, Mapping) != isinstance(control, Mapping):
        raise ValueError("treatment and control must both be dicts {env: scores} or both arrays")
    t_by_env, c_by_env = _by_env(treatment, "treatment"), _by_env(control, "control")
    envs = tuple(sorted(set(t_by_env) & set(c_by_env)))
    if not envs:
        raise ValueError(f"no shared env: treatment has {sorted(t_by_env)}, control has {sorted(c_by_env)}")
    groups = [t_by_env[e] for e in envs] + [c_by_env[e] for e in envs]
    n_t, n_c = min(len(t_by_env[e]) for e in envs), min(len(c_by_env[e]) for e in envs)
    test = "Welch t, stratified by env" if len(envs) > 1 else "Welch t"
    nan = float("nan")

    def decision(effect: float, low: float, high: float, p: float) -> Decision:
        return Decision(_verdict(effect, p, min(n_t, n_c), claimed, alpha),
                        effect, low, high, p, test, n_t, n_c, envs, claimed, alpha)  # fmt: skip

    if min(n_t, n_c) == 0:
        return decision(nan, nan, nan, nan)
    with np.errstate(invalid="ignore", over="ignore"):  # inf scores: reported as a NaN p below
        means = np.array([g.mean() for g in groups])
        effect = float(np.mean(means[: len(envs)] - means[len(envs) :]))
        if min(n_t, n_c) < 2:
            return decision(effect, nan, nan, nan)
        n = np.array([len(g) for g in groups], dtype=np.float64)
        # Variance of each group's share of the effect: s^2 / n / n_envs^2.
        v = np.array([g.var(ddof=1) for g in groups]) / n / len(envs) ** 2
        var = float(v.sum())
    if not (np.isfinite(effect) and np.isfinite(var)):
        return decision(effect, nan, nan, nan)
    if var == 0.0:
        return decision(effect, 0.0, 0.0, 1.0) if effect == 0.0 else decision(effect, effect, effect, 0.0)
    se = np.sqrt(var)
    df = var**2 / float(np.sum(v**2 / (n - 1)))  # Welch-Satterthwaite
    p = float(min(1.0, 2.0 * scipy.stats.t.sf(abs(effect) / se, df)))
    half = float(scipy.stats.t.ppf(1.0 - alpha / 2.0, df) * se)
    return decision(effect, effect - half, effect + half, p)


def decide(treatment: Scores, control: Scores, *, claimed: str = "greater", alpha: float = 0.05) -> str:
    """The verdict alone: compare(treatment, control, claimed=claimed, alpha=alpha).verdict."""
    return compare(treatment, control, claimed=claimed, alpha=alpha).verdict


def holm(p_values, alpha: float = 0.05) -> np.ndarray:
    """Holm-adjusted p-values [m], in the order of `p_values` [m].

    adjusted p_(i) = max over j <= i of min(1, (m - j + 1) p_(j)) in ascending order, so
    rejecting where adjusted < alpha is Holm's step-down test: under any dependence, the
    chance of rejecting any true null is at most alpha. The adjusted values do not depend on
    alpha; it is only checked to lie in (0, 1), for callers that pass their level along. A NaN
    p-value (a comparison that could not be tested) counts as one of the m comparisons and
    stays NaN.
    """
    _check("greater", alpha)
    p = np.asarray(p_values, dtype=np.float64).ravel()
    m = p.size
    filled = np.where(np.isnan(p), 1.0, p)
    order = np.argsort(filled, kind="stable")
    stepped = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * filled[order]))
    adjusted = np.empty(m)
    adjusted[order] = stepped
    adjusted[np.isnan(p)] = np.nan
    return adjusted


def combine(decisions: Sequence[Decision], *, alpha: float = 0.05) -> tuple[str, list[str]]:
    """The verdict on a claim made of several comparisons: (finding verdict, per-part verdicts).

    Each part is re-decided on its Holm-adjusted p-value at level alpha (same rule as
    `compare`: seeds, then significance, then side), in the order given. The claim is
    supported when every part is supported, contradicted when any part is contradicted,
    inconclusive otherwise (and when there are no parts). Under no effect in any part it
    gets a verdict at most alpha of the time.
    """
    _check("greater", alpha)
    adjusted = holm([d.p_value for d in decisions], alpha)
    parts = [_verdict(d.effect, p, min(d.n_treatment, d.n_control), d.claimed, alpha)
             for d, p in zip(decisions, adjusted)]  # fmt: skip
    if CONTRADICTED in parts:
        return CONTRADICTED, parts
    if parts and all(v == SUPPORTED for v in parts):
        return SUPPORTED, parts
    return INCONCLUSIVE, parts
