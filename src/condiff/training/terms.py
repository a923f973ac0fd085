"""Loss terms and constraints of the constrained diffusion problem.

Every term of the Lagrangian is a regression of the network output onto a target at a noisy input:
for a dataset, the target is the noise added to a clean sample (the denoising ELBO surrogate of
KL(q || p_theta)). A term only has to produce `DenoisingBatch`es, so batches from several terms can
be concatenated into one forward pass (the `mixture` estimator relies on that), and new kinds of
terms (e.g. distance to a frozen pretrained model) slot in without touching the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from diffusers import DDPMScheduler

from condiff.data.datasets import EpochSampler, LabelledDataset
from condiff.models import null_class_label
from condiff.sampling.generate import generate, sampling_scheduler


@dataclass
class DenoisingBatch:
    noisy: torch.Tensor          # x_t
    timesteps: torch.Tensor      # t, integer training timesteps
    target: torch.Tensor         # what the network should output at (x_t, t)
    class_labels: torch.Tensor   # labels of the clean samples (used by class-conditional models)
    weights: torch.Tensor | None = None   # per-sample loss weights averaging to 1 over the batch (None: all 1)

    FIELDS = ("noisy", "timesteps", "target", "class_labels")

    def __len__(self) -> int:
        return len(self.noisy)

    def sample_weights(self) -> torch.Tensor:
        return torch.ones(len(self)) if self.weights is None else self.weights

    def to(self, device: torch.device) -> "DenoisingBatch":
        return DenoisingBatch(*(getattr(self, f).to(device) for f in self.FIELDS),
                              None if self.weights is None else self.weights.to(device))

    @staticmethod
    def concatenate(batches: list["DenoisingBatch"]) -> "DenoisingBatch":
        if len(batches) == 1:   # an unconstrained step: no copy
            return batches[0]
        weights = None if all(b.weights is None for b in batches) else torch.cat([b.sample_weights() for b in batches])
        return DenoisingBatch(*(torch.cat([getattr(b, f) for b in batches]) for f in DenoisingBatch.FIELDS), weights)


def per_sample_loss(model: torch.nn.Module, batch: DenoisingBatch) -> torch.Tensor:
    """Mean squared error per sample between the network output and the batch's target.

    Labels go to class-conditional models only (diffusers UNets refuse them otherwise).
    """
    conditional = null_class_label(model) is not None
    output = model(batch.noisy, batch.timesteps, class_labels=batch.class_labels if conditional else None).sample
    losses = (output.float() - batch.target.float()).pow(2).flatten(1).mean(dim=1)
    return losses if batch.weights is None else losses * batch.weights


@runtime_checkable
class LossTerm(Protocol):
    """A term of the Lagrangian: `draw` gives denoising regressions whose mean squared error is its loss
    (the trainer concatenates the batches of several terms into one forward pass); its state (sampler position,
    pools) goes into checkpoints, so a resumed run draws what an uninterrupted one would."""
    name: str

    def draw(self, n: int, generator: torch.Generator) -> DenoisingBatch: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class DatasetTerm:
    """The denoising loss E_{x_0 ~ data, t, eps} ||eps_theta(x_t, t) - eps||^2 on one dataset.

    With `label_dropout` p every drawn label becomes "no class" (label K of a K-class dataset) with
    probability p, so that a class-conditional model also learns the unconditional score that
    classifier-free guidance needs (and that Theorem 1's mixture describes).

    With `example_weights` (one per example, e.g. 0/1 to leave examples out), a batch's losses are
    weighted so that their mean is the weighted mean: the loss of the weighted set, drawn from the same
    random stream as the unweighted run (counterfactual retraining with common random numbers)."""

    def __init__(self, name: str, dataset: LabelledDataset, noise_scheduler: DDPMScheduler,
                 label_dropout: float = 0.0, example_weights: torch.Tensor | None = None):
        if example_weights is not None and (len(example_weights) != len(dataset) or example_weights.min() < 0
                                            or example_weights.sum() <= 0):
            raise ValueError(f"{name}: example weights must be {len(dataset)} non-negative numbers, not all 0")
        self.name = name
        self.dataset = dataset
        self.noise_scheduler = noise_scheduler
        self.label_dropout = label_dropout
        self.example_weights = None if example_weights is None else example_weights.float()
        self.sampler = EpochSampler(len(dataset))

    def draw(self, n: int, generator: torch.Generator) -> DenoisingBatch:
        """n fresh (x_t, t, eps) triples: next samples of the epoch, uniform t, Gaussian noise."""
        idx = self.sampler.draw(n, generator)
        clean = self.dataset.data[idx]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (n,), generator=generator)
        noisy = self.noise_scheduler.add_noise(clean, noise, timesteps)
        labels = self.dataset.labels[idx]
        if self.label_dropout > 0:  # drawn only then, so that runs without dropout keep their random streams
            dropped = torch.rand(n, generator=generator) < self.label_dropout
            labels = torch.where(dropped, self.dataset.num_classes, labels)
        weights = None
        if self.example_weights is not None:
            drawn = self.example_weights[idx]
            weights = drawn * (n / drawn.sum()) if drawn.sum() > 0 else drawn   # an all-excluded batch: no gradient
        return DenoisingBatch(noisy, timesteps, noise, labels, weights)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


class PretrainedModelTerm:
    """Distance to a frozen pretrained model, E ||eps_pre(x_t, t) - eps_theta(x_t, t)||^2: the
    denoising surrogate of KL(p_pre || p_theta), for fine-tuning without forgetting.

    The frozen model's output is the regression target (no gradient), and the trained model's output
    is compared with it, so the constraint does pull the trained model (the authors' notebook
    evaluated both sides with the frozen model and constrained nothing). x_t is either pure Gaussian
    noise at a uniform t (the paper's shortcut) or taken from the pretrained model's own ancestral
    (DDPM) sampling trajectories (the exact form). Those are run once, with `trajectory_steps` steps
    (the full training chain by default; fewer approximate the same marginals faster), and every
    trajectory keeps `keep_per_trajectory` of its states, at steps offset per trajectory, so the pool
    covers the visited timesteps equally: the constraint then weighs t as the objective does, which
    Theorem 1's mixture needs (a pool of DDIM-50 end states would not).
    """

    INPUTS = ("gaussian", "trajectory")

    def __init__(self, name: str, pretrained: torch.nn.Module, noise_scheduler: DDPMScheduler,
                 sample_shape: tuple[int, ...], *, inputs: str = "gaussian", trajectory_samples: int = 256,
                 keep_per_trajectory: int = 50, trajectory_steps: int | None = None, seed: int = 0,
                 progress: bool = True):
        if inputs not in self.INPUTS:
            raise ValueError(f"unknown inputs {inputs!r}; choose {' or '.join(self.INPUTS)}")
        self.name = name
        self.pretrained = pretrained.eval().requires_grad_(False)
        self.noise_scheduler = noise_scheduler
        self.sample_shape = tuple(sample_shape)
        self.inputs = inputs
        self.sampler = None
        if inputs == "trajectory":
            steps = trajectory_steps or noise_scheduler.config.num_train_timesteps
            self.pool_inputs, self.pool_timesteps = self._trajectory_pool(trajectory_samples, keep_per_trajectory,
                                                                          steps, seed, progress)
            self.sampler = EpochSampler(len(self.pool_inputs))

    def _trajectory_pool(self, num_trajectories: int, keep: int, num_steps: int, seed: int, progress: bool):
        stride = max(1, num_steps // keep)
        offsets = torch.randint(0, stride, (num_trajectories,), generator=torch.Generator().manual_seed(seed))
        inputs, timesteps = [], []
        step_index = {}   # per batch of paths: how many steps it has taken

        def keep_states(first: int, t: int, x: torch.Tensor) -> None:
            index = step_index[first] = step_index.get(first, -1) + 1
            chosen = torch.nonzero(offsets[first:first + len(x)] == index % stride).flatten()
            inputs.append(x[chosen.to(x.device)].cpu())
            timesteps.append(torch.full((len(chosen),), t, dtype=torch.long))

        ancestral = sampling_scheduler(self.noise_scheduler, "ddpm")
        generate(self.pretrained, ancestral, num_trajectories, num_inference_steps=num_steps, seed=seed,
                 batch_size=num_trajectories, device=next(self.pretrained.parameters()).device, progress=progress,
                 on_step=keep_states)
        return torch.cat(inputs), torch.cat(timesteps)

    def draw(self, n: int, generator: torch.Generator) -> DenoisingBatch:
        if self.sampler is None:
            noisy = torch.randn((n, *self.sample_shape), generator=generator)
            timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (n,), generator=generator)
        else:
            idx = self.sampler.draw(n, generator)
            noisy, timesteps = self.pool_inputs[idx], self.pool_timesteps[idx]
        device = next(self.pretrained.parameters()).device
        # The pretrained model's distribution carries no class: a class-conditional pair of models is
        # compared on its unconditional ("no class") outputs; otherwise label 0 only fills the field.
        null = null_class_label(self.pretrained)
        labels = torch.full((n,), 0 if null is None else null, dtype=torch.long)
        with torch.no_grad():
            target = self.pretrained(noisy.to(device), timesteps.to(device),
                                     class_labels=None if null is None else labels.to(device)).sample.float().cpu()
        return DenoisingBatch(noisy, timesteps, target, labels)

    def state_dict(self) -> dict:
        return self.sampler.state_dict() if self.sampler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.sampler is not None:
            self.sampler.load_state_dict(state)


@dataclass
class Constraint:
    """`term`'s loss must stay below `threshold` (loss units).

    With a `relaxation_cost` gamma the constraint is resilient: it may be relaxed by u at a cost
    gamma u^2, and its multiplier follows the resilient rule (the paper sets threshold 0 then).
    With a `fixed_multiplier` the multiplier stays at that value (Theorem 1's or 2's closed form for
    requested shares or KL bounds): no dual ascent, and no threshold to meet.
    """

    term: LossTerm
    threshold: float = 0.0
    relaxation_cost: float = 0.0   # gamma; 0 means a fixed (hard) threshold
    fixed_multiplier: float | None = None

    @property
    def name(self) -> str:
        return self.term.name

    def slack(self, loss: float, multiplier: float) -> float | None:
        """threshold + relaxation - loss: non-negative when the (relaxed) constraint holds; None for a
        fixed multiplier, which has no threshold."""
        if self.fixed_multiplier is not None:
            return None
        return self.threshold + 2.0 * self.relaxation_cost * multiplier - loss
