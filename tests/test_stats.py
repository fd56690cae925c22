"""Seed statistics on cases with known answers."""

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from dtsweep.stats import (
    bootstrap_band,
    combine_verdicts,
    compare_groups,
    iqm,
    mean_ci,
    probability_of_improvement,
    stratified_bootstrap_ci,
    verdict,
)


def test_iqm_known_values():
    assert iqm(np.arange(8)) == pytest.approx(3.5)  # keeps 2, 3, 4, 5
    assert iqm([-1000, 1, 2, 3, 4, 5, 6, 1000]) == pytest.approx(3.5)  # outliers are cut
    assert iqm(np.arange(5)) == pytest.approx(2.0)  # int(5/4) = 1 cut from each end
    assert iqm(np.full((3, 4), 7.0)) == pytest.approx(7.0)  # any shape, flattened
    with pytest.raises(ValueError):
        iqm([])


def test_bootstrap_point_is_the_statistic_and_is_deterministic():
    x = {"hopper": np.array([1.0, 2.0, 3.0, 10.0])}
    stat = lambda d: float(np.mean(d["hopper"]))  # noqa: E731
    point, low, high = stratified_bootstrap_ci(x, stat, n_boot=500, seed=3)
    assert point == pytest.approx(4.0)
    assert 1.0 <= low < point < high <= 10.0
    assert stratified_bootstrap_ci(x, stat, n_boot=500, seed=3) == (point, low, high)


def test_bootstrap_resamples_within_strata():
    # Stratum a is all 0 and b all 1 with 4 runs each: any within-stratum resample keeps
    # the pooled mean at exactly 0.5, whereas pooling the strata would make it vary.
    scores = {"a": np.zeros(4), "b": np.ones(4)}
    pooled_mean = lambda d: float(np.concatenate(list(d.values())).mean())  # noqa: E731
    assert stratified_bootstrap_ci(scores, pooled_mean, n_boot=300) == (0.5, 0.5, 0.5)


def test_vectorised_mean_paths_equal_the_generic_bootstrap():
    rng = np.random.default_rng(4)
    x = rng.normal(size=7)
    generic = stratified_bootstrap_ci({"x": x}, lambda d: float(d["x"].mean()), n_boot=500, seed=9)
    np.testing.assert_allclose(mean_ci(x, n_boot=500, seed=9), generic, rtol=1e-12)

    a = {"hopper": rng.normal(size=5), "walker2d": rng.normal(size=4)}
    b = {"hopper": rng.normal(size=6), "walker2d": rng.normal(size=3)}
    strata = {f"a/{t}": a[t] for t in sorted(a)} | {f"b/{t}": b[t] for t in sorted(b)}

    def mean_difference(d):
        return float(np.mean([d[f"a/{t}"].mean() - d[f"b/{t}"].mean() for t in sorted(a)]))

    generic = stratified_bootstrap_ci(strata, mean_difference, n_boot=500, seed=9)
    eff = compare_groups(a, b, n_boot=500, seed=9)
    np.testing.assert_allclose((eff.point, eff.low, eff.high), generic, rtol=1e-12)


def test_bootstrap_accepts_a_runs_by_tasks_frame():
    frame = pd.DataFrame({"hopper": [1.0, 2.0, np.nan], "walker2d": [3.0, 4.0, 5.0]})
    lengths = lambda d: float(len(d["hopper"]) * 10 + len(d["walker2d"]))  # noqa: E731
    assert stratified_bootstrap_ci(frame, lengths, n_boot=10)[0] == 23.0  # NaN run dropped


def test_bootstrap_ci_covers_the_true_mean_at_about_the_nominal_rate():
    rng = np.random.default_rng(0)
    mean = lambda d: float(d["t"].mean())  # noqa: E731
    hits = 0
    n_datasets = 200
    for i in range(n_datasets):
        _, low, high = stratified_bootstrap_ci({"t": rng.normal(5.0, 2.0, 30)}, mean, n_boot=400, seed=i)
        hits += low <= 5.0 <= high
    # The percentile bootstrap under-covers slightly at n=30 (about 0.93); 200 draws give
    # a binomial standard error of about 0.017.
    assert 0.87 <= hits / n_datasets <= 0.99


def test_probability_of_improvement_known_values():
    assert probability_of_improvement([5, 6, 7], [1, 2]) == 1.0
    assert probability_of_improvement([1, 2], [5, 6, 7]) == 0.0
    assert probability_of_improvement([3, 3], [3, 3]) == 0.5
    # pairs: 1v1.5 lose, 1v2 lose, 2v1.5 win, 2v2 tie -> (1 + 0.5) / 4
    assert probability_of_improvement([1, 2], [1.5, 2]) == pytest.approx(0.375)
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 5, 9), rng.integers(0, 5, 7)  # many ties
    u = scipy.stats.mannwhitneyu(x, y, alternative="greater").statistic
    assert probability_of_improvement(x, y) == pytest.approx(u / (9 * 7))
    # per-task values are averaged over tasks
    per_task = probability_of_improvement({"a": [2, 3], "b": [0]}, {"a": [1], "b": [1]})
    assert per_task == pytest.approx(0.5)


def test_verdict_rule():
    assert verdict(0.1, 2.0, 5) == "supported"
    assert verdict(-2.0, -0.1, 5) == "contradicted"
    assert verdict(-0.1, 2.0, 5) == "inconclusive"
    assert verdict(-2.0, -0.1, 5, claimed="less") == "supported"
    assert verdict(0.1, 2.0, 2) == "inconclusive"  # too few seeds, whatever the CI
    assert verdict(float("nan"), 1.0, 5) == "inconclusive"
    with pytest.raises(ValueError):
        verdict(0.1, 2.0, 5, claimed="bigger")
    assert combine_verdicts(["supported", "supported"]) == "supported"
    assert combine_verdicts(["supported", "inconclusive"]) == "inconclusive"
    assert combine_verdicts(["supported", "contradicted"]) == "contradicted"


def test_compare_groups_finds_known_effects():
    rng = np.random.default_rng(2)
    envs = ("hopper", "walker2d")
    better = {e: rng.normal(80, 2, 5) for e in envs}
    worse = {e: rng.normal(60, 2, 5) for e in envs}
    eff = compare_groups(better, worse, n_boot=500)
    assert eff.point == pytest.approx(np.mean([better[e].mean() - worse[e].mean() for e in envs]))
    assert 15 < eff.low < eff.point < eff.high < 25
    assert eff.poi == 1.0 and eff.n_seeds == 5 and eff.tasks == envs
    assert verdict(eff.low, eff.high, eff.n_seeds) == "supported"

    same = compare_groups(worse, {e: worse[e][::-1] for e in envs}, n_boot=500)
    assert same.point == pytest.approx(0.0, abs=1e-12) and same.low < 0 < same.high
    assert verdict(same.low, same.high, same.n_seeds) == "inconclusive"

    with pytest.raises(ValueError):
        compare_groups({"hopper": [1.0]}, {"walker2d": [1.0]})


def test_bootstrap_band_shapes_and_ordering():
    curves = np.array([[0.0, 1.0, 2.0], [2.0, 3.0, 4.0], [1.0, 2.0, 3.0]])
    mean, low, high = bootstrap_band(curves, n_boot=200)
    np.testing.assert_allclose(mean, [1.0, 2.0, 3.0])
    assert np.all(low <= mean) and np.all(mean <= high) and np.all(high - low > 0)
    one_seed = bootstrap_band(curves[:1])
    np.testing.assert_allclose(one_seed[1], one_seed[2])
