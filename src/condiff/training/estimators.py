"""Lagrangian estimators: how a training step turns minibatches into an unbiased estimate of
L(theta, lambda) = l_0(theta) + sum_i lambda_i l_i(theta), and the constraint losses the dual step uses.

Each estimator is a small object chosen by `dual.estimator` (EDM's loss-as-object style): the loop calls
`lagrangian(...)` every step and `dual_estimates(...)` at every dual step without knowing which it holds.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from condiff.training.dual import DualState
from condiff.training.terms import Constraint, DatasetTerm, DenoisingBatch, per_sample_loss

Reduce = Callable[[torch.Tensor], torch.Tensor]     # averages a tensor across processes


class LagrangianEstimate(NamedTuple):
    lagrangian: torch.Tensor             # differentiable: the step's backward goes through it
    objective_loss: torch.Tensor         # detached; NaN when a mixture batch drew no data sample
    constraint_losses: torch.Tensor | None   # detached, per constraint, when the step measured them


class Estimator:
    """What both estimators draw from: the data term, the constraints, and the two batch sizes."""

    def __init__(self, objective: DatasetTerm, constraints: list[Constraint], batch_size: int, dual_batch_size: int):
        self.objective, self.constraints = objective, constraints
        self.batch_size, self.dual_batch_size = batch_size, dual_batch_size


class StratifiedEstimator(Estimator):
    """The paper's estimator: one minibatch of the data and one of every constraint set, so a step's cost
    grows with the number of constraints. The dual step reuses the constraint losses of the primal steps.

    The batches go through the network as one concatenated batch: the same losses as separate passes
    (the networks have no batch statistics), and one forward per backward, as DDP requires.
    """

    def lagrangian(self, model, dual: DualState, generator: torch.Generator, device) -> LagrangianEstimate:
        batches = [self.objective.draw(self.batch_size, generator)] + [
            c.term.draw(self.dual_batch_size, generator) for c in self.constraints]
        losses = per_sample_loss(model, DenoisingBatch.concatenate(batches).to(device))
        objective_loss, *constraint_losses = [part.mean() for part in losses.split([len(b) for b in batches])]
        lagrangian = objective_loss + sum(float(lam) * l for lam, l in zip(dual.multipliers, constraint_losses))
        measured = torch.stack([l.detach() for l in constraint_losses]) if self.constraints else None
        return LagrangianEstimate(lagrangian, objective_loss.detach(), measured)

    def dual_estimates(self, model, dual: DualState, generator: torch.Generator, device, reduce: Reduce) -> torch.Tensor:
        return dual.mean_losses()


class MixtureEstimator(Estimator):
    """One minibatch from the lambda-weighted mixture of the data and the constraint sets.

    E[(1 + sum lambda) mean_batch loss] = l_0 + sum lambda_i l_i, so the gradient is unbiased for the
    Lagrangian while a step costs one forward/backward of `batch_size`, whatever the number of
    constraints. Constraint losses for the dual step come from a separate forward-only batch.
    """

    def lagrangian(self, model, dual: DualState, generator: torch.Generator, device) -> LagrangianEstimate:
        weights = torch.cat([torch.ones(1, dtype=torch.float64), dual.multipliers])
        sources = torch.multinomial(weights / weights.sum(), self.batch_size, replacement=True, generator=generator)
        counts = torch.bincount(sources, minlength=len(weights)).tolist()
        terms = [self.objective] + [c.term for c in self.constraints]
        batch = DenoisingBatch.concatenate([t.draw(n, generator) for t, n in zip(terms, counts) if n > 0])
        losses = per_sample_loss(model, batch.to(device))
        objective_loss = (losses[:counts[0]].detach().mean() if counts[0]
                          else torch.full((), float("nan"), device=device))
        return LagrangianEstimate(weights.sum().item() * losses.mean(), objective_loss, None)

    @torch.no_grad()
    def dual_estimates(self, model, dual: DualState, generator: torch.Generator, device, reduce: Reduce) -> torch.Tensor:
        """Forward-only estimate of every constraint's loss, all constraints in one batch."""
        batch = DenoisingBatch.concatenate([c.term.draw(self.dual_batch_size, generator) for c in self.constraints])
        losses = per_sample_loss(model, batch.to(device))
        return reduce(torch.stack([part.mean() for part in losses.split(self.dual_batch_size)])).double().cpu()


ESTIMATORS = {"stratified": StratifiedEstimator, "mixture": MixtureEstimator}
