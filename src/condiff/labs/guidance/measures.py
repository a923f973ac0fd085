"""Measurements shared by the parts of the exact guidance lab: pathwise confidence, monotonicity,
spread orthogonal to the target, and number formatting for the report."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from condiff.gmm.guidance import GuidedSamples
from condiff.gmm.mixture import GaussianMixture


def path_confidences(mixture: GaussianMixture, runs: Sequence[GuidedSamples], y: int) -> np.ndarray:
    """p_0(y | Y) of every sample in every run, shape (N, len(runs)): one row per shared-noise path."""
    return np.stack([mixture.log_posterior(run.samples).exp()[:, y].numpy() for run in runs], axis=1)


def pathwise_monotone_fraction(confidences: np.ndarray) -> float:
    """Share of paths (rows) whose confidence never decreases from one eta (column) to the next."""
    return float(np.mean(np.all(np.diff(confidences, axis=1) >= 0.0, axis=1)))


def largest_pathwise_drop(confidences: np.ndarray) -> float:
    """The largest decrease of one path's confidence between consecutive etas (0 when none)."""
    return float(max(0.0, -np.diff(confidences, axis=1).min()))


def orthogonal_variance(mixture: GaussianMixture, samples: torch.Tensor) -> float:
    """Per-coordinate sample variance of the samples projected off the span of the mean differences:
    guidance only acts inside that span, so this variance should stay that of the components (1)."""
    differences = (mixture.means[1:] - mixture.means[0]).T
    directions, singular_values, _ = torch.linalg.svd(differences, full_matrices=False)
    basis = directions[:, singular_values > 1e-9 * singular_values.max()]   # collinear means span one axis
    residual = samples - samples @ basis @ basis.T
    return (residual.var(dim=0).sum() / (samples.shape[1] - basis.shape[1])).item()


def is_non_decreasing(values: Sequence[float]) -> bool:
    return bool(np.all(np.diff(values) >= 0.0))


def is_non_increasing(values: Sequence[float]) -> bool:
    return bool(np.all(np.diff(values) <= 0.0))




def format_numbers(values: Sequence[float], digits: int = 3) -> str:
    return ", ".join(f"{value:.{digits}f}" for value in values)
