"""Lagrangian estimators: how a training step turns minibatches into an unbiased estimate of
L(theta, lambda) = l_0(theta) + sum_i lambda_i l_i(theta), and the constraint losses the dual step uses.

Each estimator is a small object chosen by `dual.estimator` (EDM's loss-as-object style): the loop calls
`lagrangian(...)` every step; the dual step uses the constraint losses of the primal steps since the last
one (sums and sample counts per constraint), so no estimator spends a forward pass on the dual step.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import torch

from condiff.training.dual import DualState
from condiff.training.terms import Constraint, DatasetTerm, DenoisingBatch, per_sample_loss


class LagrangianEstimate(NamedTuple):
    lagrangian: torch.Tensor         # differentiable: the step's backward goes through it
    objective_loss: torch.Tensor     # detached: the mean loss of the step's data samples
    constraint_sums: torch.Tensor    # detached, per constraint: the sum of its samples' losses ...
    constraint_counts: torch.Tensor  # ... over this many samples (float, so both reduce across processes)


@runtime_checkable
class LagrangianEstimator(Protocol):
    """What a training step calls: an estimate of the Lagrangian at the current multipliers, with the constraint
    losses' sums and sample counts that the next dual step averages."""

    def lagrangian(self, model: torch.nn.Module, dual: DualState, generator: torch.Generator,
                   device: torch.device) -> LagrangianEstimate: ...


def losses_by_source(losses: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss of the data samples, per-constraint loss sums) of a batch laid out source by source."""
    data, *constraints = losses.detach().split(counts)
    sums = torch.stack([part.sum() for part in constraints]) if constraints else losses.new_zeros(0)
    return data.mean(), sums


class Estimator:
    """What both estimators draw from: the data term, the constraints, and the batch sizes."""

    def __init__(self, objective: DatasetTerm, constraints: list[Constraint], batch_size: int,
                 dual_batch_size: int, floor: float):
        self.objective, self.constraints = objective, constraints
        self.terms = [objective] + [c.term for c in constraints]
        self.batch_size, self.dual_batch_size, self.floor = batch_size, dual_batch_size, floor

    def forward(self, model, counts: list[int], generator: torch.Generator, device) -> torch.Tensor:
        """Per-sample losses of `counts[j]` fresh samples of term j, all terms in one forward pass: the same
        losses as separate passes (the networks have no batch statistics), and one forward per backward,
        as DDP requires."""
        batch = DenoisingBatch.concatenate([t.draw(n, generator) for t, n in zip(self.terms, counts)])
        return per_sample_loss(model, batch.to(device))


class StratifiedEstimator(Estimator):
    """The paper's estimator: a minibatch of the data and one of every constraint set, so a step's cost
    grows with the number of constraints."""

    def lagrangian(self, model, dual: DualState, generator: torch.Generator, device) -> LagrangianEstimate:
        counts = [self.batch_size] + [self.dual_batch_size] * len(self.constraints)
        losses = self.forward(model, counts, generator, device)
        data, *constraints = losses.split(counts)
        lagrangian = data.mean() + sum(float(lam) * part.mean() for lam, part in zip(dual.multipliers, constraints))
        objective_loss, sums = losses_by_source(losses, counts)
        return LagrangianEstimate(lagrangian, objective_loss, sums, torch.tensor(counts[1:], dtype=torch.float))


def systematic_counts(shares: torch.Tensor, total: int, generator: torch.Generator) -> list[int]:
    """Counts summing to `total`, count j the floor or the ceiling of total * shares[j] with expectation
    total * shares[j] (systematic rounding: one uniform draw)."""
    offset = torch.rand((), generator=generator, dtype=torch.float64)
    edges = torch.floor(torch.cumsum(shares, 0) * total + offset)
    return torch.diff(edges, prepend=torch.zeros(1, dtype=torch.float64)).long().tolist()


class MixtureEstimator(Estimator):
    """One minibatch of `batch_size` from a defensive mixture of the data and the constraint sets, at the
    cost of an unconstrained step whatever the number of constraints.

    With w = (1, lambda_1, ..., lambda_m), sources get shares q_j proportional to max(w_j, floor): every
    constraint keeps samples when its multiplier is 0. The batch is split by q with systematic rounding,
    at least one sample per source, n_j in all; sample b of source j has weight w_j B / n_j, so the batch
    mean is sum_j w_j (mean loss of source j): an unbiased Lagrangian for any such split. The unweighted
    losses of the constraint-sourced samples, accumulated over the N primal steps, are the dual step's
    estimates (about N B floor / (1 + m floor) samples per constraint when the multipliers are small).
    """

    def __init__(self, objective, constraints, batch_size, dual_batch_size, floor):
        if batch_size <= len(constraints):
            raise ValueError(f"a mixture batch of {batch_size} cannot hold a sample of the data and of each "
                             f"of {len(constraints)} constraints")
        super().__init__(objective, constraints, batch_size, dual_batch_size, floor)

    def lagrangian(self, model, dual: DualState, generator: torch.Generator, device) -> LagrangianEstimate:
        weights = torch.cat([torch.ones(1, dtype=torch.float64), dual.multipliers])
        shares = weights.clamp(min=self.floor)
        spare = self.batch_size - len(weights)   # one sample per source first, the rest split by the shares
        counts = [1 + n for n in systematic_counts(shares / shares.sum(), spare, generator)]
        losses = self.forward(model, counts, generator, device)
        sample_weights = torch.repeat_interleave(weights * self.batch_size / torch.tensor(counts), torch.tensor(counts))
        lagrangian = (losses * sample_weights.to(device=losses.device, dtype=losses.dtype)).mean()
        objective_loss, sums = losses_by_source(losses, counts)
        return LagrangianEstimate(lagrangian, objective_loss, sums, torch.tensor(counts[1:], dtype=torch.float))


ESTIMATORS = {"stratified": StratifiedEstimator, "mixture": MixtureEstimator}
