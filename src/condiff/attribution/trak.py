"""The TRAK estimator on projected gradients, in float64.

For one model: Phi (n x k) the training examples' features, G (m x k) the targets'; scores
S = Phi (Phi^T Phi + lambda I)^-1 G^T (n x m): positive for a helpful example (in the linearised model,
training on it lowers the target's loss, for the `loss` output; D-TRAK's output keeps the convention).
The ridge lambda = c * trace(Phi^T Phi) / k is relative, so its coefficient c means the same whatever the
gradients' scale; choose c on held-out targets (`choose_ridge`), never on reported ones.
When k > n the same scores come from the n x n kernel: S = (Phi Phi^T + lambda I)^-1 Phi G^T (the dual form;
a k x k float64 kernel of k = 32,768 takes 8.6 GB).
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
    """S = Phi (Phi^T Phi + lambda I)^-1 G^T, (n x m), by a float64 Cholesky solve in the smaller of the
    k x k (primal) and n x n (dual) kernels."""
    phi, targets = train_features.double(), target_features.double()
    dual = phi.shape[1] > phi.shape[0]
    kernel = phi @ phi.T if dual else phi.T @ phi
    kernel.diagonal().add_(ridge(phi, coefficient))
    factor = torch.linalg.cholesky(kernel)
    if dual:
        return torch.cholesky_solve(phi @ targets.T, factor)
    return phi @ torch.cholesky_solve(targets.T, factor)


class RidgePath:
    """One model's TRAK scores for any ridge coefficient from one eigendecomposition of its smaller kernel:
    with K = V diag(e) V^T, (K + lambda I)^-1 = V diag(1 / (e + lambda)) V^T, so each further coefficient
    costs a product, not a factorisation."""

    def __init__(self, train_features: torch.Tensor, target_features: torch.Tensor):
        phi, targets = train_features.double(), target_features.double()
        self.unit_ridge = ridge(phi, 1.0)
        if phi.shape[1] > phi.shape[0]:   # dual: S = U diag(1 / (e + lambda)) U^T Phi G^T
            self.eigenvalues, vectors = torch.linalg.eigh(phi @ phi.T)
            self.left, self.right = vectors, vectors.T @ (phi @ targets.T)
        else:                             # primal: S = Phi V diag(1 / (e + lambda)) V^T G^T
            self.eigenvalues, vectors = torch.linalg.eigh(phi.T @ phi)
            self.left, self.right = phi @ vectors, vectors.T @ targets.T

    def scores(self, coefficient: float) -> torch.Tensor:
        """(n x m): `trak_scores` at ridge coefficient `coefficient`."""
        return self.left @ (self.right / (self.eigenvalues + coefficient * self.unit_ridge)[:, None])


def ensemble_scores(models: Sequence[tuple[torch.Tensor, torch.Tensor]], coefficient: float) -> torch.Tensor:
    """The mean over models of each model's TRAK scores (features of one model are never mixed with
    another's, and no model's scores are rescaled)."""
    return torch.stack([trak_scores(phi, targets, coefficient) for phi, targets in models]).mean(0)


def choose_ridge(models: Sequence[tuple[torch.Tensor, torch.Tensor]], measure: Callable[[torch.Tensor], float],
                 coefficients: Sequence[float] = tuple(10.0 ** np.arange(-4, 3))) -> float:
    """The coefficient whose ensemble scores of *held-out* targets score best under `measure` (e.g. LDS);
    every model is factorised once for all coefficients (`RidgePath`)."""
    paths = [RidgePath(phi, targets) for phi, targets in models]
    return max(coefficients, key=lambda c: measure(torch.stack([path.scores(c) for path in paths]).mean(0)))
