"""Guidance for learned models: classifier-free guidance, and classifier guidance with a noise-aware
classifier that condiff trains.

Both turn the model's noise prediction at (x_t, t) into the guided one that the scheduler steps
with, so they work with any diffusers scheduler (DDPM, DDIM). With the score s = -eps / sqrt(1 - abar_t),
guidance of strength eta for class y is (Wu et al. 2024; `condiff.gmm.guidance` has its exact form)

    s_guided = grad log p_t(x | y) + eta grad log p_t(y | x),

so that eta = 0 samples the class-conditional distribution and eta > 0 sharpens it.
- Classifier-free (a class-conditional model trained with label dropout): grad log p_t(y | x) =
  s(x | y) - s(x), hence eps_guided = (1 + eta) eps(x, t, y) - eta eps(x, t, no class).
- Classifier (a noise-aware classifier p_phi(y | x_t, t)): eps_guided = eps_base - w sqrt(1 - abar_t)
  grad_x log p_phi(y | x_t, t). For a class-conditional model eps_base = eps(x, t, y) and w = eta; for an
  unconditional one, whose eps(x, t) is the marginal score, grad log p_t(x | y) is itself s(x) + grad log
  p_phi(y | x), so w = 1 + eta.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from condiff.data.datasets import EpochSampler, LabelledDataset
from condiff.fit import fit, seeded_model
from condiff.models import null_class_label, timestep_embedding

GUIDANCE_KINDS = ("cfg", "classifier")


@runtime_checkable
class Guidance(Protocol):
    """What `generate(guidance=...)` calls in place of the model: the guided noise prediction at (x_t, t) for
    the samples' classes `labels`, which the scheduler then steps with."""

    def noise(self, model: nn.Module, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None
              ) -> torch.Tensor: ...


class ClassifierFreeGuidance:
    """(1 + eta) eps(x, t, y) - eta eps(x, t, no class), both halves in one batched forward pass."""

    def __init__(self, scale: float):
        self.scale = float(scale)

    def noise(self, model: nn.Module, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        null = null_class_label(model)
        if null is None:
            raise ValueError("classifier-free guidance needs a class-conditional model (model.class_conditional = true)")
        unconditional = torch.full_like(labels, null)
        both = model(torch.cat([x, x]), torch.cat([timesteps, timesteps]),
                     class_labels=torch.cat([labels, unconditional])).sample
        conditional, marginal = both.chunk(2)
        return conditional + self.scale * (conditional - marginal)


class ClassifierGuidance:
    """eps_base - w sqrt(1 - abar_t) grad_x log p_phi(y | x_t, t), with a noise-aware classifier."""

    def __init__(self, classifier: "NoiseAwareClassifier", scale: float, alphas_cumprod: torch.Tensor):
        self.classifier = classifier.eval()
        self.scale = float(scale)
        self.alphas_cumprod = alphas_cumprod

    def noise(self, model: nn.Module, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        conditional = null_class_label(model) is not None
        base = model(x, timesteps, class_labels=labels if conditional else None).sample
        weight = self.scale if conditional else 1.0 + self.scale
        with torch.enable_grad():  # sampling runs under no_grad; the classifier's input gradient is the point
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(self.classifier(x_in, timesteps).float(), dim=1)
            chosen = log_probs.gather(1, labels.view(-1, 1)).sum()
            gradient, = torch.autograd.grad(chosen, x_in)
        abar = self.alphas_cumprod.to(x.device, torch.float64)[timesteps.long()]
        sigma = (1.0 - abar).sqrt().view(-1, *[1] * (x.ndim - 1))
        return base - weight * sigma.to(base.dtype) * gradient.to(base.dtype)


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
