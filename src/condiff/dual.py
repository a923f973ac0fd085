"""Dual-variable (multiplier) update rules and the closed-form facts of constrained diffusion.

Pure functions of tensors: they take multipliers and measured constraint losses and return new
multipliers, so they can be unit-tested without a model (Cooper's separation of the dual optimiser).
"""

from __future__ import annotations

import numpy as np
import torch


class InfeasibleConstraints(ValueError):
    """The requested constraints cannot all hold at once."""


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


def check_kl_feasibility(kl_bounds: list[float] | np.ndarray) -> None:
    """Refuse KL bounds b_i (nats) with sum_i exp(-b_i) >= 1 (Theorem 2: no model can meet them)."""
    bounds = np.asarray(kl_bounds, dtype=float)
    if np.any(bounds <= 0):
        raise InfeasibleConstraints("KL bounds must be positive (nats)")
    total = float(np.exp(-bounds).sum())
    if total >= 1.0:
        raise InfeasibleConstraints(
            f"infeasible KL bounds {bounds.tolist()}: sum of exp(-b_i) = {total:.4f} must be < 1 "
            "(loosen the bounds: raise some b_i)")


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


def relaxation_costs_for_multipliers(reference_losses: np.ndarray | float, multipliers: np.ndarray
                                     ) -> np.ndarray:
    """gamma_i = l_i / (2 lambda_i): the resilient rule's fixed point lambda = l / (2 gamma) solved for gamma."""
    lam = np.asarray(multipliers, dtype=float)
    if np.any(lam <= 0):
        raise InfeasibleConstraints("a target multiplier of zero needs no constraint (infinite gamma)")
    return np.asarray(reference_losses, dtype=float) / (2.0 * lam)
