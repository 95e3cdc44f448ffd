"""Bootstrap intervals, paired permutation tests and run variance against known answers."""
from __future__ import annotations

import numpy as np
import pytest

from core.stats import (
    bootstrap_ci,
    draws_summary,
    holm,
    paired_difference,
    run_variance,
    seeds_tests_draws,
)


def test_bootstrap_ci_covers_the_true_mean_at_about_the_nominal_rate():
    """95% intervals of 100 normal samples (n=40): about 95 cover the mean. An interval of the
    data's spread instead of the mean's would cover ~100, one too narrow far fewer."""
    covered, widths = 0, []
    for seed in range(100):
        sample = np.random.default_rng(1000 + seed).normal(3.0, 2.0, size=40)
        estimate, low, high = bootstrap_ci(sample, n_resamples=1000, seed=seed)
        assert low <= estimate <= high
        assert estimate == pytest.approx(sample.mean())
        covered += low <= 3.0 <= high
        widths.append(high - low)
    assert 88 <= covered <= 99, covered
    # the mean's 95% interval is about 2 * 1.96 * sigma / sqrt(n) wide
    assert np.mean(widths) == pytest.approx(2 * 1.96 * 2.0 / np.sqrt(40), rel=0.15)


def test_bootstrap_ci_is_seeded_and_takes_any_statistic():
    sample = np.random.default_rng(0).normal(size=30)
    assert bootstrap_ci(sample, seed=4) == bootstrap_ci(sample, seed=4)
    assert bootstrap_ci(sample, seed=4) != bootstrap_ci(sample, seed=5)
    vectorised = bootstrap_ci(sample, statistic=np.median, seed=1)
    looped = bootstrap_ci(sample, statistic=lambda v: float(np.median(v)), seed=1)  # no axis argument
    assert vectorised == pytest.approx(looped)
    with pytest.raises(ValueError):
        bootstrap_ci(sample, level=1.0)


def test_nan_values_are_left_out():
    sample = np.random.default_rng(1).normal(size=25)
    with_nan = np.concatenate([sample[:10], [np.nan, np.nan], sample[10:]])
    assert bootstrap_ci(with_nan, seed=2) == bootstrap_ci(sample, seed=2)
    assert all(np.isnan(bootstrap_ci([np.nan, np.nan])))
    estimate, low, high = bootstrap_ci([np.nan, 0.7])
    assert estimate == 0.7 and np.isnan(low) and np.isnan(high)
    a, b = np.array([1.0, 2.0, np.nan, 4.0]), np.array([0.5, np.nan, 3.0, 3.0])
    result = paired_difference(a, b)
    assert result["n"] == 2 and result["dropped"] == 2
    assert result["difference"] == pytest.approx(0.75)
    empty = paired_difference([np.nan], [1.0])
    assert empty["n"] == 0 and np.isnan(empty["p_value"]) and not empty["significant"]
    assert run_variance([0.2, np.nan, 0.4]) == pytest.approx(0.02)
    assert run_variance([0.2, np.nan]) is None


def test_a_clear_paired_difference_is_significant():
    rng = np.random.default_rng(3)
    b = rng.normal(size=40)
    a = b + 0.5 + 0.3 * rng.normal(size=40)  # large shared noise, a steady gain of 0.5
    result = paired_difference(a, b)
    assert result["significant"] and result["p_value"] < 0.01 and not result["exact"]
    assert result["low"] > 0 and result["low"] < result["difference"] < result["high"]
    assert result["difference"] == pytest.approx(np.mean(a - b))


def test_pure_noise_is_rarely_significant():
    hits = sum(paired_difference(*np.random.default_rng(s).normal(size=(2, 30)), n_resamples=1000, seed=s)["significant"]
               for s in range(40))
    assert hits <= 5, hits  # about 2 of 40 expected at the 5% level
    p_values = [paired_difference(*np.random.default_rng(s).normal(size=(2, 30)), n_resamples=1000, seed=s)["p_value"]
                for s in range(40)]
    assert 0.3 < np.mean(p_values) < 0.7  # uniform under the null


def test_exact_sign_flip_test_by_hand():
    # n items all favouring a: only the all-plus and all-minus patterns are as extreme -> p = 2 / 2^n
    result = paired_difference(np.arange(1.0, 9.0), np.zeros(8))
    assert result["exact"] and result["p_value"] == pytest.approx(2 / 2**8) and result["significant"]
    five = paired_difference(np.ones(5), np.zeros(5))
    assert five["exact"] and five["p_value"] == pytest.approx(2 / 2**5) and not five["significant"]  # 0.0625
    assert paired_difference(np.ones(6), np.ones(6))["p_value"] == 1.0  # no difference at all
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [1.0])


def test_run_variance():
    assert run_variance([0.4]) is None
    assert run_variance([]) is None
    assert run_variance([0.1, 0.3, 0.5]) == pytest.approx(np.var([0.1, 0.3, 0.5], ddof=1))


def test_draws_summary_gives_the_interval_and_the_p_of_zero():
    low, high, p = draws_summary(np.r_[np.arange(1.0, 101.0), np.nan])  # NaN draws left out
    assert (low, high) == pytest.approx((3.475, 97.525)) and p == pytest.approx(2 / 101)  # never 0
    assert draws_summary(np.r_[-np.ones(10), np.ones(30)])[2] == pytest.approx(2 * 11 / 41)


def test_holm_adjusts_a_family_step_down():
    adjusted = holm([0.01, 0.04, 0.03, np.nan, 0.5])
    # sorted 0.01, 0.03, 0.04, 0.5 times 4, 3, 2, 1 -> 0.04, 0.09, 0.08, 0.5, then a running maximum
    assert adjusted[[0, 2, 1, 4]] == pytest.approx([0.04, 0.09, 0.09, 0.5]) and np.isnan(adjusted[3])
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0]) and len(holm([])) == 0


def test_seed_level_draws_take_only_means_of_drawn_seeds():
    """No spread over tests, seed means 0, 1, 2: every draw is a mean of three drawn seeds (a
    multiple of 1/3 in [0, 2]), centred on 1, and both designs agree."""
    per_seed = [np.full(5, float(s)) for s in range(3)]
    for crossed in (True, False):
        draws = seeds_tests_draws(per_seed, crossed=crossed, n_resamples=3000, seed=1)
        assert np.allclose(draws * 3, np.round(draws * 3)) and draws.min() >= 0 and draws.max() <= 2
        assert draws.mean() == pytest.approx(1.0, abs=0.05) and 0 < draws.std() < 1


def test_a_shared_test_effect_widens_crossed_draws_by_about_root_s():
    """Three seeds that see the same 50 tests and agree on them: crossed, the tests move every seed
    together and the spread is one seed's test bootstrap; nested (as if each seed had its own
    tests) it averages down by about sqrt(3)."""
    effect = np.random.default_rng(0).normal(size=50)
    per_seed = [effect + 0.01 * s for s in range(3)]
    crossed = seeds_tests_draws(per_seed, crossed=True, n_resamples=4000, seed=2).std()
    nested = seeds_tests_draws(per_seed, crossed=False, n_resamples=4000, seed=2).std()
    single = bootstrap_ci(effect, n_resamples=4000, seed=2)
    assert crossed == pytest.approx((single[2] - single[1]) / (2 * 1.96), rel=0.15)
    assert 1.4 < crossed / nested < 2.1


def test_seeds_tests_draws_leave_out_nan_and_check_their_input():
    values = [np.array([1.0, np.nan, 1.0]), np.array([3.0, 3.0, np.nan])]
    draws = seeds_tests_draws(values, crossed=True, n_resamples=500)
    assert set(np.unique(draws[~np.isnan(draws)])) == {1.0, 2.0, 3.0}  # a NaN test never enters a mean
    with pytest.raises(ValueError, match="same tests"):
        seeds_tests_draws([np.ones(3), np.ones(4)], crossed=True)
    with pytest.raises(ValueError, match="at least one value"):
        seeds_tests_draws([np.ones(3), np.ones(0)], crossed=False)
