"""The noise-aware classifier p_phi(y | x_t, t) that classifier guidance (condiff.sampling.guidance) follows:
the model, its training on noisy samples of a labelled dataset, and its accuracy at chosen noise levels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from condiff.data.datasets import EpochSampler, LabelledDataset
from condiff.fit import fit, seeded_model
from condiff.models import timestep_embedding


class NoiseAwareClassifier(ModelMixin, ConfigMixin):
    """p_phi(y | x_t, t): a small classifier of noisy samples, conditioned on the timestep (a sinusoidal
    embedding added to every layer's activations), for classifier guidance. A CNN for images (C, H, W),
    an MLP for vectors (D,); saved and loaded like any diffusers model (`save_pretrained`)."""

    @register_to_config
    def __init__(self, sample_shape: tuple[int, ...] = (2,), num_classes: int = 2, width: int = 64,
                 time_embed_dim: int = 64):
        super().__init__()
        shape = tuple(sample_shape)
        self.time_mlp = nn.Sequential(nn.Linear(time_embed_dim, width), nn.SiLU(), nn.Linear(width, 3 * width))
        if len(shape) == 3:
            # GroupNorm rather than BatchNorm: guidance differentiates single samples' logits.
            self.layers = nn.ModuleList([
                nn.Sequential(nn.Conv2d(shape[0], width, 3, padding=1), nn.GroupNorm(8, width)),
                nn.Sequential(nn.SiLU(), nn.Conv2d(width, width, 3, stride=2, padding=1), nn.GroupNorm(8, width)),
                nn.Sequential(nn.SiLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * width, width)),
            ])
        elif len(shape) == 1:
            self.layers = nn.ModuleList([nn.Linear(shape[0], width), nn.Sequential(nn.SiLU(), nn.Linear(width, width)),
                                         nn.Sequential(nn.SiLU(), nn.Linear(width, width))])
        else:
            raise ValueError(f"expected image (C, H, W) or vector (D,) samples, not shape {shape}")
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) of noisy samples x at integer timesteps."""
        shifts = self.time_mlp(timestep_embedding(timesteps, self.config.time_embed_dim)).chunk(3, dim=1)
        h = x
        for layer, shift in zip(self.layers, shifts):
            h = layer(h)
            h = h + shift.view(*shift.shape, *[1] * (h.ndim - 2))
        return self.head(h)


def train_noise_aware_classifier(dataset: LabelledDataset, noise_scheduler: DDPMScheduler, *, steps: int,
                                 batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                                 device: str | torch.device | None = None, progress: bool = True) -> NoiseAwareClassifier:
    """Train p_phi(y | x_t, t) by cross-entropy on x_t = add_noise(x_0, eps, t), t uniform over the
    training chain: exactly the inputs guidance will see. AdamW with cosine decay; deterministic given
    `seed` (which also leaves torch's global RNG alone)."""
    classifier, device = seeded_model(lambda: NoiseAwareClassifier(dataset.sample_shape, dataset.num_classes),
                                      seed, device)
    generator = torch.Generator().manual_seed(seed)
    sampler = EpochSampler(len(dataset))
    num_timesteps = noise_scheduler.config.num_train_timesteps

    def step_loss():
        idx = sampler.draw(batch_size, generator)
        clean = dataset.data[idx]
        timesteps = torch.randint(0, num_timesteps, (len(idx),), generator=generator)
        noisy = noise_scheduler.add_noise(clean, torch.randn(clean.shape, generator=generator), timesteps)
        # Noise is drawn on the CPU generator, so a run is the same on every device up to arithmetic.
        loss = F.cross_entropy(classifier(noisy.to(device), timesteps.to(device)), dataset.labels[idx].to(device))
        return loss, {"loss": loss.detach()}

    return fit(classifier, step_loss, steps=steps, lr=lr, weight_decay=1e-4, desc="noise-aware classifier",
               progress=progress)


@torch.no_grad()
def noisy_accuracy(classifier: NoiseAwareClassifier, dataset: LabelledDataset, noise_scheduler: DDPMScheduler,
                   timesteps: list[int], seed: int = 0) -> dict[int, float]:
    """Accuracy of the classifier on `dataset` noised to each of `timesteps` (seeded noise)."""
    generator = torch.Generator().manual_seed(seed)
    device = next(classifier.parameters()).device
    accuracy = {}
    for t in timesteps:
        at_t = torch.full((len(dataset),), t, dtype=torch.long)
        noisy = noise_scheduler.add_noise(dataset.data, torch.randn(dataset.data.shape, generator=generator), at_t)
        predicted = torch.cat([classifier(x.to(device), s.to(device)).argmax(1).cpu()
                               for x, s in zip(noisy.split(512), at_t.split(512))])
        accuracy[t] = float((predicted == dataset.labels).float().mean())
    return accuracy
