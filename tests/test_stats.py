"""Seed statistics on cases with known answers."""

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from dtsweep.stats import (
    MIN_SEEDS,
    Decision,
    bootstrap_band,
    combine,
    combine_verdicts,
    compare,
    compare_groups,
    decide,
    holm,
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


def test_old_verdict_rule_kept_for_compatibility():
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


# --- Calibrated verdicts --------------------------------------------------------------------

ALPHA = 0.05
N_NULL = 1000
# A rule whose true null verdict rate is alpha exceeds this bound on a fresh seed only 1% of
# the time (one-sided binomial, 2.33 standard errors of 0.0069 at n = 1000): the seeds below
# are fixed, so the bound is a tolerance on the simulation, not a source of flakiness.
NULL_BOUND = ALPHA + 2.33 * np.sqrt(ALPHA * (1 - ALPHA) / N_NULL)


def _null_rate(draw, n_seeds, n_envs, seed, rule):
    rng = np.random.default_rng(seed)
    calls = 0
    for _ in range(N_NULL):
        t = {f"env{e}": draw(rng, n_seeds) for e in range(n_envs)}
        c = {f"env{e}": draw(rng, n_seeds) for e in range(n_envs)}
        calls += rule(t, c) != "inconclusive"
    return calls / N_NULL


def _old_rule(t, c):
    eff = compare_groups(t, c, n_boot=500)
    return verdict(eff.low, eff.high, eff.n_seeds, min_seeds=3)


@pytest.mark.parametrize(
    "name, draw, n_envs",
    [
        ("normal", lambda rng, n: rng.normal(50.0, 10.0, n), 1),
        ("normal", lambda rng, n: rng.normal(50.0, 10.0, n), 3),
        ("lognormal", lambda rng, n: rng.lognormal(0.0, 1.0, n), 1),
    ],
)
def test_no_effect_gets_a_verdict_at_most_alpha_of_the_time_at_5_seeds(name, draw, n_envs):
    rate = _null_rate(draw, 5, n_envs, seed=10 + n_envs, rule=decide)
    assert rate <= NULL_BOUND, (name, n_envs, rate)
    # The old bootstrap rule fails the same check on the same kind of data (its rate is ~0.12),
    # so this test tells the two apart.
    if name == "normal" and n_envs == 1:
        assert _null_rate(draw, 5, n_envs, seed=10 + n_envs, rule=_old_rule) > NULL_BOUND


def test_power_at_10_seeds_and_an_effect_of_1_5_sd():
    rng = np.random.default_rng(20)
    n_sims = 500
    supported = sum(decide(rng.normal(1.5, 1.0, 10), rng.normal(0.0, 1.0, 10)) == "supported" for _ in range(n_sims))
    # Welch's power here is about 0.89 (standard error 0.014 at 500 sims): 0.80 is the requirement.
    assert supported / n_sims >= 0.80


def test_three_null_parts_give_a_finding_verdict_at_most_alpha_of_the_time():
    rng = np.random.default_rng(30)
    verdicts = [combine([compare(rng.normal(size=5), rng.normal(size=5)) for _part in range(3)])[0] for _ in range(N_NULL)]
    assert np.mean([v != "inconclusive" for v in verdicts]) <= NULL_BOUND


def test_too_few_seeds_is_inconclusive_however_large_the_effect():
    assert MIN_SEEDS == 5
    rng = np.random.default_rng(40)
    big = {"hopper": rng.normal(100.0, 1.0, 5), "walker2d": rng.normal(100.0, 1.0, 4)}
    small = {"hopper": rng.normal(0.0, 1.0, 5), "walker2d": rng.normal(0.0, 1.0, 5)}
    d = compare(big, small)
    assert d.n_treatment == 4 and d.n_control == 5
    assert d.p_value < 1e-6 and d.ci_low > 0  # the test itself is clear-cut...
    assert d.verdict == "inconclusive"  # ...but 4 seeds in walker2d is below MIN_SEEDS
    big["walker2d"] = np.append(big["walker2d"], 100.0)
    assert decide(big, small) == "supported"
    # NaN is a missing run: it does not count as a seed.
    big["walker2d"][0] = np.nan
    assert compare(big, small).n_treatment == 4 and decide(big, small) == "inconclusive"


def test_claimed_sets_the_side_and_not_the_effect():
    rng = np.random.default_rng(50)
    low, high = rng.normal(0.0, 1.0, 8), rng.normal(5.0, 1.0, 8)
    less = compare(low, high, claimed="less")
    greater = compare(low, high, claimed="greater")
    assert less.verdict == "supported" and greater.verdict == "contradicted"
    assert less.effect == greater.effect < 0 and less.ci_high < 0
    assert decide(high, low, claimed="less") == "contradicted"
    with pytest.raises(ValueError):
        compare(low, high, claimed="bigger")


def test_single_env_is_welchs_t_test():
    rng = np.random.default_rng(60)
    for n_t, n_c in [(5, 5), (6, 9), (12, 5)]:
        t, c = rng.normal(1.0, 2.0, n_t), rng.normal(0.0, 0.5, n_c)
        d = compare(t, c, alpha=0.1)
        ref = scipy.stats.ttest_ind(t, c, equal_var=False)
        ci = ref.confidence_interval(0.9)
        assert d.test == "Welch t" and (d.n_treatment, d.n_control) == (n_t, n_c)
        np.testing.assert_allclose([d.effect, d.p_value, d.ci_low, d.ci_high],
                                   [t.mean() - c.mean(), ref.pvalue, ci.low, ci.high], rtol=1e-9)  # fmt: skip


def test_stratified_effect_and_ci_agree_with_the_verdict():
    rng = np.random.default_rng(70)
    for _i in range(300):
        shift = rng.normal(0.0, 1.5)
        t = {"hopper": rng.normal(shift, 1.0, 5), "walker2d": rng.normal(shift, 3.0, 7), "ant": [1.0]}
        c = {"hopper": rng.normal(0.0, 1.0, 6), "walker2d": rng.normal(0.0, 3.0, 5)}
        d = compare(t, c)
        assert d.envs == ("hopper", "walker2d") and d.test == "Welch t, stratified by env"  # ant ignored
        expected = np.mean([t[e].mean() - c[e].mean() for e in d.envs])
        assert d.effect == pytest.approx(expected)
        # The CI is the test inverted: it excludes 0 exactly when the test is significant.
        assert (d.ci_low > 0 or d.ci_high < 0) == (d.p_value < 0.05)
        assert (d.verdict != "inconclusive") == (d.p_value < 0.05)
        assert d.ci_low < d.effect < d.ci_high
    with pytest.raises(ValueError):
        compare({"hopper": [1.0] * 5}, {"walker2d": [1.0] * 5})  # no shared env
    with pytest.raises(ValueError):
        compare({"hopper": [1.0] * 5}, [1.0] * 5)  # a dict against an array


def test_stratified_variance_is_the_sum_over_envs():
    # Two envs with the same data: the effect is that env's, and its standard error is the
    # single-env one over sqrt(2) (two independent strata averaged), with twice the df.
    rng = np.random.default_rng(80)
    t, c = rng.normal(1.0, 1.0, 6), rng.normal(0.0, 1.0, 6)
    one = compare(t, c)
    two = compare({"a": t, "b": t}, {"a": c, "b": c})
    half_one, half_two = (one.ci_high - one.ci_low) / 2, (two.ci_high - two.ci_low) / 2
    df_one = scipy.stats.ttest_ind(t, c, equal_var=False).df
    se_one = half_one / scipy.stats.t.ppf(0.975, df_one)
    assert two.effect == pytest.approx(one.effect)
    assert half_two == pytest.approx(scipy.stats.t.ppf(0.975, 2 * df_one) * se_one / np.sqrt(2))


def test_degenerate_input_does_not_raise():
    same = compare([3.0] * 5, [3.0] * 5)
    assert (same.verdict, same.p_value, same.ci_low, same.ci_high) == ("inconclusive", 1.0, 0.0, 0.0)
    # No spread but a difference: the limit of the t-test, p = 0 and a zero-width CI.
    apart = compare([4.0] * 5, [3.0] * 5)
    assert (apart.verdict, apart.effect, apart.p_value) == ("supported", 1.0, 0.0)
    assert (apart.ci_low, apart.ci_high) == (1.0, 1.0)
    one_seed = compare([1.0], [0.0, 0.5])
    assert one_seed.verdict == "inconclusive" and np.isnan(one_seed.p_value) and one_seed.effect == 0.75
    no_seed = compare([np.nan, np.nan], [0.0, 0.5])
    assert no_seed.verdict == "inconclusive" and np.isnan(no_seed.effect) and no_seed.n_treatment == 0
    infinite = compare([1.0, np.inf, 2.0, 3.0, 4.0], [0.0] * 5)
    assert infinite.verdict == "inconclusive" and np.isnan(infinite.p_value)


def test_holm_against_a_hand_computed_example():
    # Sorted: 0.005 x4 = 0.02, 0.01 x3 = 0.03, 0.03 x2 = 0.06, 0.04 x1 = 0.04 -> max(0.06, 0.04).
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.5, 0.9]), [1.0, 1.0])  # capped at 1
    # A NaN (untested part) still counts in m = 3 and stays NaN.
    np.testing.assert_allclose(holm([0.01, np.nan, 0.02]), [0.03, np.nan, 0.04])
    assert holm([]).shape == (0,)


def _part(p, effect=1.0, claimed="greater", n=5):
    v = "supported" if p < 0.05 and (effect > 0) == (claimed == "greater") else "inconclusive"
    return Decision(v, effect, np.nan, np.nan, p, "Welch t", n, n, ("hopper",), claimed)


def test_combine_corrects_each_part_then_combines():
    # Each part alone is significant at 0.03, but Holm with 2 parts makes both 0.06.
    assert combine([_part(0.03), _part(0.03)]) == ("inconclusive", ["inconclusive", "inconclusive"])
    assert combine([_part(0.01), _part(0.02)]) == ("supported", ["supported", "supported"])
    # One part clearly on the wrong side contradicts the finding whatever the others say.
    assert combine([_part(0.001, effect=-1.0), _part(0.01)]) == ("contradicted", ["contradicted", "supported"])
    assert combine([_part(0.001, effect=-1.0), _part(0.9)]) == ("contradicted", ["contradicted", "inconclusive"])
    assert combine([_part(0.001, effect=-1.0, claimed="less"), _part(0.01)])[0] == "supported"
    assert combine([_part(0.001, n=4), _part(0.001)]) == ("inconclusive", ["inconclusive", "supported"])
    assert combine([_part(np.nan), _part(0.01)]) == ("inconclusive", ["inconclusive", "supported"])
    assert combine([]) == ("inconclusive", [])
    assert combine([_part(0.03)], alpha=0.01) == ("inconclusive", ["inconclusive"])
