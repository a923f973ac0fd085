"""The dual update rules and the closed-form facts of constrained diffusion (Theorems 1 and 2)."""

import numpy as np
import pytest
import torch

from condiff.training.dual import (
    DualState,
    InfeasibleConstraints,
    ProjectedAscent,
    ResilientAscent,
    check_kl_feasibility,
    dual_rule,
    multipliers_for_target_shares,
    multipliers_from_kl_bounds,
    predicted_shares,
    projected_ascent,
    resilient_ascent,
)


def test_projected_ascent_moves_along_the_violation():
    lam = projected_ascent(torch.tensor([0.5, 0.5]), torch.tensor([0.3, 0.1]), torch.tensor([0.2, 0.2]), 2.0)
    assert torch.allclose(lam, torch.tensor([0.7, 0.3]))


def test_projected_ascent_projects_onto_zero():
    lam = projected_ascent(torch.tensor([0.05, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]), 1.0)
    assert torch.equal(lam, torch.zeros(2))


def test_resilient_rule_is_projected_ascent_when_gamma_is_zero():
    lam, l, b = torch.rand(5), torch.rand(5), torch.rand(5)
    assert torch.equal(resilient_ascent(lam, l, b, 0.3, 0.0), projected_ascent(lam, l, b, 0.3))


@pytest.mark.parametrize("gamma", [0.085, 0.35, 1.0])
def test_resilient_rule_fixed_point_is_loss_over_two_gamma(gamma):
    losses = torch.tensor([0.07, 0.2, 0.0])
    lam = torch.zeros(3)
    for _ in range(5000):
        lam = resilient_ascent(lam, losses, torch.zeros(3), 0.1, gamma)
    assert torch.allclose(lam, losses / (2 * gamma), atol=1e-6)
    # and it is a fixed point: one more step changes nothing
    assert torch.allclose(resilient_ascent(lam, losses, torch.zeros(3), 0.1, gamma), lam, atol=1e-7)


def test_resilient_fixed_point_with_a_threshold_is_the_excess_over_two_gamma():
    lam = torch.zeros(2)
    for _ in range(5000):
        lam = resilient_ascent(lam, torch.tensor([0.3, 0.1]), torch.tensor([0.1, 0.2]), 0.1, 0.5)
    assert torch.allclose(lam, torch.tensor([0.2, 0.0]), atol=1e-6)


def test_kl_feasibility_check_refuses_infeasible_bounds_with_the_sum_in_the_message():
    with pytest.raises(InfeasibleConstraints, match=r"sum of exp\(-b_i\) = 1\.7"):
        check_kl_feasibility([0.1, 0.2])
    check_kl_feasibility([1.0, 2.0])  # exp(-1) + exp(-2) = 0.50 < 1


def test_theorem_2_multipliers_reproduce_the_kl_bounds():
    bounds = np.array([1.0, 2.0, 3.0])
    lam = multipliers_from_kl_bounds(bounds)
    assert np.allclose(lam / (1 + lam.sum()), np.exp(-bounds))


def test_theorem_1_shares_sum_to_one_and_leave_unconstrained_classes_scaled_down():
    pi = np.array([0.4, 0.4, 0.1, 0.1])
    shares = predicted_shares(pi, {2: 0.3, 3: 0.1})
    assert shares.sum() == pytest.approx(1.0)
    assert shares[0] == pytest.approx(0.4 / 1.4) and shares[2] == pytest.approx(0.4 / 1.4)


def test_target_shares_invert_theorem_1():
    pi = np.array([0.129] * 7 + [0.032] * 3)
    pi = pi / pi.sum()
    lam = multipliers_for_target_shares(pi, [7, 8, 9], [0.1, 0.1, 0.1])
    assert np.allclose(predicted_shares(pi, dict(zip([7, 8, 9], lam)))[7:], 0.1)


def test_fixed_multipliers_start_and_stay_at_their_values_while_the_others_ascend():
    state = DualState(["a", "b"], [0.0, 0.1], [0.0, 0.0], [0.3, None])
    assert state.multipliers.tolist() == [0.3, 0.0]
    state.step(torch.tensor([5.0, 0.5]), 1.0)
    assert state.multipliers.tolist() == pytest.approx([0.3, 0.4])


def test_target_shares_below_the_data_share_are_refused():
    with pytest.raises(InfeasibleConstraints, match="already exceed"):
        multipliers_for_target_shares(np.array([0.5, 0.3, 0.2]), [1], [0.1])


def test_the_rule_is_chosen_by_the_relaxation_costs_and_matches_the_formulas():
    lam, losses, b = torch.tensor([0.2, 0.0]), torch.tensor([0.5, 0.1]), torch.tensor([0.1, 0.3])
    hard, mixed = dual_rule([0.0, 0.0]), dual_rule([0.5, 0.0])
    assert isinstance(hard, ProjectedAscent) and isinstance(mixed, ResilientAscent)
    assert torch.equal(hard.update(lam, losses, b, 0.3), projected_ascent(lam, losses, b, 0.3))
    assert torch.equal(mixed.update(lam, losses, b, 0.3),
                       resilient_ascent(lam, losses, b, 0.3, torch.tensor([0.5, 0.0], dtype=torch.float64)))


def test_dual_state_is_keyed_by_constraint_name_and_loads_positional_checkpoints():
    state = DualState(["class 4", "pretrained"], [0.0, 0.01], [0.5, 0.0])
    state.accumulate(torch.tensor([0.4, 0.1]), torch.tensor([2.0, 2.0]))
    state.accumulate(torch.tensor([0.3, 0.2]), torch.tensor([1.0, 3.0]))   # means over all samples
    assert state.mean_losses().tolist() == pytest.approx([0.7 / 3, 0.3 / 5])
    state.step(state.mean_losses(), 1.0)
    saved = state.state_dict()
    assert list(saved["multipliers"]) == ["class 4", "pretrained"] and saved["multipliers"]["pretrained"] > 0
    again = DualState(["class 4", "pretrained"], [0.0, 0.01], [0.5, 0.0])
    again.load_state_dict(saved)
    assert torch.equal(again.multipliers, state.multipliers)
    again.load_state_dict({"multipliers": [0.3, 0.4], "loss_sum": [0.2, 0.4], "loss_count": 2})   # before names
    assert again.named(again.multipliers) == {"class 4": 0.3, "pretrained": 0.4}
    assert again.mean_losses().tolist() == pytest.approx([0.1, 0.2])   # then: a sum of 2 per-step means
    with pytest.raises(ValueError, match="not the config's"):
        again.load_state_dict({**saved, "multipliers": {"class 5": 0.1, "pretrained": 0.1}})
