"""Attribution baselines, scored like TRAK (training examples x targets, larger = more helpful), so that
the linear datamodeling score ranks every method on the same footing (D-TRAK's table):
- similarity: cosine similarity of two representations (pixels, or a classifier's features);
- gradient dot product: Phi G^T, the projected gradients without TRAK's kernel (TracIn-like, one checkpoint);
- random: seeded Gaussian scores, the floor every method must clear.
"""

from __future__ import annotations

import numpy as np
import torch


def cosine_similarity(train: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray) -> np.ndarray:
    """(n, m): cosine similarity of each training example's representation to each target's (flattened)."""
    a, b = (torch.as_tensor(np.asarray(x), dtype=torch.float64).flatten(1) for x in (train, targets))
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (a @ b.T).numpy()


def gradient_dot_product(train_features: torch.Tensor, target_features: torch.Tensor) -> np.ndarray:
    """(n, m): Phi G^T, TRAK without the inverse kernel."""
    return (train_features.double() @ target_features.double().T).numpy()


def random_scores(num_train: int, num_targets: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((num_train, num_targets))
