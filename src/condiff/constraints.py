"""Loss terms and constraints of the constrained diffusion problem.

Every term of the Lagrangian is a regression of the network output onto a target at a noisy input:
for a dataset, the target is the noise added to a clean sample (the denoising ELBO surrogate of
KL(q || p_theta)). A term only has to produce `DenoisingBatch`es, so batches from several terms can
be concatenated into one forward pass (the `mixture` estimator relies on that), and new kinds of
terms (e.g. distance to a frozen pretrained model) slot in without touching the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate.utils import extract_model_from_parallel
from diffusers import DDPMScheduler

from condiff.data import EpochSampler, LabelledDataset


@dataclass
class DenoisingBatch:
    noisy: torch.Tensor          # x_t
    timesteps: torch.Tensor      # t, integer training timesteps
    target: torch.Tensor         # what the network should output at (x_t, t)
    class_labels: torch.Tensor   # labels of the clean samples (used by class-conditional models)

    def __len__(self) -> int:
        return len(self.noisy)

    def to(self, device: torch.device) -> "DenoisingBatch":
        return DenoisingBatch(*(getattr(self, f).to(device) for f in ("noisy", "timesteps", "target",
                                                                      "class_labels")))

    @staticmethod
    def concatenate(batches: list["DenoisingBatch"]) -> "DenoisingBatch":
        return DenoisingBatch(*(torch.cat([getattr(b, f) for b in batches])
                                for f in ("noisy", "timesteps", "target", "class_labels")))


def per_sample_loss(model: torch.nn.Module, batch: DenoisingBatch) -> torch.Tensor:
    """Mean squared error per sample between the network output and the batch's target.

    Labels go to class-conditional models only (diffusers UNets refuse them otherwise); the model
    may be wrapped by DDP, so its config is read from the unwrapped module.
    """
    conditional = extract_model_from_parallel(model).config.get("num_class_embeds")
    output = model(batch.noisy, batch.timesteps, class_labels=batch.class_labels if conditional else None).sample
    return (output.float() - batch.target.float()).pow(2).flatten(1).mean(dim=1)


class DatasetTerm:
    """The denoising loss E_{x_0 ~ data, t, eps} ||eps_theta(x_t, t) - eps||^2 on one dataset."""

    def __init__(self, name: str, dataset: LabelledDataset, noise_scheduler: DDPMScheduler):
        self.name = name
        self.dataset = dataset
        self.noise_scheduler = noise_scheduler
        self.sampler = EpochSampler(len(dataset))

    def draw(self, n: int, generator: torch.Generator) -> DenoisingBatch:
        """n fresh (x_t, t, eps) triples: next samples of the epoch, uniform t, Gaussian noise."""
        idx = self.sampler.draw(n, generator)
        clean = self.dataset.data[idx]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (n,), generator=generator)
        noisy = self.noise_scheduler.add_noise(clean, noise, timesteps)
        return DenoisingBatch(noisy, timesteps, noise, self.dataset.labels[idx])

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


@dataclass
class Constraint:
    """`term`'s loss must stay below `threshold` (loss units).

    With a `relaxation_cost` gamma the constraint is resilient: it may be relaxed by u at a cost
    gamma u^2, and its multiplier follows the resilient rule (the paper sets threshold 0 then).
    """

    term: DatasetTerm
    threshold: float = 0.0
    relaxation_cost: float = 0.0   # gamma; 0 means a fixed (hard) threshold

    @property
    def name(self) -> str:
        return self.term.name

    @property
    def resilient(self) -> bool:
        return self.relaxation_cost > 0

    def loss(self, model: torch.nn.Module, batch: DenoisingBatch) -> torch.Tensor:
        return per_sample_loss(model, batch).mean()

    def slack(self, loss: float, multiplier: float) -> float:
        """threshold + relaxation - loss: non-negative when the (relaxed) constraint holds."""
        return self.threshold + 2.0 * self.relaxation_cost * multiplier - loss
