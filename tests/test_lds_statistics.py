"""The LDS's statistics against ground truth (issue 20): on simulated linear datamodels whose population LDS
is known, the two-way interval covers it at about its nominal rate where a targets-only interval does not
(targets share the retrained models), the paired difference separates a better method from a worse one,
and the Spearman-Brown ceiling is what a perfect predictor of the data's effect reaches."""

import numpy as np
import pytest

from condiff.attribution.validation import (
    column_spearman,
    lds_mean,
    linear_datamodeling_score,
    paired_difference,
    random_subsets,
    reliability_ceiling,
    retest_correlation,
    spearman_brown,
)


def simulate(rng, effects, subsets, model_noise, seeds=1):
    """Measured (seeds, subsets, targets): the subset's summed true effects, plus per model (subset x seed) a
    training-noise draw shared by every target it is measured on (the targets' common models), plus a little
    target-specific noise."""
    signal = subsets @ effects
    shared = rng.normal(scale=model_noise, size=(seeds, len(subsets), 1))
    return signal[None] + shared * (1 + 0.2 * rng.normal(size=(1, 1, effects.shape[1]))) \
        + rng.normal(scale=0.2 * model_noise, size=(seeds, *signal.shape))


def test_column_spearman_equals_scipy():
    import scipy.stats

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(20, 5)), rng.normal(size=(20, 5))
    a[3, 1] = a[4, 1]   # a tie
    expected = [scipy.stats.spearmanr(a[:, j], b[:, j]).statistic for j in range(5)]
    np.testing.assert_allclose(column_spearman(a, b), expected, rtol=1e-12)
    assert np.isnan(column_spearman(np.ones((6, 1)), b[:6, :1]))[0]


def test_two_way_interval_covers_the_population_lds_and_a_targets_only_interval_does_not():
    """30 independent experiments of 24 subsets x 16 targets; the population LDS of the true effects comes
    from 4,000 subsets. Measured: the two-way interval covered it 29 times of 30, the targets-only one 18."""
    rng = np.random.default_rng(1)
    n, targets = 200, 16
    effects = rng.normal(size=(n, targets)) * (1 + rng.random(targets))
    big = random_subsets(n, 4000, seed=99)
    population = lds_mean(effects, big, simulate(rng, effects, big, model_noise=12.0)[0])
    two_way = targets_only = 0
    for experiment in range(30):
        subsets = random_subsets(n, 24, seed=experiment)
        measured = simulate(rng, effects, subsets, model_noise=12.0)[0]
        lds = linear_datamodeling_score(effects, subsets, measured, resamples=400, seed=experiment)
        two_way += lds.low <= population <= lds.high
        per_target = np.array(lds.per_target)
        means = rng.choice(per_target, (400, targets)).mean(1)
        targets_only += np.quantile(means, 0.025) <= population <= np.quantile(means, 0.975)
    assert two_way >= 25, two_way           # nominal 95%: 28.5 of 30
    assert targets_only <= 22, targets_only  # the interval the project used before: too narrow


def test_paired_difference_separates_the_better_method_and_is_zero_for_the_same_one():
    rng = np.random.default_rng(2)
    effects = rng.normal(size=(150, 12))
    subsets = random_subsets(150, 32, seed=3)
    measured = simulate(rng, effects, subsets, model_noise=2.0)[0]
    worse = effects + rng.normal(scale=3.0, size=effects.shape)
    better = paired_difference(effects, worse, subsets, measured, resamples=500)
    assert better.low > 0 and better.excludes_zero
    assert lds_mean(effects, subsets, measured) - lds_mean(worse, subsets, measured) == pytest.approx(better.mean)
    same = paired_difference(effects, effects, subsets, measured, resamples=200)
    assert same.mean == same.low == same.high == 0
    reverse = paired_difference(worse, effects, subsets, measured, resamples=500)
    assert reverse.high < 0


def test_the_ceiling_is_what_a_perfect_predictor_of_the_datas_effect_reaches():
    """Measurements of 3 seeds; r from their pairwise agreement. The true effects (the best any method can
    know) reach the Spearman-Brown ceiling: measured r = 0.29, 3-seed mean 0.78 against a ceiling of 0.74, one seed
    0.55 against 0.54."""
    rng = np.random.default_rng(4)
    effects = rng.normal(size=(300, 20))
    subsets = random_subsets(300, 400, seed=5)
    per_seed = simulate(rng, effects, subsets, model_noise=12.0, seeds=3)
    r = retest_correlation(per_seed)
    assert 0.2 < r < 0.4
    ceiling = reliability_ceiling(r, 3)
    assert ceiling == pytest.approx(np.sqrt(3 * r / (1 + 2 * r)))
    assert lds_mean(effects, subsets, per_seed.mean(0)) == pytest.approx(ceiling, abs=0.06)
    assert lds_mean(effects, subsets, per_seed[0]) == pytest.approx(reliability_ceiling(r, 1), abs=0.06)
    assert spearman_brown(0.3, 1) == pytest.approx(0.3) and spearman_brown(0.3, 2) == pytest.approx(0.6 / 1.3)
    assert retest_correlation(per_seed[:1]) is None and reliability_ceiling(None, 2) is None


def test_lds_recovers_a_known_linear_datamodel_and_gives_chance_to_random_scores():
    rng = np.random.default_rng(0)
    effects = rng.normal(size=(300, 8))
    subsets = random_subsets(300, 64, fraction=0.5, seed=1)
    assert (subsets.sum(axis=1) == 150).all()
    measured = subsets @ effects + rng.normal(scale=1.0, size=(64, 8))
    true = linear_datamodeling_score(effects, subsets, measured, resamples=300)
    random = linear_datamodeling_score(rng.normal(size=(300, 8)), subsets, measured, resamples=300)
    assert true.mean > 0.9 and true.low > random.high
    assert abs(random.mean) < 0.15 and random.low < 0 < random.high
    # Scale and shift of the scores leave the LDS unchanged (Spearman is rank-based).
    assert linear_datamodeling_score(3 * effects + 1, subsets, measured, resamples=10).mean == pytest.approx(true.mean)
