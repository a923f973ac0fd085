"""Counterfactual validation of attribution scores: the linear datamodeling score (LDS).

Random subsets of the training set (a fraction alpha each) are drawn, a model is retrained on each, and a
target quantity is measured on every retrained model. Scores predict it linearly: the prediction for a
subset is the sum of its members' scores. LDS = the mean over targets of the Spearman correlation between
predicted and measured, with a bootstrap confidence interval over targets. (traker has no such utility:
MadryLab/trak issue 55.)
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class LinearDatamodelingScore:
    mean: float                       # LDS: mean over targets of the Spearman correlation
    low: float                        # bootstrap confidence interval of the mean
    high: float
    per_target: list[float]


def linear_datamodeling_score(scores: np.ndarray, subsets: np.ndarray, measured: np.ndarray, *,
                              confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> LinearDatamodelingScore:
    """`scores` (examples x targets), `subsets` (subsets x examples, boolean), `measured` (subsets x targets):
    the LDS and its bootstrap interval over targets."""
    predicted = subsets.astype(np.float64) @ np.asarray(scores, dtype=np.float64)
    correlations = np.array([scipy.stats.spearmanr(predicted[:, t], measured[:, t]).statistic
                             for t in range(predicted.shape[1])])
    rng = np.random.default_rng(seed)
    means = rng.choice(correlations, (resamples, len(correlations)), replace=True).mean(axis=1)
    tail = (1 - confidence) / 2
    return LinearDatamodelingScore(float(correlations.mean()), float(np.quantile(means, tail)),
                                   float(np.quantile(means, 1 - tail)), correlations.tolist())
