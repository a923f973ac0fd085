"""The TRAK estimator on projected gradients, in float64.

For one model: Phi (n x k) the training examples' features, G (m x k) the targets'; scores
S = Phi (Phi^T Phi + lambda I)^-1 G^T (n x m): positive for a helpful example (in the linearised model,
training on it lowers the target's loss, for the `loss` output; D-TRAK's output keeps the convention). The ridge lambda = c * trace(Phi^T Phi) / k is relative, so its coefficient c means the
same whatever the gradients' scale; choose c on held-out targets (`choose_ridge`), never on reported ones.
Several models (checkpoints, or runs trained independently) are averaged without per-model rescaling.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch


def ridge(features: torch.Tensor, coefficient: float) -> float:
    """lambda = c * trace(Phi^T Phi) / k = c * (mean squared feature norm) * n / k."""
    phi = features.double()
    return coefficient * float((phi * phi).sum()) / phi.shape[1]


def trak_scores(train_features: torch.Tensor, target_features: torch.Tensor, coefficient: float) -> torch.Tensor:
    """S = Phi (Phi^T Phi + lambda I)^-1 G^T, (n x m), by a float64 Cholesky solve."""
    phi, targets = train_features.double(), target_features.double()
    kernel = phi.T @ phi
    kernel.diagonal().add_(ridge(phi, coefficient))
    factor = torch.linalg.cholesky(kernel)
    return phi @ torch.cholesky_solve(targets.T, factor)


def ensemble_scores(models: Sequence[tuple[torch.Tensor, torch.Tensor]], coefficient: float) -> torch.Tensor:
    """The mean over models of each model's TRAK scores (features of one model are never mixed with
    another's, and no model's scores are rescaled)."""
    return torch.stack([trak_scores(phi, targets, coefficient) for phi, targets in models]).mean(0)


def choose_ridge(models: Sequence[tuple[torch.Tensor, torch.Tensor]], measure: Callable[[torch.Tensor], float],
                 coefficients: Sequence[float] = tuple(10.0 ** np.arange(-4, 3))) -> float:
    """The coefficient whose ensemble scores of *held-out* targets score best under `measure` (e.g. LDS)."""
    return max(coefficients, key=lambda c: measure(ensemble_scores(models, c)))
