"""Random projections of per-example gradients (Johnson-Lindenstrauss), made once per model and applied
with one BLAS product or one scatter-add, on the device the gradients are on.

Written here rather than taken from traker: its CPU `BasicProjector` regenerates its random matrix block
by block for every batch, so random number generation, not the product, dominates on a CPU.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Projector(Protocol):
    """A fixed random linear map of flattened per-example gradients (n, p) to (n, k), the same for every call
    (train and target features must meet in one space)."""

    def project(self, gradients: torch.Tensor) -> torch.Tensor: ...


class GaussianProjector:
    """x -> x P with P (p x k) of i.i.d. N(0, 1/k) entries, float32, seeded and generated once on the CPU
    (so the same on every device). Memory p * k * 4 bytes: for large models use `SparseProjector`."""

    def __init__(self, num_params: int, dim: int, *, seed: int = 0, device: str | torch.device = "cpu"):
        self.num_params, self.dim = num_params, dim
        generator = torch.Generator().manual_seed(seed)
        self.matrix = (torch.randn(num_params, dim, generator=generator) / math.sqrt(dim)).to(device)

    def project(self, gradients: torch.Tensor) -> torch.Tensor:
        """(B, p) -> (B, k)."""
        return gradients.to(self.matrix) @ self.matrix


class SparseProjector:
    """A sparse JL transform (Kane and Nelson): every input coordinate goes to `nonzeros` random output
    coordinates with random signs / sqrt(nonzeros). Inner products are preserved in expectation like the
    Gaussian projection's, at a cost of B * p * nonzeros whatever k, with p * nonzeros indices in memory."""

    def __init__(self, num_params: int, dim: int, *, seed: int = 0, device: str | torch.device = "cpu",
                 nonzeros: int = 4):
        generator = torch.Generator().manual_seed(seed)
        self.num_params, self.dim, self.nonzeros = num_params, dim, nonzeros
        rows = torch.randint(0, dim, (nonzeros, num_params), generator=generator)
        signs = torch.randint(0, 2, (nonzeros, num_params), generator=generator) * 2 - 1
        # A negative entry adds into a second block of k outputs that is subtracted at the end: the scatter-add
        # then needs no (B, p) product per non-zero, which cost more than the scatter itself.
        self.targets = (rows + dim * (signs < 0)).to(device)

    def project(self, gradients: torch.Tensor) -> torch.Tensor:
        """(B, p) -> (B, k)."""
        gradients = gradients.to(self.targets.device, torch.float32)
        both = torch.zeros(len(gradients), 2 * self.dim, device=gradients.device)
        for targets in self.targets:
            both.index_add_(1, targets, gradients)
        return (both[:, :self.dim] - both[:, self.dim:]) / math.sqrt(self.nonzeros)


PROJECTORS = {"gaussian": GaussianProjector, "sparse": SparseProjector}
