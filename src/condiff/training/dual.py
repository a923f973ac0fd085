"""Dual variables: the update rules, the multipliers' state, and the closed-form facts of constrained
diffusion (Theorems 1 and 2).

The rules are pure functions of tensors behind small objects (`ProjectedAscent`, `ResilientAscent`), so
they are unit-tested without a model (Cooper's separation of the dual optimiser); `DualState` holds the
multipliers keyed by constraint name and the losses accumulated since the last dual step.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from condiff.config import InfeasibleConstraints, check_kl_feasibility


def projected_ascent(multipliers: torch.Tensor, losses: torch.Tensor, thresholds: torch.Tensor,
                     step_size: float) -> torch.Tensor:
    """lambda <- max(0, lambda + eta (l - b)): gradient ascent on the dual, projected onto lambda >= 0."""
    return torch.clamp(multipliers + step_size * (losses - thresholds), min=0.0)


def resilient_ascent(multipliers: torch.Tensor, losses: torch.Tensor, thresholds: torch.Tensor,
                     step_size: float, relaxation_cost: torch.Tensor | float) -> torch.Tensor:
    """lambda <- max(0, lambda + eta (l - b - 2 gamma lambda)).

    The quadratic relaxation cost gamma ||u||^2 makes the relaxation u = 2 gamma lambda, so the rule
    settles at lambda = max(0, l - b) / (2 gamma) instead of needing a well-chosen threshold.
    """
    return torch.clamp(
        multipliers + step_size * (losses - thresholds - 2.0 * relaxation_cost * multipliers), min=0.0)


@runtime_checkable
class DualRule(Protocol):
    """One dual step: the new multipliers from the old ones, the constraint losses measured since the last step,
    the thresholds and the step size (all float64 tensors of one entry per constraint but the step size)."""

    def update(self, multipliers: torch.Tensor, losses: torch.Tensor, thresholds: torch.Tensor,
               step_size: float) -> torch.Tensor: ...


class ProjectedAscent:
    """Hard constraints: lambda <- max(0, lambda + eta (l - b))."""

    def update(self, multipliers: torch.Tensor, losses: torch.Tensor, thresholds: torch.Tensor,
               step_size: float) -> torch.Tensor:
        return projected_ascent(multipliers, losses, thresholds, step_size)


class ResilientAscent:
    """Resilient constraints with relaxation costs gamma_i (a hard constraint among them has gamma_i = 0,
    for which the rule is exactly projected ascent)."""

    def __init__(self, relaxation_costs: torch.Tensor):
        self.relaxation_costs = relaxation_costs

    def update(self, multipliers: torch.Tensor, losses: torch.Tensor, thresholds: torch.Tensor,
               step_size: float) -> torch.Tensor:
        return resilient_ascent(multipliers, losses, thresholds, step_size, self.relaxation_costs)


def dual_rule(relaxation_costs: list[float]) -> DualRule:
    """The rule for constraints with these relaxation costs."""
    if not any(relaxation_costs):
        return ProjectedAscent()
    return ResilientAscent(torch.tensor(relaxation_costs, dtype=torch.float64))


class DualState:
    """The multipliers (keyed by constraint name in what is saved and logged), the rule that updates them,
    and the constraint losses accumulated since the last dual step. A multiplier given in
    `fixed_multipliers` (None elsewhere) starts and stays at its value. `rule` replaces the paper's rule for
    these relaxation costs (`dual_rule`) by another `DualRule`."""

    def __init__(self, names: list[str], thresholds: list[float], relaxation_costs: list[float],
                 fixed_multipliers: list[float | None] | None = None, rule: DualRule | None = None):
        if len(set(names)) != len(names):
            raise ValueError(f"constraint names must be distinct, got {names}")
        self.names = list(names)
        m = len(names)
        fixed = fixed_multipliers or [None] * m
        self.fixed = torch.tensor([math.nan if v is None else v for v in fixed], dtype=torch.float64)
        self.multipliers = torch.nan_to_num(self.fixed, nan=0.0)
        self.loss_sum = torch.zeros(m)
        self.loss_count = torch.zeros(m)   # samples behind each sum
        self.thresholds = torch.tensor(thresholds, dtype=torch.float64)
        self.rule = rule if rule is not None else dual_rule(relaxation_costs)

    def named(self, values) -> dict[str, float]:
        return {name: float(value) for name, value in zip(self.names, values)}

    def accumulate(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """Add a step's per-constraint loss sums over `counts` samples, on their device (no host sync per
        step; float32, which every accelerator has and the saved values round-trip exactly)."""
        self.loss_sum = self.loss_sum.to(sums.device, torch.float32) + sums.float()
        self.loss_count = self.loss_count.to(sums.device, torch.float32) + counts.float()

    def mean_losses(self) -> torch.Tensor:
        """Per constraint, the mean loss of its samples since the last dual step: the dual step's estimate."""
        return (self.loss_sum / self.loss_count).double().cpu()

    def step(self, losses: torch.Tensor, step_size: float) -> None:
        updated = self.rule.update(self.multipliers, losses.double().cpu(), self.thresholds, step_size)
        self.multipliers = torch.where(self.fixed.isnan(), updated, self.fixed)
        self.loss_sum, self.loss_count = torch.zeros_like(self.loss_sum), torch.zeros_like(self.loss_count)

    def hold(self, values: dict[str, float]) -> None:
        """Hold the named multipliers at new values (a controller outside the dual rule moves them)."""
        for name, value in values.items():
            index = self.names.index(name)
            self.fixed[index] = self.multipliers[index] = float(value)

    def state_dict(self) -> dict:
        return {"multipliers": self.named(self.multipliers), "loss_sum": self.named(self.loss_sum),
                "loss_count": self.named(self.loss_count)}

    def load_state_dict(self, state: dict) -> None:
        """Load a state keyed by name (or, from checkpoints before names, by position)."""
        def values(saved) -> torch.Tensor:
            if isinstance(saved, list):
                if len(saved) != len(self.names):
                    raise ValueError(f"the checkpoint holds {len(saved)} multipliers for {len(self.names)} constraints")
                return torch.tensor(saved, dtype=torch.float64)
            if set(saved) != set(self.names):
                raise ValueError(f"the checkpoint's constraints {sorted(saved)} are not the config's {self.names}")
            return torch.tensor([saved[name] for name in self.names], dtype=torch.float64)

        self.multipliers, self.loss_sum = values(state["multipliers"]), values(state["loss_sum"])
        count = state["loss_count"]   # before per-constraint counts: one count of per-step means, the same mean
        self.loss_count = (values(count) if isinstance(count, (dict, list)) else
                           torch.full_like(self.loss_sum, float(count)))


def multipliers_from_kl_bounds(kl_bounds: list[float] | np.ndarray) -> np.ndarray:
    """Optimal multipliers for KL bounds on disjointly supported constraints (Theorem 2):
    lambda_i / (1 + sum lambda) = exp(-b_i)  =>  lambda_i = exp(-b_i) / (1 - sum_j exp(-b_j))."""
    check_kl_feasibility(kl_bounds)
    weights = np.exp(-np.asarray(kl_bounds, dtype=float))
    return weights / (1.0 - weights.sum())


def predicted_shares(data_shares: np.ndarray, multipliers: dict[int, float] | np.ndarray, *,
                     reference_shares: np.ndarray | None = None, reference_multiplier: float = 0.0) -> np.ndarray:
    """Class shares of the optimal constrained model (Theorem 1) for per-class constraints:
    share_c = (pi_c + lambda_c) / (1 + sum lambda), lambda_c = 0 for unconstrained classes.

    A constraint towards a pretrained model with class shares `reference_shares` adds its
    multiplier's worth of that model to the mixture: (pi + lambda + lambda_pre s_pre) / (1 + sum + lambda_pre).
    """
    pi = np.asarray(data_shares, dtype=float)
    lam = np.zeros_like(pi)
    items = multipliers.items() if isinstance(multipliers, dict) else enumerate(multipliers)
    for label, value in items:
        lam[label] = value
    mixture = pi + lam
    if reference_shares is not None:
        mixture = mixture + reference_multiplier * np.asarray(reference_shares, dtype=float)
    return mixture / (1.0 + lam.sum() + (reference_multiplier if reference_shares is not None else 0.0))


def multipliers_for_target_shares(data_shares: np.ndarray, constrained_classes: list[int],
                                  target_shares: list[float]) -> np.ndarray:
    """Multipliers that make the constrained classes reach `target_shares` under Theorem 1.

    (pi_c + lambda_c) = s_c (1 + sum lambda) for every constrained c is linear in lambda:
    (I - s 1^T) lambda = s - pi.
    """
    pi = np.asarray(data_shares, dtype=float)[constrained_classes]
    s = np.asarray(target_shares, dtype=float)
    if len(s) != len(pi):
        raise ValueError(f"{len(s)} target shares for {len(pi)} constrained classes")
    if s.sum() >= 1.0:
        raise InfeasibleConstraints(f"target shares sum to {s.sum():.4f}; they must leave room for the "
                                    "unconstrained classes (sum < 1)")
    lam = np.linalg.solve(np.eye(len(s)) - np.outer(s, np.ones(len(s))), s - pi)
    if np.any(lam < -1e-12):
        bad = [constrained_classes[i] for i in np.nonzero(lam < 0)[0]]
        raise InfeasibleConstraints(f"classes {bad} already exceed their target share in the data; "
                                    "a constraint can only raise a class's share")
    return np.clip(lam, 0.0, None)
