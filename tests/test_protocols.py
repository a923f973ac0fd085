"""The swappable parts are small Protocols (issue 23): condiff's own implementations satisfy them, and an object a
user writes in a few lines takes their place and is the one that acts."""

import torch
from diffusers import DDPMScheduler

from condiff.attribution.projector import GaussianProjector, Projector, SparseProjector
from condiff.data.datasets import LabelledDataset
from condiff.models import build_model
from condiff.sampling.generate import generate, sampling_scheduler
from condiff.sampling.guidance import ClassifierFreeGuidance, Guidance
from condiff.training.dual import DualRule, DualState, ProjectedAscent, ResilientAscent
from condiff.training.estimators import ESTIMATORS, LagrangianEstimator
from condiff.training.terms import Constraint, DatasetTerm, LossTerm


def small_term(name: str = "data") -> DatasetTerm:
    data = LabelledDataset(torch.randn(12, 2), torch.arange(12) % 2, 2, "toy")
    return DatasetTerm(name, data, DDPMScheduler(num_train_timesteps=50))


def test_condiffs_own_parts_satisfy_their_protocols():
    term = small_term()
    assert isinstance(term, LossTerm)
    assert all(isinstance(rule, DualRule) for rule in (ProjectedAscent(), ResilientAscent(torch.ones(2))))
    assert all(isinstance(p, Projector) for p in (GaussianProjector(10, 4), SparseProjector(10, 4)))
    assert isinstance(ClassifierFreeGuidance(1.0), Guidance)
    constraints = [Constraint(small_term("class 1"), fixed_multiplier=0.5)]
    assert all(isinstance(make(term, constraints, 8, 4, 0.1), LagrangianEstimator) for make in ESTIMATORS.values())
    assert not isinstance(object(), Guidance) and not isinstance(ProjectedAscent(), Projector)


class Halving:
    """A user's dual rule: multipliers halve whatever the losses say."""

    def update(self, multipliers, losses, thresholds, step_size):
        return multipliers / 2


def test_a_users_dual_rule_replaces_the_papers():
    state = DualState(["a", "b"], [0.0, 0.0], [0.0, 0.0], [None, None], rule=Halving())
    state.multipliers = torch.tensor([4.0, 2.0], dtype=torch.float64)
    state.step(torch.tensor([10.0, 10.0]), 1.0)   # projected ascent would raise both by 10
    assert state.multipliers.tolist() == [2.0, 1.0]


class Unguided:
    """A user's guidance that returns the model's own prediction, and one that ignores the model."""

    def noise(self, model, x, timesteps, labels):
        return model(x, timesteps, class_labels=labels).sample


class NoNoise:
    def noise(self, model, x, timesteps, labels):
        return torch.zeros_like(x)


def test_a_users_guidance_is_what_generate_steps_with():
    torch.manual_seed(0)
    model, scheduler = build_model("mlp", (2,), hidden=16, layers=1), DDPMScheduler(num_train_timesteps=50)
    def draw(guidance):
        return generate(model, sampling_scheduler(scheduler, "ddim"), 8, num_inference_steps=5, seed=3,
                        guidance=guidance, progress=False).samples
    plain = draw(None)
    assert torch.allclose(draw(Unguided()), plain) and not torch.allclose(draw(NoNoise()), plain)
