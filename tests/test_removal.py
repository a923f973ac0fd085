"""The per-step removal test's bookkeeping (issue 20, item 3): which examples each removal drops, and the
paired comparison of the changes it causes (the retrainings themselves run in the slow protocol test)."""

import numpy as np
import pytest
import torch

from condiff.validation.counterfactual import Targets, ValidationSettings
from condiff.validation.methods import Candidate, QuantityChoice
from condiff.validation.removal import RemovalEffect, compare_removals, removal_plan
from condiff.sampling.generate import SampleOutput


def test_removal_plan_drops_each_methods_top_k_for_its_target_and_shares_random_draws():
    timesteps = torch.tensor([900, 700, 500, 300, 100])
    samples = SampleOutput(torch.zeros(6, 2), timesteps, torch.zeros(5, 6, 2))
    targets = Targets(samples, held_out=2, quantities={"t=300": (torch.zeros(6, 2), [300])})
    rng = np.random.default_rng(0)
    trak, pixels = rng.normal(size=(50, 6)), rng.normal(size=(50, 6))
    choice = QuantityChoice(Candidate("TRAK", None, 0.1, 0.3, trak), Candidate("pixel similarity", None, None, 0.2, pixels),
                            {}, [])
    settings = ValidationSettings(removal_targets=3, removal_steps=(290,), removal_share=0.1, removal_draws=3)
    plan = removal_plan({"t=300": choice}, targets, settings, 50)
    targeted = [r for r in plan if r.target is not None]
    assert [(r.target, r.kind) for r in targeted] == [(t, kind) for t in (2, 3, 4)
                                                      for kind in ("top-k TRAK", "top-k pixel similarity")]
    for removal in targeted:
        scores = (trak if removal.kind == "top-k TRAK" else pixels)[:, removal.target]
        assert sorted(removal.removed) == sorted(np.argsort(-scores)[:5].tolist()) and removal.step == 290
    drawn = [r for r in plan if r.target is None]
    assert len(drawn) == 3 and all(len(set(r.removed)) == 5 for r in drawn)
    assert len({tuple(r.removed) for r in drawn}) == 3 and len({r.name for r in plan}) == len(plan)   # named by content
    assert removal_plan({"t=300": choice}, targets, settings, 50) == plan


def test_paired_comparison_finds_a_shift_random_removals_do_not_have():
    rng = np.random.default_rng(1)
    base = rng.gamma(2.0, 0.05, size=16)   # how much each target moves anyway
    effects = []
    for target, moved in enumerate(base):
        effects.append(RemovalEffect(target, 300, "top-k TRAK", moved + 0.03 + 0.005 * rng.normal(), 2 * moved))
        for draw in range(3):
            effects.append(RemovalEffect(target, 300, "random k", moved + 0.005 * rng.normal(), 2 * moved))
    x0, sample = compare_removals(effects, "top-k TRAK", "random k", resamples=500)
    assert x0.output == "x0_hat(T)" and x0.difference.low > 0.02 and x0.difference.mean == pytest.approx(0.03, abs=0.005)
    assert sample.difference.mean == pytest.approx(0) and not sample.difference.excludes_zero
    assert compare_removals(effects, "top-k TRAK", "nothing like it") == []
