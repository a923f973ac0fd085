"""Counterfactual validation of attribution scores: the linear datamodeling score (LDS), its intervals, and
the ceiling training noise puts on it.

Random subsets of the training set (a fraction alpha each) are drawn, a model is retrained on each, and a
target quantity is measured on every retrained model. Scores predict it linearly: the prediction for a
subset is the sum of its members' scores. LDS = the mean over targets of the Spearman correlation between
predicted and measured. (traker has no such utility: MadryLab/trak issue 55.)

Every target is measured on the same retrained models, so targets are not independent: the interval is a
two-way bootstrap that resamples subsets (rows) and targets (columns) together, and two methods are compared
by the interval of their LDS difference on the same resamples (paired).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.stats


def random_subsets(num_examples: int, num_subsets: int, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """(num_subsets, num_examples) boolean masks, each of round(fraction * num_examples) members."""
    rng = np.random.default_rng(seed)
    size = round(fraction * num_examples)
    masks = np.zeros((num_subsets, num_examples), dtype=bool)
    for row in masks:
        row[rng.choice(num_examples, size, replace=False)] = True
    return masks


def column_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(targets,): the Spearman correlation of column j of `a` with column j of `b` (rows: subsets); NaN
    for a constant column."""
    ra, rb = scipy.stats.rankdata(a, axis=0), scipy.stats.rankdata(b, axis=0)
    ra, rb = ra - ra.mean(0), rb - rb.mean(0)
    norms = np.sqrt((ra * ra).sum(0) * (rb * rb).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, (ra * rb).sum(0) / norms, np.nan)


@dataclass(frozen=True)
class LinearDatamodelingScore:
    mean: float                       # LDS: mean over targets of the Spearman correlation
    low: float                        # two-way bootstrap interval of the mean (subsets x targets)
    high: float
    per_target: list[float]


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def predictions(scores: np.ndarray, subsets: np.ndarray) -> np.ndarray:
    """(subsets x targets): the sum of each subset's members' scores."""
    return subsets.astype(np.float64) @ np.asarray(scores, dtype=np.float64)


def bootstrap_draws(num_subsets: int, num_targets: int, resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(resamples x subsets) and (resamples x targets) indices drawn with replacement: the same draws give
    every method's replicate, which is what makes differences paired."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, num_subsets, (resamples, num_subsets)),
            rng.integers(0, num_targets, (resamples, num_targets)))


def bootstrap_replicates(predicted: np.ndarray, measured: np.ndarray, draws: tuple[np.ndarray, np.ndarray]
                         ) -> np.ndarray:
    """(resamples,): the LDS of each two-way resample (rows and columns drawn together)."""
    rows, columns = draws
    out = np.empty(len(rows))
    for r, (row, column) in enumerate(zip(rows, columns)):
        out[r] = np.nanmean(column_spearman(predicted[np.ix_(row, column)], measured[np.ix_(row, column)]))
    return out


def interval(value: float, replicates: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2
    return float(np.nanquantile(replicates, tail)), float(np.nanquantile(replicates, 1 - tail))


def linear_datamodeling_score(scores: np.ndarray, subsets: np.ndarray, measured: np.ndarray, *,
                              confidence: float = 0.95, resamples: int = 1000, seed: int = 0) -> LinearDatamodelingScore:
    """`scores` (examples x targets), `subsets` (subsets x examples, boolean), `measured` (subsets x targets):
    the LDS and its two-way bootstrap interval."""
    predicted = predictions(scores, subsets)
    per_target = column_spearman(predicted, measured)
    draws = bootstrap_draws(*measured.shape, resamples, seed)
    low, high = interval(float(np.nanmean(per_target)), bootstrap_replicates(predicted, measured, draws), confidence)
    return LinearDatamodelingScore(float(np.nanmean(per_target)), low, high, per_target.tolist())


def paired_difference(scores: np.ndarray, other: np.ndarray, subsets: np.ndarray, measured: np.ndarray, *,
                      confidence: float = 0.95, resamples: int = 1000, seed: int = 0) -> Interval:
    """LDS(scores) - LDS(other) with the interval of the difference over the same two-way resamples."""
    draws = bootstrap_draws(*measured.shape, resamples, seed)
    a, b = predictions(scores, subsets), predictions(other, subsets)
    difference = np.nanmean(column_spearman(a, measured)) - np.nanmean(column_spearman(b, measured))
    replicates = bootstrap_replicates(a, measured, draws) - bootstrap_replicates(b, measured, draws)
    return Interval(float(difference), *interval(float(difference), replicates, confidence))


def retest_correlation(per_seed: np.ndarray) -> float | None:
    """(seeds, subsets, targets) -> r: the Spearman correlation across subsets between the measurements of two
    training seeds, averaged over targets and over every pair of seeds; None with one seed."""
    if len(per_seed) < 2:
        return None
    pairs = [(a, b) for a in range(len(per_seed)) for b in range(a + 1, len(per_seed))]
    return float(np.mean([np.nanmean(column_spearman(per_seed[a], per_seed[b])) for a, b in pairs]))


def spearman_brown(r: float, seeds: int) -> float:
    """The reliability of the mean of `seeds` measurements whose pairwise correlation is r."""
    return seeds * r / (1 + (seeds - 1) * r)


def reliability_ceiling(r: float | None, seeds: int) -> float | None:
    """The highest correlation any predictor can reach with the `seeds`-seed mean: sqrt(Spearman-Brown)."""
    if r is None:
        return None
    return math.sqrt(max(spearman_brown(r, seeds), 0.0))


def lds_mean(scores: np.ndarray, subsets: np.ndarray, measured: np.ndarray) -> float:
    """The LDS alone (no interval): what choices on held-out targets compare."""
    return float(np.nanmean(column_spearman(predictions(scores, subsets), measured)))
